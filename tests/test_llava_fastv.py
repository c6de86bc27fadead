"""LLaVA: FastV-style pruning of visual tokens inside the language model at prefill
(llm_layer, llm_keep), alone and after visual_keep, on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import model_fixtures

import vlprune

transformers = pytest.importorskip("transformers")
from test_llava import (  # noqa: E402
    IMAGE_ID,
    N_IMG,
    _batch,
    _build,
    _generate,
    _logits,
    assert_rows_independent,
)
from transformers import LlavaForConditionalGeneration  # noqa: E402

ROWS = (0, 1, 2, 3)


model, _unpatched = model_fixtures(_build)


class _LayerInputs:
    """Records what the attention of each decoder layer of the language model receives
    (inside the layer, so after a pruning layer's own selection)."""

    def __init__(self, model):
        self.calls: dict[int, list[dict]] = {}
        layers = model.model.language_model.layers
        self.handles = [
            layer.self_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]

    def _hook(self, i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.calls.setdefault(i, []).append(dict(
                n=h.shape[1], position_ids=kwargs.get("position_ids"),
                cos=kwargs["position_embeddings"][0], mask=kwargs.get("attention_mask"),
            ))
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("rows", [(0,), ROWS])
def test_identity_matches_unpatched(model, rows):
    inputs = _batch(rows)
    ref_logits, ref_gen = _logits(model, inputs), _generate(model, inputs)
    vlprune.patch(model, llm_layer=1, llm_keep=1.0)
    assert torch.equal(_logits(model, inputs), ref_logits)
    assert torch.equal(_generate(model, inputs), ref_gen)
    # keeping every token through the pruning path (index-selects, mask columns at decode)
    vlprune.patch(model, llm_layer=1, llm_keep=N_IMG)
    torch.testing.assert_close(_logits(model, inputs), ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(model, inputs), ref_gen)


@pytest.mark.parametrize(
    "llm_keep, visual_keep, renumber",
    [(4, None, False), (0.3, None, False), (4, 8, False), (0.5, 8, False), (4, None, True)],
)
def test_generate_prunes_and_rows_are_independent(model, llm_keep, visual_keep, renumber):
    per_image = visual_keep or N_IMG
    k = llm_keep if isinstance(llm_keep, int) else math.ceil(llm_keep * per_image)
    vlprune.patch(model, llm_layer=1, llm_keep=llm_keep, visual_keep=visual_keep,
                  llm_renumber_positions=renumber)
    inputs = _batch(ROWS)
    L = inputs["input_ids"].shape[1] - (N_IMG - per_image)
    with _LayerInputs(model) as rec:
        out = _generate(model, inputs)
    assert rec.calls[0][0]["n"] == L  # layer 0: every visual token entering the LLM
    assert rec.calls[1][0]["n"] == L - (per_image - k)  # from llm_layer on: k per image
    assert rec.calls[1][0]["cos"].shape[1] == L - (per_image - k)
    assert all(c["n"] == 1 for i in (0, 1) for c in rec.calls[i][1:]) and len(rec.calls[1]) == 5
    for step, c in enumerate(rec.calls[1][1:], 1):  # decode: the pruned layer's own cache
        assert c["mask"].shape[-1] == L - (per_image - k) + step
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    # a row's LM inputs and logits (after the pruning layer) do not depend on its neighbours
    assert_rows_independent(model, inputs, [_batch((i,)) for i in ROWS])


def test_decode_mask_matches_own_cache(model):
    vlprune.patch(model, llm_layer=1, llm_keep=4)
    inputs = _batch(ROWS)
    L = inputs["input_ids"].shape[1]
    R = L - (N_IMG - 4)
    with _LayerInputs(model) as rec:
        _generate(model, inputs)
    for step in range(1, 5):
        full, pruned = rec.calls[0][step]["mask"], rec.calls[1][step]["mask"]
        assert full.shape[-1] == L + step and pruned.shape[-1] == R + step
        # the generated columns are the same; each row sees as many prompt keys as it kept
        assert torch.equal(pruned[..., -step:], full[..., -step:])
        pad = (inputs["attention_mask"] == 0).sum(dim=1)
        assert torch.equal(pruned[:, 0, 0, :R].sum(dim=-1), R - pad)


def test_kept_tokens_are_the_most_attended(model):
    """FastV ranks with the attention map of layer llm_layer - 1 (the one the previous layer
    outputs), last prompt row, heads averaged; here the unpatched eager model's own map."""
    inputs = _batch(ROWS)
    ids = inputs["input_ids"]
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(**inputs, output_attentions=True).attentions[0]  # (B, H, L, L)
    finally:
        model.set_attn_implementation("sdpa")
    scores = att[:, :, -1].mean(dim=1)  # last prompt token (left padding), heads averaged
    vlprune.patch(model, llm_layer=1, llm_keep=5)
    _logits(model, inputs)
    kept = model.__dict__["_vlprune_llm"].call().kept
    for b in range(ids.shape[0]):
        vis = (ids[b] == IMAGE_ID).nonzero()[:, 0]
        want = vis[scores[b, vis].topk(5).indices].sort().values
        got = kept[b][ids[b, kept[b]] == IMAGE_ID]
        assert torch.equal(got, want), b
        # every text token and padding position is kept
        assert torch.equal(kept[b][ids[b, kept[b]] != IMAGE_ID], (ids[b] != IMAGE_ID).nonzero()[:, 0])


@pytest.mark.parametrize("renumber", [False, True])
def test_positions(model, renumber):
    inputs = _batch((1,))
    L = inputs["input_ids"].shape[1]
    R = L - (N_IMG - 4)
    vlprune.patch(model, llm_layer=1, llm_keep=4, llm_renumber_positions=renumber)
    with _LayerInputs(model) as rec:
        out = _generate(model, inputs)
    kept = model.__dict__["_vlprune_llm"].call().kept[0]
    rotary = model.model.language_model.rotary_emb
    pre, step = rec.calls[1][0], rec.calls[1][1]
    want = torch.arange(R) if renumber else kept
    assert torch.equal(pre["position_ids"][0], want)
    # the attention of the pruned layer uses the rotary embedding of those positions
    cos, _ = rotary(pre["cos"], want[None])
    torch.testing.assert_close(pre["cos"], cos)
    # the first generated token continues the original numbering (or the renumbered one)
    first = L - (N_IMG - 4) if renumber else L
    assert int(step["position_ids"].flatten()[0]) == first
    torch.testing.assert_close(step["cos"], rotary(step["cos"], torch.tensor([[first]]))[0])
    assert int(rec.calls[0][1]["position_ids"].flatten()[0]) == L  # unpruned layers: original
    assert out.shape[1] == L + 5


def test_unpatch_restores(model):
    inputs = _batch((0, 2))
    ref_logits, ref_gen = _logits(model, inputs), _generate(model, inputs)
    layer_cls = type(model.model.language_model.layers[1])
    vlprune.patch(model, llm_layer=1, llm_keep=4, visual_keep=8)
    assert type(model.model.language_model.layers[1]) is not layer_cls
    # layer 0 (llm_layer - 1) ranks the visual tokens, on the full prompt
    assert type(model.model.language_model.layers[0]) is not layer_cls
    assert _logits(model, inputs).shape[1] == ref_logits.shape[1] - (N_IMG - 4)
    with vlprune.disabled(model):
        assert torch.equal(_logits(model, inputs), ref_logits)
        assert torch.equal(_generate(model, inputs), ref_gen)
    vlprune.unpatch(model)
    assert type(model) is LlavaForConditionalGeneration
    assert type(model.model.language_model.layers[1]) is layer_cls
    assert not any(k.startswith("_vlprune") for m in model.modules() for k in m.__dict__)
    assert torch.equal(_logits(model, inputs), ref_logits)
    assert torch.equal(_generate(model, inputs), ref_gen)


def test_describe(model):
    vlprune.patch(model, llm_layer=1, llm_keep=4, visual_keep=8)
    d = vlprune.describe(model, flops=False)
    assert [(lr.index, lr.tokens_in, lr.tokens_out, lr.tower) for lr in d.layers] == [
        (0, N_IMG, 8, "visual"), (1, 8, 4, "llm"),
    ]


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(llm_keep=4), "llm_layer is not"),
        (dict(llm_layer=1), "llm_keep is not"),
        (dict(llm_renumber_positions=True), "llm_keep is not"),
        (dict(llm_layer=0, llm_keep=4), "int >= 1"),
        (dict(llm_layer=1, llm_keep=0), "int count >= 1"),
        (dict(llm_layer=1, llm_keep=1.5), "float ratio in"),
        (dict(llm_layer=1, llm_keep=4, llm_renumber_positions=1), "True or False"),
    ],
)
def test_bad_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        vlprune.ReductionConfig(**settings)


