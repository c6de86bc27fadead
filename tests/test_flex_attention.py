"""The FlexAttention path of the attention with token sizes and text masks (``attn_backend``).

:func:`vlprune.core.attention.attend` computes the attention of the current tokens from an
:class:`~vlprune.core.attention.AttnSpec` (per-key ``log(size)``, positions, padding) with SDPA
and a float mask, or with FlexAttention (``score_mod`` + block mask). On the CPU flex runs its
unfused reference implementation (what these tests use); the GPU tests at the end check the
compiled kernel in float32 / float16 / bfloat16.

Checked here: the two paths equal each other and a hand-written
``softmax(q k^T * scale + log(size) + mask) @ v`` in float64; every wired family (timm,
open_clip both towers, HF CLIP / SigLIP both towers, BERT, a LLaVA's vision tower) gives the
same outputs with ``attn_backend="flex"`` as with ``"sdpa"`` while merging and pruning, with
the flex kernel really called; ``"auto"`` on the CPU is the SDPA path, bit for bit; the
setting is validated alike by ``ReductionConfig``, ``patch`` and ``configure``, and refused
where no attention would use it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import vlprune
import vlprune.core.attention as attention
from vlprune.core.attention import AttnSpec, attend, resolve_backend, size_bias
from vlprune.core.state import TokenState

pytestmark = pytest.mark.skipif(not attention.flex_available(), reason="torch without FlexAttention")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    """flex's one-time notice that it runs unfused outside torch.compile (on the CPU here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


