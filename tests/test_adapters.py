"""timm ViTs and open_clip image towers: the tiny random models registered with the shared
tester (tests/adapter_tester.py), then family-specific behaviour and errors."""

from __future__ import annotations

import pytest
import torch
from adapter_tester import AdapterTester, Family, Tower
from helpers import SETTINGS, module_calls

import vlprune
from vlprune.core.select import keep_count

timm = pytest.importorskip("timm")

IMG = 96  # 6 x 6 = 36 patches: with 1-2 prefix tokens the counts are odd and even


def _unfused(model):
    for blk in model.blocks:
        blk.attn.fused_attn = False
    return model


def _open_clip_vit(**kw):
    from open_clip.transformer import VisionTransformer

    args = dict(image_size=IMG, patch_size=16, width=64, layers=5, heads=2, mlp_ratio=2.0,
                output_dim=32)
    return VisionTransformer(**{**args, **kw})


MODELS = {
    "test_vit": lambda: timm.create_model("test_vit", img_size=IMG),
    "test_vit2_reg_avg_ls": lambda: timm.create_model("test_vit2", img_size=IMG),
    "test_vit3_map": lambda: timm.create_model("test_vit3", img_size=IMG),
    "deit_distilled": lambda: timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=IMG, depth=4, embed_dim=48, num_heads=2
    ),
    "qk_norm": lambda: timm.create_model(
        "vit_tiny_patch16_224", img_size=IMG, depth=4, qk_norm=True, embed_dim=48, num_heads=2
    ),
    "unfused_attn": lambda: _unfused(timm.create_model("test_vit", img_size=IMG)),
    "open_clip_tok": lambda: _open_clip_vit(),
    "open_clip_avg_ls": lambda: _open_clip_vit(pool_type="avg", ls_init_value=0.1),
}


def _num_protected(model):
    return getattr(model, "num_prefix_tokens", 1)  # open_clip: the class embedding


def _blocks(model):
    return model.blocks if hasattr(model, "blocks") else model.transformer.resblocks


def _build(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def _x(batch=2, seed=1, size=IMG):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(MODELS))
def model_name(request):
    return request.param


