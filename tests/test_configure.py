"""``vlprune.configure`` refuses what ``vlprune.patch`` refuses, atomically (issue 15, item 1).

``configure(model, **changes)`` runs the family's patch-time checks and builds the new
settings as ``patch`` does; a refused change leaves the settings, the patched classes and the
outputs exactly as they were. A change the patched modules can follow is made in place (the
same classes, the same context object); one that needs other patched modules (guidance, FastV
layers) re-patches internally. Either way the outputs equal a fresh ``patch`` with the new
settings, and ``unpatch`` afterwards restores the original model exactly.
"""

from __future__ import annotations

import pytest
import torch
from helpers import vlprune_attrs
from torch import nn

import vlprune
from vlprune.adapters.base import find_adapter

timm = pytest.importorskip("timm")

IMG = 64  # 4 x 4 = 16 patches


def _vit(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    args = dict(pretrained=False, img_size=IMG, depth=4, embed_dim=48, num_heads=2)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kw}).eval()


def _vit_no_cls(seed: int = 0) -> nn.Module:
    """A ViT without a class token (average pooling)."""
    return _vit(seed, class_token=False, global_pool="avg")


def _x(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _run(model: nn.Module, x) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, torch.Tensor) and o.dim() > 0]
    return [v for k, v in out.items() if isinstance(v, torch.Tensor) and k != "loss"]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _footprint(model: nn.Module) -> list:
    """Everything a patch puts on the model, by identity: each module's class, its
    ``_vlprune*`` attributes and its forward pre-hooks."""
    out = []
    for name, m in model.named_modules():
        attrs = sorted((k, id(v)) for k, v in vars(m).items() if k.startswith("_vlprune"))
        hooks = [(k, id(v)) for k, v in m._forward_pre_hooks.items()]
        out.append((name, type(m), attrs, hooks, list(m._forward_pre_hooks_with_kwargs)))
    return out