@pytest.fixture
def flex_calls(monkeypatch):
    """Shapes of the queries every FlexAttention call got."""
    calls: list[tuple[int, ...]] = []
    real = attention.flex_attend

    def spy(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(attention, "flex_attend", spy)
    return calls


# ---- the helper ----------------------------------------------------------------------------


def _reference(q, k, v, spec: AttnSpec | None, scale=None):
    """softmax(q k^T * scale + log(size)[key] + (-inf where masked)) @ v, in float64, written
    out here (no vlprune code); rows with no visible key give zeros."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * scale
    B, _, N, _ = logits.shape
    allowed = torch.ones(B, 1, N, N, dtype=torch.bool)
    if spec is not None:
        if spec.key_bias is not None:
            logits = logits + spec.key_bias.double()[:, None, None, :]
        if spec.pos is not None:
            allowed &= (spec.pos[:, None, :] <= spec.pos[:, :, None])[:, None]
        if spec.valid is not None:
            allowed &= spec.valid[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    weights = torch.nan_to_num(logits.softmax(dim=-1), nan=0.0)  # a row of -inf: no key
    return weights @ v


def _qkv(B, N, H=2, D=8, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))


def _spec(B, N, bias=True, causal=False, padding=False, seed=0, shuffle=False, device="cpu"):
    """Sizes 1..6 per token (different in every row), positions (optionally out of order, as
    after the canonical reordering of text: protected tokens first), padding at each row's
    end (row ``b`` keeps ``N - 3 b`` real tokens, at least 2; token 0 always real)."""
    g = torch.Generator().manual_seed(seed)
    key_bias = torch.randint(1, 7, (B, N), generator=g).float().log() if bias else None
    pos = None
    if causal:
        pos = torch.stack([torch.randperm(N, generator=g) if shuffle else torch.arange(N)
                           for _ in range(B)])
        pos[:, 0] = -1  # the first token is seen by every query (BOS)
    valid = None
    if padding:
        real = torch.tensor([max(2, N - 3 * b) for b in range(B)])
        valid = torch.arange(N)[None, :] < real[:, None]
    return _moved(AttnSpec(key_bias=key_bias, pos=pos, valid=valid), device)


def _moved(spec: AttnSpec, device) -> AttnSpec:
    parts = {name: getattr(spec, name) for name in ("key_bias", "pos", "valid")}
    return AttnSpec(**{name: None if t is None else t.to(device) for name, t in parts.items()})


CASES = {
    "key_bias": dict(bias=True),
    "padding": dict(bias=False, padding=True),
    "causal": dict(bias=False, causal=True),
    "causal_shuffled": dict(bias=False, causal=True, shuffle=True),
    "all": dict(bias=True, causal=True, padding=True, shuffle=True),
    "bias_padding": dict(bias=True, padding=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("B, N", [(1, 16), (3, 37), (2, 131)])
def test_flex_equals_sdpa_and_the_reference(case, B, N, flex_calls):
    """Odd lengths, one over a 128-token block, rows of different sizes and paddings."""
    q, k, v = _qkv(B, N, seed=N)
    spec = _spec(B, N, seed=B, **CASES[case])
    want = _reference(q, k, v, spec).float()
    flex = attend(q, k, v, spec, backend="flex")
    sdpa = attend(q, k, v, spec, backend="sdpa")
    assert flex_calls == [tuple(q.shape)]  # flex ran, once; sdpa did not call it
    assert torch.allclose(flex, want, atol=ATOL), (flex - want).abs().max()
    assert torch.allclose(sdpa, want, atol=ATOL), (sdpa - want).abs().max()
    assert torch.allclose(flex, sdpa, atol=ATOL)


def test_scale_and_the_bias_matter():
    """The reference comparison would catch a flex path that dropped the bias or the scale."""
    q, k, v = _qkv(2, 21)
    spec = _spec(2, 21, bias=True)
    out = attend(q, k, v, spec, scale=0.3, backend="flex")
    assert torch.allclose(out, _reference(q, k, v, spec, scale=0.3).float(), atol=ATOL)
    assert not torch.allclose(out, _reference(q, k, v, spec).float(), atol=1e-3)
    assert not torch.allclose(out, _reference(q, k, v, None, scale=0.3).float(), atol=1e-3)


def test_rows_with_no_visible_key_give_zeros_on_both_paths():
    """SDPA on the CPU returns 0 for a query row whose every key is masked, and so does flex:
    no NaN on either path (vlprune's own masks never build such rows)."""
    q, k, v = _qkv(2, 9)
    pos = torch.arange(9).expand(2, 9).clone()
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False  # row 1: queries 0..3 see only keys 0..3 (causal), all masked
    spec = AttnSpec(key_bias=torch.rand(2, 9), pos=pos, valid=valid)
    flex = attend(q, k, v, spec, backend="flex")
    sdpa = attend(q, k, v, spec, backend="sdpa")
    assert not flex.isnan().any() and not sdpa.isnan().any()
    assert torch.equal(flex[1, :, :4], torch.zeros_like(flex[1, :, :4]))
    assert torch.equal(sdpa[1, :, :4], torch.zeros_like(sdpa[1, :, :4]))
    assert torch.allclose(flex, _reference(q, k, v, spec).float(), atol=ATOL)
    assert torch.allclose(flex, sdpa, atol=ATOL)


def test_dense_mask_is_the_mask_built_before():
    """TokenState.attn_bias (the SDPA mask) is what it was before the spec existed:
    size_bias plus the causal / padding mask, value for value."""
    state = TokenState(num_protected=1)
    state.size = torch.tensor([[[1.0], [3.0], [2.0], [1.0]], [[2.0], [1.0], [1.0], [4.0]]])
    state.pos = torch.tensor([[0, 3, 1, 2], [0, 2, 1, 3]])
    state.valid = torch.tensor([[True, True, True, False], [True] * 4])
    for dtype in (torch.float32, torch.bfloat16):
        allowed = (state.pos[:, None, :] <= state.pos[:, :, None]) & state.valid[:, None, :]
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
        want = mask.unsqueeze(1) + size_bias(state.size, dtype)
        got = state.attn_bias(dtype)
        assert got.dtype == dtype and torch.equal(got, want)
    spec = state.attn_spec()
    assert spec.key_bias.shape == (2, 4) and spec.pos is state.pos and spec.masked
    assert state.attn_spec(prop_attn=False).key_bias is None
    state.valid = torch.ones(2, 4, dtype=torch.bool)
    state.pos = None
    state._mask = None  # (as a compaction does)
    assert state.attn_spec(prop_attn=False) is None  # no padding, no causality, no bias


def test_block_masks_are_built_once_per_token_set():
    spec = _spec(2, 19, causal=True, padding=True)
    q, k, v = _qkv(2, 19)
    attend(q, k, v, spec, backend="flex")
    again = spec.with_bias(None)  # another layer's spec of the same tokens
    assert again.block_mask(19, 19, q.device) is spec.block_mask(19, 19, q.device)
    assert spec.cache.block_key == (19, 19, "cpu")


def test_backend_resolution():
    spec = _spec(1, 5)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, spec) == "sdpa"
    assert resolve_backend("flex", cpu, spec) == "flex"
    assert resolve_backend("sdpa", cuda, spec) == "sdpa"
    # on CUDA (with Triton) auto is flex when something biases or masks, else plain SDPA
    assert resolve_backend("auto", cuda, spec) == ("flex" if attention._flex_compiles() else "sdpa")
    assert resolve_backend("auto", cuda, None) == "sdpa"
    assert resolve_backend("flex", cuda, AttnSpec()) == "sdpa"  # nothing to fuse: plain SDPA
    with pytest.raises(ValueError, match=r"attn_backend must be one of \['auto', 'sdpa', 'flex'\]"):
        resolve_backend("flash", cpu, spec)


def test_forced_flex_falls_back_with_a_reason(flex_calls, monkeypatch):
    """Where flex cannot run (a CPU backward, dropout) the same attention runs with SDPA and
    a forced 'flex' says why, once per reason."""
    monkeypatch.setattr(attention, "_WARNED", set())
    q, k, v = _qkv(2, 11)
    spec = _spec(2, 11, causal=True, padding=True)
    qg = q.clone().requires_grad_()
    with pytest.warns(UserWarning, match="no backward on the CPU"):
        out = attend(qg, k, v, spec, backend="flex")
    out.sum().backward()
    assert qg.grad is not None and not flex_calls
    assert torch.allclose(out, _reference(q, k, v, spec).float(), atol=ATOL)
    with pytest.warns(UserWarning, match="no attention dropout"):
        attend(q, k, v, spec, dropout_p=0.1, backend="flex")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attend(q, k, v, spec, dropout_p=0.1, backend="flex")  # said once
        attend(q, k, v, spec, dropout_p=0.1, backend="auto")  # auto picks SDPA silently
    assert not flex_calls


# ---- the setting ---------------------------------------------------------------------------


def _vit(seed: int = 0, fused: bool = True):
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4,
                              embed_dim=48, num_heads=2).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model