def _towers(model, x):
    n = (x.shape[-2] // 16) * (x.shape[-1] // 16)
    return {"image": Tower(_num_protected(model), [n] * x.shape[0], len(_blocks(model)))}


def _family(name):
    # class-token scores fall back to attn_entropy on the models without a class token
    no_cls = name in ("test_vit2_reg_avg_ls", "test_vit3_map")
    settings = {
        s: {**kw, "prune_score": "attn_entropy"} if no_cls and "prune_keep" in kw and "prune_score" not in kw else kw
        for s, kw in SETTINGS.items()
    }
    prune = dict(prune_keep=0.5, prune_layers=(1,))
    refusals = []
    if no_cls:  # class-token scores (the default) need a class token
        refusals += [("prune_score", prune), ("prune_score", {**prune, "prune_score": "cls_attn_vnorm"})]
    if name.startswith("open_clip") or name == "test_vit3_map":  # no per-token head to guide by
        refusals.append(("guide", {**prune, "prune_score": "key_norm", "guide": "text"}))
    return Family(
        build=lambda: _build(name), inputs=lambda batch, seed: _x(batch, seed), settings=settings,
        identity={"r0": 0.0, "keep1": 0.0}, towers=_towers, concurrency=("hybrid", "fuse"),
        refusals=tuple(refusals),
    )


class TestTimmOpenClipVisual(AdapterTester):
    """The shared checks (tests/adapter_tester.py) on every model above."""

    families = {name: _family(name) for name in MODELS}


def test_merging_changes_tokens_and_outputs(model_name):
    model = _build(model_name)
    x = _x()
    with torch.no_grad():
        ref = model(x)
        vlprune.patch(model, merge_r=4)
        out = model(x)
    assert not torch.allclose(out, ref)
    desc = vlprune.describe(model, x, flops=False)
    assert desc.layers[-1].tokens_out < desc.layers[0].tokens_in


@pytest.mark.parametrize(
    "name",
    ["test_vit", "test_vit2_reg_avg_ls", "test_vit3_map", "deit_distilled", "open_clip_tok",
     "open_clip_avg_ls"],
)
def test_merging_identical_tokens_is_exact(name):
    """Merging identical tokens with proportional attention and size-weighted pooling must not
    change the output: with a zero position embedding and a constant image all patch tokens
    are equal, so any merge schedule has to reproduce the unpatched logits."""
    model = _build(name)
    with torch.no_grad():
        (model.pos_embed if hasattr(model, "pos_embed") else model.positional_embedding).zero_()
        for m in model.modules():  # make LayerScale (init 1e-5) large enough to matter
            if hasattr(m, "gamma"):
                m.gamma.fill_(0.5)
        x = torch.full((2, 3, IMG, IMG), 0.3)
        x[1] = -0.7
        ref = model(x)
        vlprune.patch(model, merge_r=8)
        out = model(x)
        assert vlprune.describe(model, x, flops=False).layers[-1].tokens_out < 20
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        vlprune.configure(model, prop_attn=False)
        assert not torch.allclose(model(x), ref, atol=1e-4)  # the bias matters


def test_size_weighted_avg_pool():
    model = _build("test_vit2_reg_avg_ls")
    vlprune.patch(model, merge_r=2)  # 36 patches -> 20 tokens of unequal sizes
    x = _x()
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.pool(feats)
        size = model._vlprune.state.size
        P = model.num_prefix_tokens
        manual = (feats[:, P:] * size[:, P:]).sum(1) / size[:, P:].sum(1)
    torch.testing.assert_close(pooled, manual)
    assert not torch.allclose(pooled, feats[:, P:].mean(1))


def test_dynamic_image_size():
    model = _build("test_vit")  # dynamic_img_size=True
    vlprune.patch(model, merge_r=3)
    with torch.no_grad():
        for size in (64, 112):
            out = model(_x(size=size))
            desc = vlprune.describe(model, _x(size=size), flops=False)
            assert desc.layers[0].tokens_in == (size // 16) ** 2 + 1
            assert out.shape == (2, model.num_classes)


def test_backward_through_merging():
    model = _build("test_vit").train()
    vlprune.patch(model, merge_r=4)
    loss = model(_x()).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_describe_counts_flops():
    model = _build("test_vit")
    vlprune.patch(model, merge_r=4)
    desc = vlprune.describe(model, input_size=(3, IMG, IMG))
    assert desc.flops < desc.flops_baseline
    assert desc.flops_ratio > 1.2
    vlprune.configure(model, merge_r=0)
    desc0 = vlprune.describe(model, input_size=(3, IMG, IMG))
    assert desc0.flops == desc0.flops_baseline
    assert "tokens in" in str(desc) and "GFLOPs" in str(desc)


# --- errors -----------------------------------------------------------------------------


def test_unsupported_model_lists_families():
    with pytest.raises(vlprune.UnsupportedModelError, match="timm_vit"):
        vlprune.patch(torch.nn.Linear(3, 3), merge_r=2)


def test_unsupported_block_fails_at_patch_time():
    from timm.models.vision_transformer import ResPostBlock

    model = timm.create_model("test_vit", img_size=IMG, block_fn=ResPostBlock)
    with pytest.raises(vlprune.UnsupportedModelError, match="ResPostBlock"):
        vlprune.patch(model, merge_r=2)
    assert not vlprune.is_patched(model)


@pytest.mark.parametrize("bad", [-3, "16", [1] * 7, (4, 3.0)])
def test_bad_merge_r(bad):
    model = _build("test_vit")  # 6 layers
    with pytest.raises(ValueError, match="merge_r|layers"):
        vlprune.patch(model, merge_r=bad)
    assert not vlprune.is_patched(model)


def test_unknown_setting_and_family():
    model = _build("test_vit")
    with pytest.raises(TypeError, match="known settings"):
        vlprune.patch(model, merge=3)
    with pytest.raises(ValueError, match="known families"):
        vlprune.patch(model, merge_r=3, family="nope")
    vlprune.patch(model, merge_r=3)
    with pytest.raises(ValueError, match="merge_r"):
        vlprune.configure(model, merge_r=-1)
    assert model._vlprune.config.merge_r == 3
    with pytest.raises(ValueError, match="at most 6"):
        vlprune.configure(model, merge_r=[1] * 9)
    assert model._vlprune.config.merge_r == 3


def test_not_patched_errors():
    model = _build("test_vit")
    for fn in (vlprune.unpatch, vlprune.describe, vlprune.get_config, vlprune.get_source):
        with pytest.raises(ValueError, match="not patched"):
            fn(model)


def test_attn_mask_with_reduction_is_refused():
    model = _build("test_vit")
    vlprune.patch(model, merge_r=3)
    n = (IMG // 16) ** 2 + 1
    with pytest.raises(ValueError, match="attn_mask"):
        model(_x(), attn_mask=torch.zeros(1, 1, n, n))


def test_forward_intermediates():
    model = _build("test_vit")
    vlprune.patch(model, merge_r=3)
    with pytest.raises(ValueError, match="NLC"):
        model.forward_intermediates(_x())
    final, inter = model.forward_intermediates(_x(), output_fmt="NLC")
    assert inter[-1].shape[1] < (IMG // 16) ** 2
    with vlprune.disabled(model):
        final, inter = model.forward_intermediates(_x())
        assert inter[-1].shape[-2:] == (IMG // 16, IMG // 16)


def test_get_source_needs_trace():
    model = _build("test_vit")
    vlprune.patch(model, merge_r=3)
    model(_x())
    with pytest.raises(ValueError, match="trace_source"):
        vlprune.get_source(model)


def test_config_object_and_keywords_are_equal():
    a, b = _build("test_vit"), _build("test_vit")
    vlprune.patch(a, vlprune.ReductionConfig(merge_r=(3, 0.5)))
    vlprune.patch(b, merge_r=(3, 0.5))
    assert a._vlprune.config == b._vlprune.config
    with pytest.raises(TypeError, match="either"):
        vlprune.patch(a, vlprune.ReductionConfig(), merge_r=2)


def test_pickling_a_patched_model_explains_itself(tmp_path):
    model = _build("test_vit")
    vlprune.patch(model, merge_r=2)
    with pytest.raises(TypeError, match="state_dict"):
        torch.save(model, tmp_path / "m.pt")
    torch.save(model.state_dict(), tmp_path / "sd.pt")  # the documented way works
    vlprune.unpatch(model)
    torch.save(model, tmp_path / "m.pt")


@pytest.mark.parametrize("name", ["test_vit2_reg_avg_ls", "qk_norm", "deit_distilled"])
def test_every_upstream_submodule_still_runs(name):
    """The patched forward calls every submodule the upstream forward calls (LayerScale,
    drop-path, q/k norms, ...), in the same order within each block."""
    model = _build(name)
    ref = module_calls(model, _x())
    vlprune.patch(model, merge_r=3)
    assert module_calls(model, _x()) == ref


# --- pruning ------------------------------------------------------------------------------


def test_class_token_scores_need_a_class_token():
    model = _build("test_vit2_reg_avg_ls")  # registers + avg pooling, no class token
    with pytest.raises(ValueError, match="no class token.*key_norm"):
        vlprune.patch(model, prune_keep=0.5)
    vlprune.patch(model, prune_keep=0.5, prune_score="key_norm")
    assert model(_x()).shape == (2, model.num_classes)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(prune_keep=0.5, prune_layers=(6,)), "out of range"),
        (dict(prune_keep=[0.5, 0.4], prune_layers=(1,)), "one per layer"),
        (dict(prune_keep=0.0), r"\(0, 1\]"),
        (dict(prune_keep=0.5, prune_score="cls"), "allowed"),
        (dict(prune_layers=(1,)), "prune_keep"),
        (dict(prune_keep=0.5, prune_fuse=True, prune_recycle=True), "pick one"),
        (dict(prune_fuse=True), "would be ignored"),
        (dict(merge_r=2, prune_score="random"), "would be ignored"),
    ],
)
def test_bad_prune_settings(kw, match):
    model = _build("test_vit")  # 6 layers
    with pytest.raises(ValueError, match=match):
        vlprune.patch(model, **kw)
    assert not vlprune.is_patched(model)


def test_default_prune_layers_follow_evit():
    model = timm.create_model("vit_tiny_patch16_224", depth=12, img_size=IMG)
    vlprune.patch(model, prune_keep=0.5)
    assert [i for i, k in enumerate(model._vlprune.prune_schedule) if k] == [3, 6, 9]


def test_random_pruning_is_seeded_per_forward():
    model = _build("test_vit")
    vlprune.patch(model, prune_keep=0.5, prune_layers=(1,), prune_score="random", prune_seed=1)
    with torch.no_grad():
        a, b = model(_x()), model(_x())
        vlprune.configure(model, prune_seed=2)
        c = model(_x())
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


def test_cls_attn_keeps_the_tokens_the_class_token_attends_to():
    """Steer block 0 so the class token attends to known patches: pruning must keep them."""
    model = _build("test_vit")
    vlprune.patch(model, prune_keep=0.25, prune_layers=(0,), trace_source=True)
    n = (IMG // 16) ** 2 + 1
    favourite = [3, 10, 17, 30]
    attn = model.blocks[0].attn
    hd = attn.num_heads * attn.head_dim

    def steer(mod, inp, out):  # constant queries; large keys only at the favourite tokens
        out = out.clone()
        out[..., :hd] = 1.0
        out[..., hd : 2 * hd] = 0.0
        out[:, favourite, hd : 2 * hd] = 5.0
        return out

    handle = attn.qkv.register_forward_hook(steer)
    with torch.no_grad():
        model(_x(batch=1))
    handle.remove()
    kept = vlprune.get_source(model)[0].nonzero()[:, 1].tolist()
    assert set(favourite) <= set(kept)
    assert len(kept) == 1 + keep_count(n, 1, 0.25)


# --- open_clip image tower ------------------------------------------------------------------


def test_open_clip_image_tower_of_a_clip_alone():
    open_clip = pytest.importorskip("open_clip")
    clip = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=IMG, patch_size=16, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2),
    )
    vlprune.patch(clip.visual, merge_r=2)
    with torch.no_grad():
        feats = clip.encode_image(_x())
    assert feats.shape == (2, 32)
    assert vlprune.describe(clip.visual, _x(), flops=False).layers[-1].tokens_out == 37 - 4


def test_open_clip_custom_block_is_refused():
    pytest.importorskip("open_clip")
    model = _open_clip_vit(qk_norm=True)  # CustomResidualAttentionBlock
    with pytest.raises(vlprune.UnsupportedModelError, match="CustomResidualAttentionBlock"):
        vlprune.patch(model, merge_r=2)


def test_open_clip_patched_blocks_still_call_upstream_modules():
    pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = _open_clip_vit(ls_init_value=0.1).eval()
    ref = module_calls(model, _x())
    vlprune.patch(model, merge_r=3, prune_keep=0.6, prune_layers=(1,))
    patched = module_calls(model, _x())
    # every upstream call still happens, in order; reduced layers also show out_proj, which
    # the fused nn.MultiheadAttention path runs inside its kernel
    it = iter(patched)
    assert all(name in it for name in ref)
    assert any(name.endswith("attn.out_proj") for name in patched)


def test_open_clip_describe_counts_fewer_flops():
    pytest.importorskip("open_clip")
    model = _open_clip_vit()
    vlprune.patch(model, merge_r=4)
    desc = vlprune.describe(model)
    assert desc.flops_ratio > 1.2
    vlprune.configure(model, merge_r=0)
    assert vlprune.describe(model).flops_ratio == 1.0


def test_open_clip_forward_intermediates():
    pytest.importorskip("open_clip")
    model = _open_clip_vit()
    vlprune.patch(model, merge_r=3)
    with pytest.raises(ValueError, match="NLC"):
        model.forward_intermediates(_x())
    out = model.forward_intermediates(_x(), output_fmt="NLC")
    assert out["image_intermediates"][-1].shape[1] < (IMG // 16) ** 2


def test_torch_fx_traces_an_avg_pooled_vit_that_reduces_nothing():
    """timm's own fx tests (test_model_forward_fx) on an avg-pooled ViT: patched at merge_r=0
    it traces and equals upstream (the size-weighted pooling used to test a traced shape)."""
    pytest.importorskip("torchvision")
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    upstream = _build("test_vit2_reg_avg_ls")
    model = vlprune.patch(_build("test_vit2_reg_avg_ls"), merge_r=0)
    _, nodes = get_graph_node_names(model)  # what timm's test does: trace, take the last node
    traced = create_feature_extractor(model, return_nodes=[nodes[-1]])
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(next(iter(traced(x).values())), upstream(x), atol=0, rtol=0)
