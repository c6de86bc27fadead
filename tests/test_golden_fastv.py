"""vlprune's FastV (``llm_layer``/``llm_keep`` on a LLaVA) against the authors' FastV.

The golden file ``tests/golden/fastv_llama.npz`` was produced by the reference code
(pkunlp-icler/FastV, the inplace branch of ``LlamaModel.forward`` in its transformers fork;
commit, file and lines, settings and margins in ``tests/golden/fastv_llama.json``) with
``benchmarks/fidelity/make_golden_fastv.py``: a tiny seeded Llama (hidden 64, 5 layers, 4
heads, 2 key/value heads) on the LLaVA-1.5 layout (35 system-prompt tokens, 576 image tokens,
30 text tokens), FastV at K = 2 and 3 keeping 288 (R = 50%) and 144 (R = 75%) image tokens.

Here the same weights become the language model of a transformers ``LlavaForConditionalGeneration``
(the vision tower is never run: the golden image features come in as ``mm_encoder_outputs``,
upstream's own argument for precomputed features), patched with
``vlprune.patch(model, llm_layer=K, llm_keep=...)`` and called like a user calls it. The kept
positions must equal the reference's exactly (each cut's score margin is >= 6e-4 relative,
thousands of times float32 rounding, so no ties), the final hidden states of every kept
position and the last token's logits must agree within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fidelity_report import report

import vlprune

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
np = pytest.importorskip("numpy")

GOLDEN = Path(__file__).parent / "golden"
ATOL = 1e-4  # float32; the reference's eager attention against sdpa / eager of transformers 5
CASES = {"k2_r288": (2, 0.5), "k2_r144": (2, 144), "k3_r288": (3, 0.5), "k3_r144": (3, 144)}


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN / "fastv_llama.npz", allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    data["meta"] = json.loads((GOLDEN / "fastv_llama.json").read_text())
    return data


def _build(golden, attn: str):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    m = golden["meta"]["model"]
    text = LlamaConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"], num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"], num_key_value_heads=m["num_key_value_heads"],
        max_position_embeddings=m["max_position_embeddings"], rms_norm_eps=m["rms_norm_eps"],
        pad_token_id=m["pad_token_id"], bos_token_id=m["bos_token_id"],
        eos_token_id=m["eos_token_id"], tie_word_embeddings=False,
    )
    # a CLIP of LLaVA-1.5's geometry (336 px, 14 px patches: 576 tokens), never run here
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, image_size=336, patch_size=14)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=m["image_token_id"],
                      image_seq_length=576)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    lm = model.model.language_model
    weights = {k[len("weights/"):]: torch.from_numpy(v).float()
               for k, v in golden.items() if k.startswith("weights/")}
    sd = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
    missing, unexpected = lm.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("inv_freq")], missing
    with torch.no_grad():
        model.lm_head.weight.copy_(weights["lm_head.weight"])
    model.set_attn_implementation(attn)
    return model


def _inputs(golden, rows: int = 1):
    """The golden prompt; with ``rows=2`` a second, shorter row (left-padded) comes along."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    ids = torch.from_numpy(golden["input_ids"])[None]
    feats = torch.from_numpy(golden["image_features"]).float()
    mask = torch.ones_like(ids)
    images = [feats]
    if rows == 2:
        other = torch.cat([ids[:, :-7], ids[:, -1:]], dim=1)  # 6 text tokens fewer
        pad = ids.shape[1] - other.shape[1]
        ids = torch.cat([ids, torch.cat([torch.zeros(1, pad, dtype=ids.dtype), other], dim=1)])
        mask = torch.cat([mask, (torch.arange(ids.shape[1]) >= pad).long()[None]])
        images.append(feats.flip(0))
    return dict(input_ids=ids, attention_mask=mask,
                mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=images)})


def _run(model, inputs, K: int):
    """Logits, the final hidden states (after the language model's norm) and what layers
    K-1 and K receive."""
    seen: dict = {}
    lm = model.model.language_model

    def norm_hook(module, args, out):
        seen["hidden"] = out

    def layer_hook(i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            seen[i] = (h.shape[1], kwargs.get("position_ids"))
        return hook

    handles = [lm.norm.register_forward_hook(norm_hook)]
    handles += [lm.layers[i].self_attn.register_forward_pre_hook(layer_hook(i), with_kwargs=True)
                for i in (K - 1, K)]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def test_golden_describes_its_source(golden):
    meta = golden["meta"]
    ref = meta["reference"]
    assert ref["repository"] == "https://github.com/pkunlp-icler/FastV"
    assert len(ref["commit"]) == 40
    assert ref["file"].endswith("models/llama/modeling_llama.py")
    assert meta["tolerance"] == {"kept": "exact", "hidden": ATOL, "logits": ATOL}
    assert golden["input_ids"].shape == (641,)
    for name, (K, _) in CASES.items():
        assert meta["summary"][name]["K"] == K
        assert meta["summary"][name]["cut_margin_relative"] > 1e-4  # no near-ties at the cut


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CASES))
def test_fastv_matches_reference(golden, name, attn):
    K, keep = CASES[name]
    model = _build(golden, attn)
    vlprune.patch(model, llm_layer=K, llm_keep=keep)
    logits, seen = _run(model, _inputs(golden), K)

    want = torch.from_numpy(golden[f"kept_{name}"])
    kept = model.__dict__["_vlprune_llm"].call().kept[0]
    assert torch.equal(kept, want)
    assert seen[K - 1][0] == 641  # layer K-1 (which ranks) runs on the full prompt
    assert seen[K][0] == want.shape[0]
    assert torch.equal(seen[K][1][0], want)  # original positions, as the reference's position_ids

    hidden = torch.from_numpy(golden[f"hidden_{name}"])
    diff_h = float((seen["hidden"][0] - hidden).abs().max())
    diff_l = float((logits[0, -1] - torch.from_numpy(golden[f"logits_{name}"])).abs().max())
    report("FastV", f"{name}: kept positions identical; max |hidden diff|", diff_h)
    report("FastV", f"{name}: max |last logit diff|", diff_l)
    assert diff_h <= ATOL, diff_h
    assert diff_l <= ATOL, diff_l


def test_fastv_row_in_a_batch_matches_reference(golden):
    """The golden row next to a shorter, left-padded row: each row ranks and keeps its own
    tokens; the golden row's result is the reference's (which runs one row only)."""
    name, (K, keep) = "k2_r288", CASES["k2_r288"]
    model = _build(golden, "sdpa")
    vlprune.patch(model, llm_layer=K, llm_keep=keep)
    logits, seen = _run(model, _inputs(golden, rows=2), K)
    assert torch.equal(model.__dict__["_vlprune_llm"].call().kept[0],
                       torch.from_numpy(golden[f"kept_{name}"]))
    hidden = torch.from_numpy(golden[f"hidden_{name}"])
    assert float((seen["hidden"][0] - hidden).abs().max()) <= ATOL
    assert float((logits[0, -1] - torch.from_numpy(golden[f"logits_{name}"])).abs().max()) <= ATOL


def test_unpatched_matches_reference_unpruned(golden):
    """The weights and inputs line up: unpatched, the last token's logits are the reference's
    with FastV off; FastV changes them by far more than the tolerance."""
    model = _build(golden, "sdpa")
    with torch.no_grad():
        logits = model(**_inputs(golden)).logits[0, -1]
    plain = torch.from_numpy(golden["logits_unpruned"])
    assert float((logits - plain).abs().max()) <= ATOL
    for name in CASES:
        assert float((torch.from_numpy(golden[f"logits_{name}"]) - plain).abs().max()) > 100 * ATOL
