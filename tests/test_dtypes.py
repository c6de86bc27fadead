"""Low precision and CUDA checks of a patched timm ViT (torch.compile: tests/test_compile.py)."""

from __future__ import annotations

import pytest
import torch

import vlprune

timm = pytest.importorskip("timm")

SETTING = dict(merge_r=3, prune_keep=0.5, prune_layers=(2,), prune_recycle=True)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _pair(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    ref = timm.create_model("test_vit", img_size=96).eval()
    low = timm.create_model("test_vit", img_size=96).eval()
    low.load_state_dict(ref.state_dict())
    vlprune.patch(ref, **SETTING)
    vlprune.patch(low.to(device=device, dtype=dtype), **SETTING)
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    return ref, low, x


def test_bfloat16_on_cpu_tracks_float32():
    ref, low, x = _pair(torch.bfloat16)
    with torch.no_grad():
        expected = ref(x)
        out = low(x.bfloat16()).float()
    assert torch.isfinite(out).all()
    # low precision may flip a near-tie in the matching, so compare directions, not values
    assert torch.nn.functional.cosine_similarity(out, expected, dim=-1).min() > 0.99
    assert low._vlprune.state.size.dtype == torch.float32  # sizes are counts: float32 always


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_tracks_float32(dtype):
    ref, low, x = _pair(dtype, "cuda")
    with torch.no_grad():
        expected = ref(x)
        out = low(x.to("cuda", dtype)).float().cpu()
    assert torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out, expected, dim=-1).min() > 0.99


@pytest.mark.gpu
@needs_cuda
def test_cuda_sdpa_backends_with_size_bias():
    """The proportional-attention bias is a float mask: every SDPA backend that accepts one
    must give the same result as the math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, low, x = _pair(torch.float16, "cuda")
    vlprune.configure(low, attn_backend="sdpa")  # "auto" takes FlexAttention on CUDA
    x = x.to("cuda", torch.float16)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        expected = low(x).float()
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with torch.no_grad(), sdpa_kernel(backend):
                out = low(x).float()
        except RuntimeError as e:  # backend not available for this shape / mask
            pytest.skip(f"{backend} unavailable: {e}")
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