def test_refusals(model):
    with pytest.raises(ValueError, match=r"give 1\.\.1"):
        vlprune.patch(model, llm_layer=2, llm_keep=4)
    with pytest.raises(ValueError, match="only 8 visual tokens"):
        vlprune.patch(model, llm_layer=1, llm_keep=9, visual_keep=8)
    with pytest.raises(ValueError, match="guide not supported on LlavaForConditionalGeneration"):
        vlprune.patch(model, llm_layer=1, llm_keep=4, guide="text", prune_keep=0.5)
    assert not vlprune.is_patched(model)
    vlprune.patch(model, llm_layer=1, llm_keep=4)
    inputs = _batch((0,))
    with pytest.raises(ValueError, match="labels"):
        model(**inputs, labels=inputs["input_ids"])
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(**inputs, max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match=r"give 1\.\.1"):  # refused as patch refuses it
        vlprune.configure(model, llm_layer=2)
    vlprune.unpatch(model)
    # decoder layers of other classes are refused at patch time
    m = _build()
    layer = m.model.language_model.layers[1]
    layer.__class__ = type("OtherDecoderLayer", (torch.nn.Module,), {"forward": type(layer).forward})
    with pytest.raises(TypeError, match="OtherDecoderLayer is not supported"):
        vlprune.patch(m, llm_layer=1, llm_keep=4)