def _images(batch=2, size=64, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_setting_is_validated_alike_by_config_patch_and_configure():
    message = r"attn_backend must be one of \['auto', 'sdpa', 'flex'\], got 'flash'"
    assert vlprune.ReductionConfig().attn_backend == "auto"
    with pytest.raises(ValueError, match=message):
        vlprune.ReductionConfig(attn_backend="flash")
    model = _vit()
    with pytest.raises(ValueError, match=message):
        vlprune.patch(model, merge_r=2, attn_backend="flash")
    assert not vlprune.is_patched(model)
    vlprune.patch(model, merge_r=2)
    ctx = model._vlprune
    with pytest.raises(ValueError, match=message):
        vlprune.configure(model, attn_backend="flash")
    assert vlprune.get_config(model).attn_backend == "auto" and model._vlprune is ctx


def test_configure_switches_the_backend_in_place(flex_calls):
    x = _images()
    model = vlprune.patch(_vit(), merge_r=3, prune_keep=0.7, prune_layers=(1,))
    ctx = model._vlprune
    with torch.no_grad():
        auto = model(x)
        assert not flex_calls
        vlprune.configure(model, attn_backend="flex")
        assert model._vlprune is ctx and ctx.config.attn_backend == "flex"  # no re-patch
        flex = model(x)
    assert flex_calls
    fresh = vlprune.patch(_vit(), merge_r=3, prune_keep=0.7, prune_layers=(1,), attn_backend="flex")
    with torch.no_grad():
        assert torch.equal(fresh(x), flex)
    assert torch.allclose(flex, auto, atol=ATOL)
    d = vlprune.describe(model, x)  # FlopCounterMode: flex's attention is counted as SDPA's
    assert "attn_backend='flex'" in str(d).splitlines()[0]
    assert d.config["attn_backend"] == "flex"
    vlprune.configure(model, attn_backend="sdpa")
    assert vlprune.describe(model, x).flops == d.flops


# ---- every wired family: flex == sdpa, auto == sdpa bit for bit ------------------------------


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor) and t.dim() > 0]
    return [v for k, v in out.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and k != "loss"]