def _classes(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


def _original(model: nn.Module) -> tuple:
    """Classes, module attribute names, hooks and parameters of an unpatched model."""
    return (
        [(n, type(m), sorted(vars(m)), list(m._forward_pre_hooks), list(m._forward_hooks))
         for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _assert_original(model: nn.Module, before: tuple) -> None:
    layout, sd = before
    now, now_sd = _original(model)
    assert now == layout
    assert list(now_sd) == list(sd) and all(torch.equal(now_sd[k], v) for k, v in sd.items())
    assert vlprune_attrs(model) == []
    assert not vlprune.is_patched(model)


# --- the refusals of the issue ------------------------------------------------------------


def test_class_token_scores_on_a_model_without_one():
    """patch refuses class-attention pruning without a class token; so does configure (it
    used to accept it and rank tokens by the first patch's attention row)."""
    model = _vit_no_cls()
    with pytest.raises(ValueError, match="no class token") as refused:
        vlprune.patch(model, prune_keep=0.5, prune_layers=(3,))
    assert "prune_score" in str(refused.value)
    assert not vlprune.is_patched(model)
    vlprune.patch(model, merge_r=4)
    cfg, out = vlprune.get_config(model), _run(model, _x())
    with pytest.raises(ValueError, match="no class token") as refused:
        vlprune.configure(model, prune_keep=0.5, prune_layers=(3,))
    assert "prune_score" in str(refused.value)
    assert vlprune.get_config(model) == cfg
    assert _same(_run(model, _x()), out)
    # the scores that need no class token are accepted, and match a fresh patch
    vlprune.configure(model, prune_keep=0.5, prune_layers=(3,), prune_score="key_norm")
    fresh = vlprune.patch(_vit_no_cls(), merge_r=4, prune_keep=0.5, prune_layers=(3,),
                          prune_score="key_norm")
    assert _same(_run(model, _x()), _run(fresh, _x()))


def test_visual_settings_on_a_model_without_visual_tokens():
    model = _vit()
    with pytest.raises(ValueError, match="visual_keep"):
        vlprune.patch(model, visual_keep=64)
    vlprune.patch(model, merge_r=2)
    cfg, out = vlprune.get_config(model), _run(model, _x())
    with pytest.raises(ValueError, match="visual_keep"):
        vlprune.configure(model, visual_keep=64)
    assert vlprune.get_config(model) == cfg
    assert _same(_run(model, _x()), out)


@pytest.mark.parametrize(
    "bad, name",
    [
        (dict(text_merge_r=2), "text_merge_r"),
        (dict(text_output="compact"), "text_output"),
        (dict(guide="image"), "guide"),
        (dict(merge_r=[1] * 9), "merge_r"),
        (dict(prune_keep=0.5, prune_layers=(7,)), "prune_layers"),
        (dict(family="hf_clip"), "family"),
        (dict(attn_backend="flash"), "attn_backend"),
        (dict(attn_backend=None), "attn_backend"),
    ],
)
def test_refused_configure_changes_nothing(bad, name):
    """A refused configure leaves the settings, every patched module (class, attributes,
    hooks: the same objects) and the output exactly as they were."""
    model = _vit()
    vlprune.patch(model, merge_r=2, prune_keep=0.7, prune_layers=(1,), trace_source=True)
    cfg, ctx, out = vlprune.get_config(model), model._vlprune, _run(model, _x())
    source = vlprune.get_source(model)
    footprint = _footprint(model)
    with pytest.raises((ValueError, TypeError)) as refused:
        vlprune.configure(model, **bad)
    assert name in str(refused.value)
    assert vlprune.get_config(model) == cfg and model._vlprune is ctx
    assert _footprint(model) == footprint
    assert torch.equal(vlprune.get_source(model), source)  # the calling thread's last forward
    assert _same(_run(model, _x()), out)


def test_a_failure_while_applying_rolls_back(monkeypatch):
    """An error in the middle of building the new patch (here: after the adapter swapped
    some classes) leaves the old patch exactly in place."""
    model = _vit()
    vlprune.patch(model, merge_r=2)
    cfg, out, footprint = vlprune.get_config(model), _run(model, _x()), _footprint(model)
    adapter = type(find_adapter(model))
    apply = adapter.apply

    def broken(self, m, ctx):
        apply(self, m, ctx)
        raise RuntimeError("boom")

    monkeypatch.setattr(adapter, "apply", broken)
    with pytest.raises(RuntimeError, match="boom"):
        vlprune.configure(model, merge_r=3)
    monkeypatch.undo()
    assert vlprune.get_config(model) == cfg
    assert _footprint(model) == footprint
    assert _same(_run(model, _x()), out)


# --- what configure keeps ---------------------------------------------------------------


def test_a_plain_change_keeps_the_patch_in_place():
    """Changing a setting the patched modules follow does not re-patch: the same context
    object, the same classes and attributes; the output is a fresh patch's."""
    model = _vit()
    vlprune.patch(model, merge_r=2)
    ctx, footprint = model._vlprune, _footprint(model)
    for changes in (dict(merge_r=3), dict(prune_keep=0.5, prune_layers=(2,)), dict(trace_source=True),
                    dict(merge_r=0, prune_keep=None, prune_layers=None)):
        vlprune.configure(model, **changes)
        assert model._vlprune is ctx and _footprint(model) == footprint
        fresh = vlprune.patch(_vit(), vlprune.get_config(model))
        assert _same(_run(model, _x()), _run(fresh, _x())), changes


def test_configure_then_unpatch_restores_the_original():
    model = _vit()
    ref = _run(model, _x())
    before = _original(model)
    vlprune.patch(model, merge_r=2)
    vlprune.configure(model, merge_r=3, prune_keep=0.5, prune_layers=(1,))
    vlprune.configure(model, guide="text")
    vlprune.set_guide(model, torch.randn(5, 48))
    _run(model, _x())
    with pytest.raises(ValueError):
        vlprune.configure(model, visual_keep=4)
    vlprune.unpatch(model)
    _assert_original(model, before)
    assert _same(_run(model, _x()), ref)


# --- guidance -----------------------------------------------------------------------------

IMG_CLIP = 64


def _open_clip(seed: int = 0) -> nn.Module:
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=IMG_CLIP, patch_size=16, width=64, layers=3, head_width=32),
        text_cfg=dict(context_length=12, vocab_size=100, width=48, heads=2, layers=2),
    ).eval()


def _hf_clip(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, vocab_size=100,
                         bos_token_id=98, eos_token_id=99, pad_token_id=99),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=2, image_size=IMG_CLIP, patch_size=16),
        projection_dim=32,
    )
    return transformers.CLIPModel(cfg).eval()


def _texts(batch: int = 2) -> torch.Tensor:
    ids = torch.randint(3, 97, (batch, 12), generator=torch.Generator().manual_seed(3))
    ids[:, 0], ids[:, -1] = 98, 99  # BOS ... EOT (the highest id: argmax pooling)
    return ids


TWO_TOWERS = {
    "open_clip": (_open_clip, lambda: dict(image=_x(), text=_texts()), lambda m: m.encode_image(_x())),
    "hf_clip": (
        _hf_clip,
        lambda: dict(pixel_values=_x(), input_ids=_texts()),
        lambda m: m.get_image_features(pixel_values=_x()).pooler_output,
    ),
}


