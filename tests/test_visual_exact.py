"""The exact pre-projector scores ``visionzip``, ``prumerge``, ``prumerge_plus``: option
validation (``ReductionConfig``, ``patch`` and ``configure`` accept and refuse the same),
the models they refuse, the rules on hand-made tensors, batches of different adaptive counts
(forward, ``generate``) and the VLM bench's visual-token column."""

from __future__ import annotations

import pytest
import torch

import vlprune
from vlprune.config import ReductionConfig
from vlprune.core.visual import prumerge_merge, prumerge_select, visionzip_reduce

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------- config validation

GOOD = [
    dict(visual_keep=64, visual_score="visionzip"),
    dict(visual_keep=0.25, visual_score="visionzip", visual_contextual=0),
    dict(visual_keep=64, visual_score="visionzip", visual_contextual=20),
    dict(visual_score="prumerge"),
    dict(visual_score="prumerge_plus"),
    dict(visual_score="prumerge", llm_layer=1, llm_keep=0.5),
]
BAD = [
    (dict(visual_score="prumerge", visual_keep=64), "picks each image's token count itself"),
    (dict(visual_score="prumerge_plus", visual_keep=0.5), "leave visual_keep unset"),
    (dict(visual_score="prumerge", visual_seed=3), "visual_seed is the seed"),
    (dict(visual_score="prumerge", visual_contextual=4), "visual_contextual is the contextual"),
    (dict(visual_score="visionzip"), "visual_keep is not"),
    (dict(visual_score="visionzip", visual_keep=64, visual_contextual=-1), "int >= 0"),
]


@pytest.mark.parametrize("kw", GOOD)
def test_config_accepts(kw):
    cfg = ReductionConfig(**kw)
    assert not cfg.visual_is_identity and cfg.has_visual_settings and not cfg.is_identity


@pytest.mark.parametrize("kw,msg", BAD)
def test_config_refuses(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ReductionConfig(**kw)


def test_adaptive_is_not_identity():
    cfg = ReductionConfig(visual_score="prumerge")
    assert cfg.visual_keep is None and not cfg.visual_is_identity
    assert ReductionConfig(visual_keep=1.0, visual_score="visionzip").visual_is_identity


# ---------------------------------------------------------------- models


def _llava(layers=3, image=56, patch=8, feature_layer=-2, siglip=False):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
              num_attention_heads=4, image_size=image, patch_size=patch)
    vision = SiglipVisionConfig(**kw) if siglip else CLIPVisionConfig(**kw)
    n = (image // patch) ** 2
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=200,
                                pad_token_id=0, max_position_embeddings=256),
        image_token_index=199, image_seq_length=n, vision_feature_layer=feature_layer,
        vision_feature_select_strategy="full" if siglip else "default",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    if not siglip:  # the golden towers' init: peaked class attention, so outliers exist
        from golden_llava import tiny_clip

        tiny_clip.init_weights(model.model.vision_tower)
    return model


@pytest.fixture(scope="module")
def small():
    """49 patches (7x7): enough for PruMerge's 32 neighbours."""
    return _llava()


def _inputs(model, images: int, seed: int = 0, pad: bool = False):
    n = model.config.image_seq_length
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(1, 199, (images, 3), generator=g),
                     torch.full((images, n), 199), torch.randint(1, 199, (images, 2), generator=g)], 1)
    mask = torch.ones_like(ids)
    if pad:  # left-pad row 0 by two
        ids = torch.cat([torch.zeros(images, 2, dtype=ids.dtype), ids], 1)
        mask = torch.cat([torch.zeros(images, 2, dtype=mask.dtype), mask], 1)
        ids[1:, :2] = 5
        mask[1:, :2] = 1
    size = model.config.vision_config.image_size
    px = torch.randn(images, 3, size, size, generator=g)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px)