def _run(model, inputs):
    with torch.no_grad():
        return _tensors(model(**inputs) if isinstance(inputs, dict) else model(inputs))


def _compare_backends(build, inputs, flex_calls, **settings):
    """Outputs of the three backends on fresh patches of the same model; flex must really run
    (and only under 'flex')."""
    outs = {}
    for backend in ("sdpa", "auto", "flex"):
        flex_calls.clear()
        model = vlprune.patch(build(), attn_backend=backend, **settings)
        outs[backend] = _run(model, inputs)
        assert bool(flex_calls) == (backend == "flex"), (backend, flex_calls)
    assert all(torch.equal(a, b) for a, b in zip(outs["auto"], outs["sdpa"]))
    for a, b in zip(outs["flex"], outs["sdpa"]):
        assert a.shape == b.shape and torch.allclose(a, b, atol=ATOL), (a - b).abs().max()
    unpatched = _run(build(), inputs)
    assert any(a.shape != b.shape or not torch.allclose(a, b, atol=1e-3)
               for a, b in zip(outs["flex"], unpatched))  # the settings did reduce
    return outs


@pytest.mark.parametrize("fused", [True, False])
def test_timm(fused, flex_calls):
    _compare_backends(lambda: _vit(fused=fused), _images(), flex_calls,
                      merge_r=3, prune_keep=0.7, prune_layers=(1,))


def _text_family(name):
    pytest.importorskip("open_clip")
    from test_text_towers import FAMILIES, _lengths

    fam = FAMILIES[name]

    def build():
        torch.manual_seed(0)
        return fam.build().eval()

    return fam, build, fam.inputs(_lengths(3, 1), seed=0)


@pytest.mark.parametrize("name", ["clip", "text_padmask", "hf_clip", "hf_siglip"])
def test_text_and_two_tower_models(name, flex_calls):
    """open_clip CLIP (both towers, causal text), a bidirectional open_clip text tower with a
    padding mask, HF CLIP (causal, padded) and SigLIP (bidirectional) two-tower models."""
    fam, build, inputs = _text_family(name)
    settings = dict(merge_r=1, text_prune_keep=0.7, text_prune_layers=(1,))
    if fam.two_towers:
        settings.update(prune_keep=0.7, prune_layers=(1,))
        if not fam.class_token:
            settings["prune_score"] = "attn_entropy"
    else:
        settings = dict(merge_r=1, prune_keep=0.7, prune_layers=(1,))
    _compare_backends(build, inputs, flex_calls, **settings)