@pytest.mark.parametrize("name", list(TWO_TOWERS))
def test_guide_set_up_by_configure(name):
    """configure(guide=...) sets guidance up as patch does (it used to record the setting
    and leave the towers unguided); other changes keep set_guide's embeddings; guide=None
    takes guidance away again."""
    build, both, image_only = TWO_TOWERS[name]
    prune = dict(prune_keep=0.5, prune_layers=(1,))
    model = vlprune.patch(build(), **prune)
    with pytest.raises(ValueError, match="not patched with guide"):
        vlprune.set_guide(model, torch.randn(4, 32))
    vlprune.configure(model, guide="text")
    assert vlprune.get_config(model).guide == "text"
    fresh = vlprune.patch(build(), **prune, guide="text")
    assert _same(_run(model, both()), _run(fresh, both()))
    unguided = vlprune.patch(build(), **prune)
    assert not _same(_run(model, both()), _run(unguided, both()))

    emb = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    vlprune.set_guide(model, emb)
    vlprune.set_guide(fresh, emb)
    with torch.no_grad():
        assert torch.equal(image_only(model), image_only(fresh))
        # another change keeps the embeddings set_guide gave
        vlprune.configure(model, prune_keep=0.3)
        vlprune.patch(fresh, **{**prune, "prune_keep": 0.3}, guide="text")
        vlprune.set_guide(fresh, emb)
        assert torch.equal(image_only(model), image_only(fresh))
    # a refused change keeps them too
    with pytest.raises(ValueError, match="visual_keep"):
        vlprune.configure(model, visual_keep=4)
    with torch.no_grad():
        assert torch.equal(image_only(model), image_only(fresh))
    # guide=None: no guidance, the output of a model patched without it
    vlprune.configure(model, guide=None)
    with pytest.raises(ValueError, match="not patched with guide"):
        vlprune.set_guide(model, emb)
    vlprune.patch(unguided, **{**prune, "prune_keep": 0.3})
    assert _same(_run(model, both()), _run(unguided, both()))


def test_guide_on_a_vit_set_up_by_configure():
    model = vlprune.patch(_vit(), prune_keep=0.5, prune_layers=(1,))
    vlprune.configure(model, guide="text")
    emb = torch.randn(6, 48, generator=torch.Generator().manual_seed(2))
    vlprune.set_guide(model, emb)
    fresh = vlprune.patch(_vit(), prune_keep=0.5, prune_layers=(1,), guide="text")
    vlprune.set_guide(fresh, emb)
    assert _same(_run(model, _x()), _run(fresh, _x()))
    # MAP pooling has no per-token head: refused by both
    with pytest.raises(ValueError, match="guide"):
        vlprune.patch(_vit(global_pool="map"), prune_keep=0.5, prune_layers=(1,), guide="text")
    model = vlprune.patch(_vit(global_pool="map"), prune_keep=0.5, prune_layers=(1,))
    with pytest.raises(ValueError, match="guide"):
        vlprune.configure(model, guide="text")
    assert vlprune.get_config(model).guide is None


# --- changes that need other patched modules: an internal re-patch ---------------------------


def _llava():
    pytest.importorskip("transformers")
    from test_llava import _batch, _build

    return _build, _batch((0, 2))


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_llava_fastv_and_tower_turned_on_by_configure():
    """FastV's decoder layers and the LLaVA-1.5 vision tower are patched only when asked
    for: configure patches them (and takes them away again) through an internal re-patch;
    a refused change leaves the patch exactly as it was."""
    build, inputs = _llava()
    model = build()
    ref = _logits(model, inputs)  # the first forward installs transformers' own hooks
    before = _original(model)
    vlprune.patch(model, visual_keep=8)
    plain = _classes(model)
    steps = [dict(llm_layer=1, llm_keep=4), dict(merge_r=1), dict(merge_r=0, llm_layer=None, llm_keep=None)]
    for changes in steps:
        vlprune.configure(model, **changes)
        cfg = vlprune.get_config(model)
        fresh = vlprune.patch(build(), cfg)
        assert (_classes(model) != plain) == (changes != steps[-1])  # other modules patched
        assert _same([_logits(model, inputs)], [_logits(fresh, inputs)]), changes
        footprint, out = _footprint(model), _logits(model, inputs)
        with pytest.raises(ValueError, match="llm_layer") as refused:
            vlprune.configure(model, llm_layer=2, llm_keep=4)  # the tiny LLM has 2 layers
        with pytest.raises(ValueError) as by_patch:
            vlprune.patch(build(), cfg.replace(llm_layer=2, llm_keep=4))
        assert str(refused.value) == str(by_patch.value)
        assert vlprune.get_config(model) == cfg and _footprint(model) == footprint
        assert torch.equal(_logits(model, inputs), out)
    assert _classes(model) == plain  # back to the settings patched first
    vlprune.unpatch(model)
    _assert_original(model, before)
    assert torch.equal(_logits(model, inputs), ref)


def test_patching_a_tower_of_a_patched_model_is_refused_and_changes_nothing():
    """A refused patch rolls back exactly too: patching the image tower of a patched CLIP
    alone is refused, and the whole model keeps its patch."""
    model = vlprune.patch(_hf_clip(), merge_r=1)
    footprint, out = _footprint(model), _run(model, TWO_TOWERS["hf_clip"][1]())
    with pytest.raises(ValueError, match="already patched"):
        vlprune.patch(model.vision_model, merge_r=2)
    assert _footprint(model) == footprint
    assert _same(_run(model, TWO_TOWERS["hf_clip"][1]()), out)