@pytest.mark.parametrize("kw,msg", BAD)
def test_patch_and_configure_refuse_alike(small, kw, msg):
    with pytest.raises(ValueError, match=msg):
        vlprune.patch(small, **kw)
    assert getattr(small, "_vlprune", None) is None
    vlprune.patch(small, visual_keep=8)
    try:
        base = dict(visual_keep=None) if "visual_keep" not in kw else {}
        with pytest.raises(ValueError, match=msg):
            vlprune.configure(small, **{**base, **kw})
        assert vlprune.get_config(small).visual_keep == 8  # unchanged
    finally:
        vlprune.unpatch(small)


@pytest.mark.parametrize("kw", [k for k in GOOD if "llm_layer" not in k and
                                k.get("visual_keep") not in (64,)])
def test_patch_and_configure_accept_alike(small, kw):
    vlprune.patch(small, **kw)
    vlprune.unpatch(small)
    vlprune.patch(small, visual_keep=8)
    try:
        vlprune.configure(small, **{"visual_keep": None, **kw})
        assert vlprune.get_config(small).visual_score == kw["visual_score"]
    finally:
        vlprune.unpatch(small)


@pytest.mark.parametrize("score", ["visionzip", "prumerge", "prumerge_plus"])
def test_refuses_anyres(score):
    from llava_family_models import build

    model = build("llava_next")
    kw = dict(visual_score=score, **({"visual_keep": 16} if score == "visionzip" else {}))
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        vlprune.patch(model, **kw)


@pytest.mark.parametrize("score", ["visionzip", "prumerge"])
def test_refuses_tower_without_class_token(score):
    model = _llava(siglip=True)
    kw = dict(visual_score=score, **({"visual_keep": 16} if score == "visionzip" else {}))
    with pytest.raises(ValueError, match="no class token"):
        vlprune.patch(model, **kw)


def test_refuses_list_feature_layer():
    model = _llava(feature_layer=[-2, -1])
    with pytest.raises(ValueError, match="reads one vision_feature_layer"):
        vlprune.patch(model, visual_score="prumerge")


def test_refuses_tower_reduction(small):
    with pytest.raises(ValueError, match="one or the other"):
        vlprune.patch(small, visual_keep=16, visual_score="visionzip", merge_r=2)


def test_prumerge_needs_a_later_layer_and_enough_patches():
    with pytest.raises(ValueError, match="layer after the feature layer"):
        vlprune.patch(_llava(feature_layer=-1), visual_score="prumerge")
    with pytest.raises(ValueError, match="32 nearest"):
        vlprune.patch(_llava(image=32), visual_score="prumerge_plus")  # 16 patches
    vlprune.patch(_llava(image=32), visual_keep=8, visual_score="visionzip").eval()  # fine


def test_visionzip_keep_above_span(small):
    with pytest.raises(ValueError, match="49"):
        vlprune.patch(small, visual_keep=60, visual_score="visionzip")


# ---------------------------------------------------------------- rules on tensors


def test_visionzip_rule_by_hand():
    """3 patches + class token; dominant 1, contextual 1: the class token and the top patch,
    then one contextual token: the first leftover (centre) plus the mean of the others."""
    hidden = torch.tensor([[9.0, 9], [1, 0], [0, 1], [2, 2]])
    cls_attn = torch.tensor([0.1, 0.7, 0.2])  # patch 2 (token 2) dominates
    keys = torch.tensor([[1.0, 0], [1, 0], [0, 1], [1, 0.1]])
    out, idx, centres = visionzip_reduce(hidden, cls_attn, keys, 1, 1)
    assert idx.tolist() == [0, 2] and centres.tolist() == [0]
    torch.testing.assert_close(out, torch.tensor([[9.0, 9], [0, 1], [1 + 2, 0 + 2]]))
    out0, _, _ = visionzip_reduce(hidden, cls_attn, keys, 1, 0)
    assert out0.shape[0] == 2


