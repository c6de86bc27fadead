"""One shared invariants tester for the timm ViT adapter, over tiny random models x settings."""

from __future__ import annotations

import copy

import pytest
import torch

import vlprune
from vlprune.merging import max_merge

timm = pytest.importorskip("timm")

IMG = 96  # 6 x 6 = 36 patches: with 1-2 prefix tokens the counts are odd and even


def _unfused(model):
    for blk in model.blocks:
        blk.attn.fused_attn = False
    return model


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
}

SETTINGS = {
    "r0": 0,
    "r3": 3,
    "ramp": (4, 0.5),
    "list": [5, 0, 2],
    "capped": 100,
}


def _build(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def _x(batch=2, seed=1, size=IMG):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _vlprune_attrs(model):
    return [(n, k) for n, m in model.named_modules() for k in vars(m) if k.startswith("_vlprune")]


@pytest.fixture(params=list(MODELS))
def model_name(request):
    return request.param


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_invariants(model_name, setting, batch):
    model = _build(model_name)
    x = _x(batch)
    classes = {n: type(m) for n, m in model.named_modules()}
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        vlprune.patch(model, merge_r=SETTINGS[setting], trace_source=True)
        out = model(x)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        if setting == "r0":
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        with vlprune.disabled(model):
            torch.testing.assert_close(model(x), ref, atol=0, rtol=0)

        # tokens per layer follow the schedule, capped at half the mergeable tokens
        P = model.num_prefix_tokens
        desc = vlprune.describe(model, x, flops=False)
        sched = vlprune.parse_schedule(SETTINGS[setting], len(model.blocks))
        assert len(desc.layers) == len(model.blocks)
        for lr, r in zip(desc.layers, sched):
            assert lr.r_requested == r
            assert lr.tokens_in - lr.tokens_out == min(r, max_merge(lr.tokens_in, P))
        for prev, nxt in zip(desc.layers, desc.layers[1:]):
            assert nxt.tokens_in == prev.tokens_out

        # sizes sum to the input token count; protected tokens hold only themselves
        model(x)
        state = model._vlprune.state
        n0 = desc.layers[0].tokens_in
        if state.size is not None:
            assert torch.allclose(state.size.sum(dim=(1, 2)), torch.full((batch,), float(n0)))
            source = vlprune.get_source(model)
            assert torch.equal(source[:, :P, :], torch.eye(n0)[:P].expand(batch, P, n0))
            assert torch.equal(source[:, P:, :P], torch.zeros(batch, source.shape[1] - P, P))

        # patch twice == patch once
        vlprune.patch(model, merge_r=SETTINGS[setting], trace_source=True)
        torch.testing.assert_close(model(x), out, atol=0, rtol=0)
        assert type(model).__bases__[-1] is classes[""]  # not wrapped twice

        # deepcopy gives an independent patched model with the same outputs
        clone = copy.deepcopy(model)
        torch.testing.assert_close(clone(x), out, atol=0, rtol=0)
        assert clone._vlprune is not model._vlprune
        assert clone.blocks[0]._vlprune_ctx is clone._vlprune
        vlprune.configure(clone, merge_r=0)
        assert model._vlprune.config.merge_r == vlprune.ReductionConfig(merge_r=SETTINGS[setting]).merge_r

        # unpatch restores classes, outputs, state_dict keys, and leaves nothing behind
        vlprune.unpatch(model)
        assert {n: type(m) for n, m in model.named_modules()} == classes
        assert list(model.state_dict()) == keys
        assert _vlprune_attrs(model) == []
        assert not vlprune.is_patched(model)
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)


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


@pytest.mark.parametrize("name", ["test_vit", "test_vit2_reg_avg_ls", "test_vit3_map", "deit_distilled"])
def test_merging_identical_tokens_is_exact(name):
    """Merging identical tokens with proportional attention and size-weighted pooling must not
    change the output: with a zero position embedding and a constant image all patch tokens
    are equal, so any merge schedule has to reproduce the unpatched logits."""
    model = _build(name)
    with torch.no_grad():
        model.pos_embed.zero_()
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


def test_grad_checkpointing_refused():
    model = _build("test_vit").train()
    model.set_grad_checkpointing(True)
    vlprune.patch(model, merge_r=3)
    with pytest.raises(RuntimeError, match="checkpointing"):
        model(_x())


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

    def calls():
        seen = []
        hooks = [
            m.register_forward_hook(lambda mod, i, o, n=n: seen.append(n))
            for n, m in model.named_modules() if n
        ]
        with torch.no_grad():
            model(_x())
        for h in hooks:
            h.remove()
        return seen

    ref = calls()
    vlprune.patch(model, merge_r=3)
    assert calls() == ref
