"""Fuzzing across families: random merge schedules, pruning (keep rates, layers, scores, drop /
fuse / recycle), batch sizes and padding patterns on tiny random-init models, each built once.

Every drawn case checks, against rules written in the tests (tests/adapter_tester.py, never the
library's own helpers):

- the outputs keep their unpatched shapes and are finite;
- ``describe`` reports, per layer, the tokens in / out, r and keep rate the documented rules
  give for each row's real tokens (ToMe's schedule, ``ceil(keep * n)``, merges capped at half);
- the source map (``get_source``) and the sizes the attention weighs tokens by: protected
  tokens hold exactly themselves, no input token is held twice, real tokens never merge with
  padding, sizes equal the source row sums, and where nothing is dropped each row's sizes sum
  to its input token count (protected + real);
- ``unpatch`` gives the unpatched outputs back bit for bit.
"""

from __future__ import annotations

import functools

import pytest
import torch
from adapter_tester import Tower, check_sources, expected_tower_layers, token_sizes, tower_options
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import vlprune

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

IMG, PATCH = 32, 8  # 4 x 4 = 16 patches
VOCAB, CTX = 60, 16
ALL_SCORES = ("cls_attn", "cls_attn_vnorm", "key_norm", "attn_entropy", "received_attn", "random",
              "diversity")
NO_CLASS_SCORES = ("key_norm", "attn_entropy", "received_attn", "random", "diversity")


# --- the families: (build, layers, protected tokens, scores, kind) ------------------------------


def _timm(**kw):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=4, num_heads=2,
                             mlp_ratio=2.0, num_classes=5, **kw)


def _open_clip():
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=IMG, patch_size=PATCH, width=32, layers=3, heads=2,
                             mlp_ratio=2.0, output_dim=16)


def _hf_clip_vision():
    cfg = transformers.CLIPVisionConfig(image_size=IMG, patch_size=PATCH, hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, attn_implementation="sdpa")
    return transformers.CLIPVisionModel(cfg)


def _hf_clip_text():
    cfg = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=2, max_position_embeddings=CTX,
                                      vocab_size=VOCAB, bos_token_id=VOCAB - 2,
                                      eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    return transformers.CLIPTextModel(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=CTX, attn_implementation="sdpa")
    return transformers.BertModel(cfg)


FAMILIES = {
    "timm_cls": (lambda: _timm(), 4, 1, ALL_SCORES, "image"),
    "timm_no_cls": (lambda: _timm(class_token=False, global_pool="avg"), 4, 0, NO_CLASS_SCORES, "image"),
    "timm_registers": (lambda: _timm(reg_tokens=2), 4, 3, ALL_SCORES, "image"),
    "open_clip_visual": (_open_clip, 3, 1, ALL_SCORES, "image"),
    "hf_clip_vision": (_hf_clip_vision, 3, 1, ALL_SCORES, "image"),
    "hf_clip_text": (_hf_clip_text, 3, 2, ALL_SCORES, "clip_text"),
    "bert": (_bert, 3, 2, ALL_SCORES, "bert"),
}


@functools.cache
def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name][0]().eval()


def _inputs(kind: str, lengths: list[int], seed: int):
    """Images (one per entry of ``lengths``), or padded texts of those lengths (BOS / [CLS]
    and EOT / [SEP] included): CLIP pads after the EOT with the eos id to the longest text,
    BERT pads with 0 to the longest text plus ``seed % 3`` columns of padding in every row."""
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        return torch.randn(len(lengths), 3, IMG, IMG, generator=g)
    extra = 0 if kind == "clip_text" else seed % 3
    width = max(lengths) + extra
    pad = VOCAB - 1 if kind == "clip_text" else 0
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 1 : n - 1] = torch.randint(3, VOCAB - 3, (n - 2,), generator=g)
        ids[i, 0], ids[i, n - 1] = (VOCAB - 2, VOCAB - 1) if kind == "clip_text" else (1, 2)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return dict(input_ids=ids, attention_mask=mask)


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _outputs(kind: str, out, inputs) -> list[torch.Tensor]:
    """The outputs of the unpatched shape: an image model's output (timm, open_clip) or pooled
    output (HF); a text model's pooled output and its hidden states at the real positions."""
    if kind == "image":
        return [out] if isinstance(out, torch.Tensor) else [out.pooler_output]
    if kind == "clip_text":  # its last_hidden_state is the reduced sequence
        return [out.pooler_output]
    real = inputs["attention_mask"].bool()  # BERT: full length, padding positions zeroed
    return [out.pooler_output, out.last_hidden_state[real]]