def test_prumerge_rule_by_hand():
    n = 40
    attn = torch.full((n,), 0.01)
    attn[[5, 17]] = torch.tensor([0.5, 0.3])  # two outliers
    idx, ratio = prumerge_select(attn, plus=False)
    assert idx.tolist() == [5, 17] and ratio == 2 / n
    feats = torch.randn(n, 4)
    keys = torch.randn(n, 4)
    out = prumerge_merge(feats, attn, keys, idx, knn=n - 1)  # every other token a neighbour
    others = torch.ones(n, dtype=torch.bool)
    others[5] = False
    torch.testing.assert_close(out[0], feats[5] + (feats[others] * attn[others, None]).sum(0))
    rest = torch.ones(n, dtype=torch.bool)
    rest[[5, 17]] = False
    torch.testing.assert_close(out[2], (feats[rest] * attn[rest, None]).sum(0))
    plus, _ = prumerge_select(attn, plus=True)
    # step int(int(1 / 0.05) / 3) = 6 over 0 .. n - 2, without the kept ones
    assert plus.tolist() == [5, 17, 0, 6, 12, 18, 24, 30, 36]


def test_prumerge_without_outliers():
    attn = torch.full((40,), 0.025)
    idx, ratio = prumerge_select(attn, plus=False)
    assert idx.numel() == 0 and ratio == 0
    out = prumerge_merge(torch.randn(40, 4), attn, torch.randn(40, 4), idx, knn=32)
    assert out.shape == (1, 4)  # the extra token only, as the reference
    with pytest.raises(ValueError, match="no class-attention outlier"):
        prumerge_select(attn, plus=True)


# ---------------------------------------------------------------- batches of different counts


def _counts(model, inputs):
    seen = {}

    def hook(module, args, kwargs):
        seen["lens"] = [t.shape[0] for t in kwargs["mm_encoder_outputs"]["image"].pooler_output]
        seen["ids"] = kwargs["input_ids"]

    h = model.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        h.remove()
    return seen, out


@pytest.mark.parametrize("score", ["prumerge", "prumerge_plus"])
def test_batch_of_different_counts(small, score):
    """Rows whose images keep different counts: each row's span shrinks to its own count
    (rows re-padded on the left), the logits of each row equal its batch-of-one run, and
    ``generate`` returns the caller's prompt, then the new tokens."""
    inputs = None
    for seed in range(20):  # find two images of different adaptive counts
        x = _inputs(small, 2, seed, pad=True)
        vlprune.patch(small, visual_score=score)
        try:
            seen, out = _counts(small, x)
        finally:
            vlprune.unpatch(small)
        if seen["lens"][0] != seen["lens"][1]:
            inputs = x
            break
    assert inputs is not None, "no seed gave two images of different adaptive counts"
    vlprune.patch(small, visual_score=score)
    try:
        seen, out = _counts(small, inputs)
        lens = seen["lens"]
        assert (seen["ids"] == 199).sum(1).tolist() == lens
        for b in range(2):
            one = {k: v[b:b + 1] for k, v in inputs.items()}
            real = one["attention_mask"][0].bool()
            one = {k: (v[:, real] if k != "pixel_values" else v) for k, v in one.items()}
            s1, o1 = _counts(small, one)
            assert s1["lens"] == [lens[b]]
            torch.testing.assert_close(out.logits[b, -1], o1.logits[0, -1], atol=1e-4, rtol=1e-4)
        gen = small.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(gen[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
        assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
        d = vlprune.describe(small, inputs, flops=False)
        assert [(lr.index, lr.tokens_out) for lr in d.layers] == [(0, lens[0]), (1, lens[1])]
    finally:
        vlprune.unpatch(small)


def test_vlm_bench_reports_adaptive_count(small):
    from vlprune.eval.sweep import Setting
    from vlprune.eval.vlm_bench import run_vlm_bench

    settings = [Setting.of("prumerge", visual_score="prumerge"),
                Setting.of("visionzip 16", visual_keep=16, visual_score="visionzip")]
    res = run_vlm_bench(small, settings, batch_size=1, text_tokens=6, new_tokens=2, rounds=1,
                        warmup=0, measure_memory=False, progress=False)
    row = res.row("prumerge")
    assert 1 <= row.visual_tokens < 49 and row.llm_tokens == row.visual_tokens + 6
    assert res.row("visionzip 16").visual_tokens == 16
    assert " prumerge " in res.table()