@pytest.mark.parametrize("kind, impl", [("clip", "sdpa"), ("siglip", "eager")])
def test_hf_vision_towers(kind, impl, flex_calls):
    transformers = pytest.importorskip("transformers")
    prefix = "CLIP" if kind == "clip" else "Siglip"
    cfg = getattr(transformers, f"{prefix}VisionConfig")(
        image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, attn_implementation=impl)

    def build():
        torch.manual_seed(0)
        return getattr(transformers, f"{prefix}VisionModel")(cfg).eval()

    score = "cls_attn" if kind == "clip" else "key_norm"
    _compare_backends(build, _images(), flex_calls, merge_r=2, prune_keep=0.7, prune_layers=(1,),
                      prune_score=score)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert(impl, flex_calls):
    pytest.importorskip("transformers")
    from test_hf_bert import _batch, _bert

    ids, mask = _batch()
    inputs = dict(input_ids=ids, attention_mask=mask)
    _compare_backends(lambda: _bert(impl), inputs, flex_calls,
                      merge_r=1, prune_keep=0.7, prune_layers=(1,))


def test_llava_vision_tower(flex_calls):
    pytest.importorskip("transformers")
    from test_llava_tower import _build, _pixels

    pixels = _pixels()
    outs = {}
    for backend in ("sdpa", "flex"):
        flex_calls.clear()
        model = vlprune.patch(_build("clip", layers=5), merge_r=2, prune_keep=0.7,
                              prune_layers=(1,), attn_backend=backend)
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values=pixels, return_dict=True)
        outs[backend] = torch.stack(list(out.pooler_output))
        assert bool(flex_calls) == (backend == "flex")
    assert outs["flex"].shape == outs["sdpa"].shape
    assert torch.allclose(outs["flex"], outs["sdpa"], atol=ATOL)


def test_flex_is_refused_where_no_attention_would_use_it():
    pytest.importorskip("transformers")
    from llava_family_models import build
    from test_llava_tower import _build

    with pytest.raises(ValueError, match="attn_backend='flex'") as refused:
        vlprune.patch(build("llava_next"), visual_keep=0.5, attn_backend="flex")
    assert "LlavaForConditionalGeneration" in str(refused.value)
    model = _build("clip", layers=3)
    with pytest.raises(ValueError, match="these settings reduce no tokens inside the vision tower"):
        vlprune.patch(model, visual_keep=4, attn_backend="flex")
    assert not vlprune.is_patched(model)
    vlprune.patch(model, visual_keep=4, attn_backend="sdpa")  # what the model does anyway
    with pytest.raises(ValueError, match="attn_backend='flex'"):
        vlprune.configure(model, attn_backend="flex")
    assert vlprune.get_config(model).attn_backend == "sdpa"
    from vlprune.models_qwen import build_qwen2_5_vl  # its tower is never patched

    with pytest.raises(ValueError, match="attn_backend not supported on Qwen2_5_VL"):
        vlprune.patch(build_qwen2_5_vl("tiny"), visual_keep=0.5, attn_backend="flex")


# ---- GPU: the compiled kernel ----------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.float16, 2e-3),
                                         (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", ["key_bias", "all"])
def test_cuda_flex_equals_sdpa(dtype, atol, case, flex_calls):
    B, N = 3, 197
    q, k, v = _qkv(B, N, H=4, D=64, dtype=dtype, device="cuda")
    spec = _spec(B, N, seed=B, device="cuda", **CASES[case])
    flex = attend(q, k, v, spec, backend="auto")
    assert flex_calls and "cuda" in attention._COMPILED  # auto ran the compiled kernel
    sdpa = attend(q, k, v, spec, backend="sdpa")
    want = _reference(q.cpu(), k.cpu(), v.cpu(), _moved(spec, "cpu"))
    assert flex.dtype == dtype
    assert torch.allclose(flex.float().cpu(), want.float(), atol=atol)
    assert torch.allclose(flex.float(), sdpa.float(), atol=atol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_auto_picks_flex_end_to_end(dtype, flex_calls):
    x = _images(4).to("cuda", dtype)
    outs = {}
    for backend in ("auto", "sdpa"):
        flex_calls.clear()
        model = vlprune.patch(_vit().to("cuda", dtype), merge_r=3, attn_backend=backend)
        outs[backend] = _run(model, x)[0].float()
        assert bool(flex_calls) == (backend == "auto")
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(outs["auto"], outs["sdpa"], atol=tol, rtol=tol)