def _tower(name: str, inputs) -> Tower:
    _, layers, P, _, kind = FAMILIES[name]
    if kind == "image":
        return Tower(P, [(IMG // PATCH) ** 2] * inputs.shape[0], layers)
    lengths = inputs["attention_mask"].sum(1) - P
    return Tower(P, lengths.tolist(), layers, inputs["input_ids"].shape[1])


# --- what is drawn ---------------------------------------------------------------------------


@st.composite
def cases(draw, name: str):
    _, L, P, scores, kind = FAMILIES[name]
    kw: dict = {}
    form = draw(st.sampled_from(["none", "int", "ramp", "list"]))
    if form == "int":
        kw["merge_r"] = draw(st.integers(0, 8))
    elif form == "ramp":
        kw["merge_r"] = (draw(st.integers(0, 8)), draw(st.floats(-1.0, 1.0)))
    elif form == "list":
        kw["merge_r"] = draw(st.lists(st.integers(0, 8), max_size=L))
    if draw(st.sampled_from([True, True, False])):  # pruning in two cases of three
        layers = draw(st.lists(st.integers(0, L - 1), min_size=1, max_size=L, unique=True))
        keep_st = st.floats(0.05, 1.0)
        kw["prune_layers"] = tuple(layers)
        kw["prune_keep"] = (draw(st.lists(keep_st, min_size=len(layers), max_size=len(layers)))
                            if draw(st.booleans()) else draw(keep_st))
        kw["prune_score"] = draw(st.sampled_from(scores))
        if kw["prune_score"] == "random":
            kw["prune_seed"] = draw(st.integers(0, 9))
        # a padded text refuses fuse (tested in test_hf_bert.py / test_text_towers.py)
        mode = draw(st.sampled_from(["drop", "fuse", "recycle"] if kind == "image" else ["drop", "recycle"]))
        if mode != "drop":
            kw[f"prune_{mode}"] = True
    kw["prop_attn"] = draw(st.booleans())
    batch = draw(st.integers(1, 3))
    if kind == "image":
        lengths = [0] * batch
    else:
        lengths = draw(st.lists(st.integers(3, CTX - 3), min_size=batch, max_size=batch))
    return name, kw, lengths, draw(st.integers(0, 2**16))


# examples per family: 7 families x 9 cases take about 60 s of CPU on 2 cores
EXAMPLES = 9


# --- the property ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_patch_shapes_sizes_and_unpatch(name, data):
    check_case(*data.draw(cases(name)))


def check_case(name: str, kw: dict, lengths: list[int], seed: int) -> None:
    kind = FAMILIES[name][4]
    # coverage, in --hypothesis-show-statistics
    event("prune " + ("off" if "prune_keep" not in kw else "fuse" if kw.get("prune_fuse")
                      else "recycle" if kw.get("prune_recycle") else "drop"))
    event("merge " + type(kw.get("merge_r")).__name__)
    model = _model(name)
    inputs = _inputs(kind, lengths, seed)
    tower = _tower(name, inputs)
    ref = _outputs(kind, _run(model, inputs), inputs)
    vlprune.patch(model, trace_source=True, **kw)
    try:
        out = _outputs(kind, _run(model, inputs), inputs)
        assert [o.shape for o in out] == [r.shape for r in ref]
        assert all(bool(torch.isfinite(o).all()) for o in out)

        # tokens per layer, from the documented rules
        desc = vlprune.describe(model, inputs, flops=False)
        want = expected_tower_layers(tower_options(kw, "text" if kind != "image" else "image",
                                                   two_towers=False), tower)
        got = [(lr.tokens_in, lr.tokens_out, lr.merge_r, lr.prune_keep) for lr in desc.layers]
        assert got == want

        # sources and sizes of this input (describe's forward is the latest)
        name_ = "text" if kind != "image" else "image"
        check_sources(model, kw, {name_: tower}, len(lengths))
        # the sizes of the tokens holding a row's real inputs sum to its input token count
        # (protected + real) where nothing is dropped, to less where pruning drops
        size = token_sizes(model, None)
        drops = kw.get("prune_keep") is not None and not (kw.get("prune_fuse") or kw.get("prune_recycle"))
        if size is not None:
            source = vlprune.get_source(model)
            for b, n in enumerate(tower.real):
                holds_real = source[b, :, : tower.protected + n].sum(-1) > 0
                total = float(size[b, holds_real].sum())
                if drops:
                    assert tower.protected < total <= tower.protected + n, (b, total)
                else:
                    assert total == tower.protected + n, (b, total)
                assert bool((size[b, holds_real] >= 1).all())
    finally:
        vlprune.unpatch(model)
    again = _outputs(kind, _run(model, inputs), inputs)
    assert all(torch.equal(a, r) for a, r in zip(again, ref))
