"""Merging and pruning inside the vision tower of a LLaVA-1.5 (transformers
LlavaForConditionalGeneration with a CLIP or SigLIP tower), on tiny random models.

The first part drives :mod:`vlprune.adapters.llava.tower` directly (the way the root LLaVA
adapter wires it) and reads ``get_image_features``. The part marked INTEGRATION goes through
``vlprune.patch(llava, merge_r=...)`` and needs the LLaVA adapter to call the module.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import expected_tokens_out, vlprune_attrs

import vlprune
from vlprune.adapters.llava.tower import (
    check_llava_tower,
    llava_context,
    patch_llava_tower,
    refuse_anyres_tower,
    tower_requested,
    tower_tokens_per_image,
)

transformers = pytest.importorskip("transformers")
from test_llava import assert_rows_independent  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

IMAGE_ID = 199
PATCHES = 16  # 32x32 images, 8x8 patches


def _text_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=200, pad_token_id=0, max_position_embeddings=128,
    )


def _vision_config(kind: str, layers: int):
    cls = CLIPVisionConfig if kind == "clip" else SiglipVisionConfig
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
               num_attention_heads=4, image_size=32, patch_size=8)


def _build(kind: str = "clip", layers: int = 3, feature_layer=-2, strategy=None):
    """A tiny LLaVA: CLIP tower ("default" strategy, the class token dropped) or SigLIP tower
    ("full": it has no class token)."""
    torch.manual_seed(0)
    strategy = strategy or ("default" if kind == "clip" else "full")
    cfg = LlavaConfig(
        vision_config=_vision_config(kind, layers), text_config=_text_config(),
        image_token_index=IMAGE_ID, image_seq_length=PATCHES + (strategy == "full"),
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
    )
    return LlavaForConditionalGeneration(cfg).eval()


# name -> (build kwargs, encoder layers that may reduce: those before the layer LLaVA reads)
MODELS = {
    "clip3": (dict(kind="clip", layers=3), 1),  # reads hidden_states[-2]: encoder layer 1
    "clip5": (dict(kind="clip", layers=5), 3),  # reads encoder layer 3
    "siglip5": (dict(kind="siglip", layers=5), 3),
}
_CACHE: dict[str, LlavaForConditionalGeneration] = {}


def _model(name: str) -> LlavaForConditionalGeneration:
    m = _CACHE.get(name)
    if m is None:
        m = _CACHE[name] = _build(**MODELS[name][0])
    if vlprune.is_patched(m):
        vlprune.unpatch(m)
    return m


@pytest.fixture(params=list(MODELS))
def name(request):
    return request.param


def _pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _protected(model) -> int:
    return int(model.config.vision_feature_select_strategy == "default")


def _tower_patch(model, **settings):
    """What the LLaVA adapter does for the tower: check, root context with the tower child,
    patch the tower, the context on the root (so unpatch / disabled / configure work)."""
    config = vlprune.ReductionConfig(**settings)
    check_llava_tower(model, config)
    ctx = llava_context(model, config, "hf_llava", len(model.model.vision_tower.encoder.layers))
    patch_llava_tower(model, ctx)
    model.__dict__["_vlprune"] = ctx
    return ctx


def _features(model, pixels, **kw):
    """Projected tokens per image (I, K, D) and the hidden state LLaVA read."""
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels, return_dict=True, **kw)
    layer = kw.get("vision_feature_layer", model.config.vision_feature_layer)
    hidden = out.hidden_states[layer] if isinstance(layer, int) else None
    return torch.stack(list(out.pooler_output)), hidden


def _records(model, pixels):
    records = []
    with model._vlprune.scoped("record", records):
        _features(model, pixels)
    return records


def _check_schedule(model, pixels, reduce_layers: int, feats, hidden) -> None:
    """Tokens shrink only before the layer LLaVA reads; that layer's output holds them all,
    and the projected features are those tokens less the class token ("default")."""
    ctx = model._vlprune.children["image"]
    records = _records(model, pixels)
    assert [r.index for r in records] == list(range(len(model.model.vision_tower.encoder.layers)))
    assert all(r.tower == "image" for r in records)
    P = int(hasattr(model.model.vision_tower.embeddings, "class_embedding"))
    for r in records:
        if r.index >= reduce_layers:
            assert (r.merge_r, r.prune_keep, r.tokens_out) == (0, None, r.tokens_in), r
        else:
            assert r.tokens_out == expected_tokens_out(
                r.tokens_in, P, r.prune_keep, r.merge_r, ctx.config.prune_mode
            )
    read = records[reduce_layers].tokens_out
    assert hidden.shape[1] == read
    assert feats.shape[1] == read - _protected(model)
    assert tower_tokens_per_image(model, model._vlprune.config) == feats.shape[1]


def _merge_settings(reduce_layers: int) -> list[dict]:
    return [
        dict(merge_r=2),
        dict(merge_r=(2, 1.0)),
        dict(merge_r=[3] + [1] * (reduce_layers - 1)),
        dict(merge_r=[0] * (reduce_layers - 1) + [4]),
    ]


def test_identity_gives_identical_features(name):
    model = _model(name)
    reduce_layers = MODELS[name][1]
    x = _pixels()
    ref, ref_hidden = _features(model, x)
    score = "key_norm" if name.startswith("siglip") else "cls_attn"  # SigLIP: no class token
    for settings in (dict(merge_r=[0]),
                     dict(prune_keep=1.0, prune_layers=(reduce_layers - 1,), prune_score=score)):
        _tower_patch(model, **settings)
        assert tower_tokens_per_image(model, model._vlprune.config) is None
        feats, hidden = _features(model, x)
        assert torch.equal(feats, ref) and torch.equal(hidden, ref_hidden), settings
        vlprune.unpatch(model)


def test_merge_reduces_before_the_feature_layer_only(name):
    model = _model(name)
    reduce_layers = MODELS[name][1]
    x = _pixels()
    N = PATCHES + _protected(model)  # tokens entering the encoder
    for settings in _merge_settings(reduce_layers):
        ctx = _tower_patch(model, **settings)
        schedule = ctx.children["image"].schedule
        assert not any(schedule[reduce_layers:])
        feats, hidden = _features(model, x)
        assert hidden.shape[1] == N - sum(schedule), settings
        assert feats.shape == (2, N - sum(schedule) - _protected(model), 32)
        assert torch.isfinite(feats).all()
        _check_schedule(model, x, reduce_layers, feats, hidden)
        vlprune.unpatch(model)


@pytest.mark.parametrize("rule", ["drop", "fuse", "recycle", "hybrid"])
def test_prune_counts(name, rule):
    model = _model(name)
    reduce_layers = MODELS[name][1]
    last = reduce_layers - 1
    settings = dict(prune_keep=0.5, prune_layers=(last,))
    if rule == "fuse":
        settings["prune_fuse"] = True
    elif rule == "recycle":
        settings["prune_recycle"] = True
    elif rule == "hybrid":
        settings["merge_r"] = 2
    if name.startswith("siglip"):
        settings["prune_score"] = "key_norm"  # no class token
    _tower_patch(model, **settings)
    x = _pixels()
    feats, hidden = _features(model, x)
    P = _protected(model)
    merged = 2 * last if rule == "hybrid" else 0  # merges before the pruning layer
    kept = math.ceil(0.5 * (PATCHES - merged))
    n = P + kept + (rule == "fuse") - (2 if rule == "hybrid" else 0)
    assert hidden.shape[1] == n and feats.shape[1] == n - P
    _check_schedule(model, x, reduce_layers, feats, hidden)


def test_default_prune_layers_span_the_layers_before_the_feature_layer():
    model = _model("clip5")  # 3 layers before the read one: EViT's placement gives (1, 2)
    ctx = _tower_patch(model, prune_keep=0.5)
    assert ctx.children["image"].prune_schedule == [None, 0.5, 0.5, None, None]


def test_class_token_first_and_kept():
    model = _model("clip5")
    _tower_patch(model, merge_r=3, trace_source=True)
    x = _pixels()
    _, hidden = _features(model, x)
    source = vlprune.get_source(model)  # no merge after the read layer: its tokens' sources
    assert source.shape == (2, hidden.shape[1], PATCHES + 1)
    assert torch.equal(source[:, 0], torch.eye(PATCHES + 1)[0].expand(2, -1))
    assert bool((source[:, 1:, 0] == 0).all())
    assert torch.equal(source.sum(dim=(1, 2)), torch.full((2,), PATCHES + 1.0))


def test_unpatch_disabled_and_configure(name):
    model = _model(name)
    x = _pixels()
    ref, _ = _features(model, x)
    classes = {n: type(m) for n, m in model.named_modules()}
    keys = list(model.state_dict())
    _tower_patch(model, merge_r=2)
    feats, _ = _features(model, x)
    assert feats.shape[1] < ref.shape[1]
    with vlprune.disabled(model):
        feats_off, _ = _features(model, x)
        assert torch.equal(feats_off, ref)
    vlprune.configure(model, merge_r=1)
    assert _features(model, x)[0].shape[1] == ref.shape[1] - MODELS[name][1]
    # settings that reduce nothing are refused, as patch() refuses them
    with pytest.raises(ValueError, match="give visual_keep"):
        vlprune.configure(model, merge_r=0)
    vlprune.configure(model, merge_r=0, visual_keep=1.0)
    assert torch.equal(_features(model, x)[0], ref)
    vlprune.configure(model, merge_r=1, visual_keep=None)
    # a failed configure keeps the old settings (root and tower)
    with pytest.raises(ValueError, match="merge_r has 9 entries"):
        vlprune.configure(model, merge_r=[1] * 9)
    assert model._vlprune.children["image"].config.merge_r == 1
    vlprune.configure(model, merge_r=2)
    twin = copy.deepcopy(model)  # the copy shares one context between its root and tower
    assert twin._vlprune.children["image"] is twin.model.vision_tower._vlprune_ctx
    assert torch.equal(_features(twin, x)[0], feats)
    vlprune.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert list(model.state_dict()) == keys and not vlprune_attrs(model)
    assert torch.equal(_features(model, x)[0], ref)


def test_list_feature_layer():
    # reads encoder layers 3 and 1: merging runs in layer 0 only, both hold the same tokens
    model = _build("clip", layers=5, feature_layer=[-2, -4])
    x = _pixels()
    ref, _ = _features(model, x)
    assert ref.shape == (2, PATCHES, 32)
    ctx = _tower_patch(model, merge_r=3)
    assert ctx.children["image"].schedule == [3, 0, 0, 0, 0]
    feats, _ = _features(model, x)
    assert feats.shape == (2, PATCHES - 3, 32)
    assert tower_tokens_per_image(model, ctx.config) == PATCHES - 3
    with pytest.raises(ValueError, match=r"merge_r has 2 entries but only 1 encoder layer \(0\) runs"):
        _tower_patch(_build("clip", layers=5, feature_layer=[-2, -4]), merge_r=[1, 1])


def test_reading_an_earlier_layer_is_refused():
    model = _model("clip5")
    _tower_patch(model, merge_r=2)
    x = _pixels()
    with pytest.raises(ValueError, match=r"hidden_states\[2\] are read.*up to encoder layer 2"):
        _features(model, x, vision_feature_layer=2)
    with vlprune.disabled(model):
        assert _features(model, x, vision_feature_layer=2)[0].shape[1] == PATCHES
    # a later layer, every hidden state, and the tower alone work
    assert _features(model, x, vision_feature_layer=-1)[0].shape[1] == PATCHES - 6
    with torch.no_grad():
        out = model.model.vision_tower(x, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [17, 15, 13, 11, 11, 11]


@pytest.mark.parametrize(
    "name, settings, match",
    [
        ("clip3", dict(merge_r=[1, 1]), r"merge_r has 2 entries but only 1 encoder layer \(0\) runs"),
        ("clip3", dict(prune_keep=0.5, prune_layers=(1,)), r"prune_layers \[1\] at or after"),
        ("clip3", dict(prune_keep=0.5), "give prune_layers"),
        ("clip3", dict(merge_r=9), "at most 8 can merge"),
        ("clip5", dict(merge_r=5), "merges 5 tokens at encoder layer 2, which gets 7 tokens"),
        ("clip5", dict(merge_r=[7, 4, 3]), "at most 2 can merge"),
        ("clip5", dict(prune_keep=0.05, prune_layers=(0,), merge_r=[1]), "at most 0 can merge"),
        ("siglip5", dict(prune_keep=0.5, prune_layers=(1,)), "no class token"),
        ("clip3", dict(trace_source=True, visual_keep=4), "give merge_r or prune_keep"),
        ("clip3", dict(merge_r=1, visual_keep=4, visual_score="pool"), "visual_score='pool'"),
    ],
)
def test_bad_settings(name, settings, match):
    model = _model(name)
    with pytest.raises(ValueError, match=match):
        _tower_patch(model, **settings)
    assert not vlprune_attrs(model)


@pytest.mark.parametrize(
    "build, match",
    [
        (dict(feature_layer=0), "the output of the embeddings; no encoder layer runs before"),
        (dict(feature_layer=1), "the output of encoder layer 0; no encoder layer runs before"),
        (dict(feature_layer=[-2, 1]), "nothing to merge or prune"),
        (dict(feature_layer=7), "hidden_states indices run from -4 to 3"),
        (dict(kind="siglip", strategy="default"), "use vision_feature_select_strategy='full'"),
    ],
)
def test_bad_feature_layers(build, match):
    model = _build(**build)
    with pytest.raises(ValueError, match=match):
        _tower_patch(model, merge_r=1)


def test_unsupported_tower():
    model = _build()
    model.model.vision_tower.config._attn_implementation = "flash_attention_2"
    with pytest.raises(vlprune.UnsupportedModelError, match="prop_attn=False"):
        _tower_patch(model, merge_r=1)


def test_no_tower_options():
    model = _model("clip3")
    for settings in (dict(visual_keep=4), dict(merge_r=0, visual_keep=4), dict(prop_attn=False, visual_keep=4)):
        config = vlprune.ReductionConfig(**settings)
        assert not tower_requested(config)
        check_llava_tower(model, config)
        assert tower_tokens_per_image(model, config) is None
        ctx = llava_context(model, config, "hf_llava", 3)
        assert not ctx.children
        # configure cannot switch the tower on later
        with pytest.raises(ValueError, match=r"cannot be turned on by configure\(\)"):
            ctx.config = config.replace(merge_r=2)
            ctx.refresh()


def _anyres(family: str):
    torch.manual_seed(0)
    vision = _vision_config("clip", 2)
    if family == "next":
        cfg = transformers.LlavaNextConfig(vision_config=vision, text_config=_text_config(),
                                           image_grid_pinpoints=[[32, 32]], image_token_index=IMAGE_ID)
        return transformers.LlavaNextForConditionalGeneration(cfg)
    if family == "onevision":
        cfg = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=_text_config(),
                                                image_grid_pinpoints=[[32, 32]], image_token_index=IMAGE_ID)
        return transformers.LlavaOnevisionForConditionalGeneration(cfg)
    cfg = transformers.LlavaNextVideoConfig(vision_config=vision, text_config=_text_config(),
                                            image_grid_pinpoints=[[32, 32]], image_token_index=IMAGE_ID)
    return transformers.LlavaNextVideoForConditionalGeneration(cfg)


@pytest.mark.parametrize("family", ["next", "onevision", "next_video"])
def test_anyres_families_refuse_tower_options(family):
    model = _anyres(family)
    for settings in (dict(merge_r=2), dict(prune_keep=0.5, visual_keep=4), dict(trace_source=True)):
        config = vlprune.ReductionConfig(**settings)
        for check in (refuse_anyres_tower, check_llava_tower):
            with pytest.raises(ValueError, match="packing needs each crop's full patch grid; use visual_keep"):
                check(model, config)
    for settings in (dict(visual_keep=4), dict(visual_keep=4, prop_attn=False)):
        refuse_anyres_tower(model, vlprune.ReductionConfig(**settings))
        check_llava_tower(model, vlprune.ReductionConfig(**settings))
    assert tower_tokens_per_image(model, vlprune.ReductionConfig(merge_r=2)) is None


# ---- INTEGRATION: through vlprune.patch; needs the LLaVA adapter to call llava_tower --------


def test_patch_tower_options_through_the_api(name):
    model = _model(name)
    reduce_layers = MODELS[name][1]
    x = _pixels()
    ref, _ = _features(model, x)
    vlprune.patch(model, merge_r=2)
    assert vlprune.is_patched(model)
    feats, hidden = _features(model, x)
    assert feats.shape[1] == ref.shape[1] - 2 * reduce_layers
    _check_schedule(model, x, reduce_layers, feats, hidden)
    vlprune.configure(model, merge_r=1, prune_keep=0.5, prune_layers=(reduce_layers - 1,),
                      prune_score="random")
    assert _features(model, x)[0].shape[1] == tower_tokens_per_image(model, vlprune.get_config(model))
    with vlprune.disabled(model):
        assert torch.equal(_features(model, x)[0], ref)
    vlprune.unpatch(model)
    assert not vlprune_attrs(model)
    assert torch.equal(_features(model, x)[0], ref)
    # with the options before and inside the language model
    vlprune.patch(model, merge_r=1, visual_keep=4, llm_layer=1, llm_keep=2)
    assert _features(model, x)[0].shape[1] == ref.shape[1] - reduce_layers


def test_patch_refusals_through_the_api():
    model = _model("clip3")
    with pytest.raises(ValueError, match="at most 8 can merge"):
        vlprune.patch(model, merge_r=9)
    # visual_keep counts the tokens the tower leaves: 16 - 4 patches per image
    with pytest.raises(ValueError, match="only 12 visual tokens"):
        vlprune.patch(model, merge_r=4, visual_keep=13)
    assert not vlprune.is_patched(model)
    vlprune.patch(model, visual_keep=4)
    vlprune.configure(model, merge_r=2)  # turns the tower's merging on (an internal re-patch)
    assert "image" in model._vlprune.children
    with pytest.raises(ValueError, match="at most 8 can merge"):
        vlprune.configure(model, merge_r=9)
    assert vlprune.get_config(model).merge_r == 2
    with pytest.raises(ValueError, match="packing needs each crop's full patch grid"):
        vlprune.patch(_anyres("next"), merge_r=2, visual_keep=4)


def _prompt(n_image: int, batch: int = 2) -> dict:
    """Left-padded prompts of different lengths, one full placeholder span each."""
    rows = []
    for b in range(batch):
        g = torch.Generator().manual_seed(100 + b)
        text = torch.randint(1, IMAGE_ID, (3 + 2 * b,), generator=g)
        rows.append(torch.cat([text[:2], torch.full((n_image,), IMAGE_ID), text[2:]]))
    L = max(len(r) for r in rows)
    ids = torch.zeros(batch, L, dtype=torch.long)
    mask = torch.zeros(batch, L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = r
        mask[b, L - len(r):] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(batch))


@pytest.mark.parametrize("visual_keep", [None, 4])
def test_generate_with_tower_reduction(visual_keep):
    model = _model("clip3")
    inputs = _prompt(PATCHES)
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        settings = dict(merge_r=3) if visual_keep is None else dict(merge_r=3, visual_keep=visual_keep)
        vlprune.patch(model, **settings)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    L = inputs["input_ids"].shape[1]
    k = PATCHES - 3 if visual_keep is None else visual_keep
    assert seen[0] == L - (PATCHES - k)
    assert torch.equal(out[:, :L], inputs["input_ids"]) and out.shape[1] == L + 3


@pytest.mark.parametrize("settings", [dict(merge_r=3), dict(merge_r=2, prune_keep=0.5,
                                                              prune_layers=(0,), visual_keep=3)])
def test_tower_rows_do_not_depend_on_neighbours(settings):
    model = _model("clip3")
    inputs = _prompt(PATCHES, batch=4)
    vlprune.patch(model, **settings)
    alone = []
    for b in range(4):
        real = inputs["attention_mask"][b].bool()
        alone.append(dict(input_ids=inputs["input_ids"][b:b + 1, real],
                          pixel_values=inputs["pixel_values"][b:b + 1]))
    assert_rows_independent(model, inputs, alone)
