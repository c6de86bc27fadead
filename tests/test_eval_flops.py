"""FLOP counting: fused and unfused attention must read the same, and match the shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprune.eval.flops import count_flops, count_model_flops, flop_formulas

timm = pytest.importorskip("timm")

torch.set_num_threads(2)


def _set_fused(model: torch.nn.Module, fused: bool) -> None:
    n = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
            n += 1
    assert n > 0, "no attention module with a fused_attn switch"


def _vit_flops_by_hand(model: torch.nn.Module, batch: int) -> int:
    # Matmul work of a plain timm ViT from its dimensions: patch conv, per block qkv,
    # q@k and attn@v, output projection and the two MLP layers, then the head.
    d = model.embed_dim
    patches = model.patch_embed.num_patches
    ph, pw = model.patch_embed.patch_size
    t = patches + model.num_prefix_tokens
    total = 2 * patches * d * 3 * ph * pw
    for block in model.blocks:
        hidden = block.mlp.fc1.out_features
        total += 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * hidden
    total += 2 * d * model.num_classes
    return batch * total


@pytest.mark.parametrize("fused", [True, False])
def test_test_vit_matches_hand_count(fused: bool) -> None:
    model = timm.create_model("test_vit", pretrained=False).eval()
    _set_fused(model, fused)
    x = torch.randn(3, 3, 160, 160)
    assert count_model_flops(model, x) == _vit_flops_by_hand(model, 3)


def test_vit_base_reads_reference_gflops_fused_and_unfused() -> None:
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    fused = count_model_flops(model, x)
    _set_fused(model, False)
    unfused = count_model_flops(model, (x,))
    assert fused == unfused
    # Reference: 35.1 GFLOPs for ViT-B/16 at 224 px (2 FLOPs per multiply-add).
    assert fused / 1e9 == pytest.approx(35.13, abs=0.05)


def test_cpu_fused_sdpa_is_counted() -> None:
    b, h, s, d = 2, 4, 33, 16
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    flops = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert flops == 2 * 2 * b * h * s * s * d


def test_formulas_cover_cpu_fused_attention() -> None:
    formulas = flop_formulas()
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in formulas
    fn = formulas[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu]
    # FlopCounterMode passes shapes, non-tensor args as they are, and out_shape=.
    q = torch.Size([1, 2, 5, 8])
    k = torch.Size([1, 2, 7, 8])
    assert fn(q, k, k, 0.0, False, attn_mask=None, scale=None, out_shape=None) == 2 * 2 * 2 * 5 * 7 * 8


def test_multihead_attention_fast_path_counts_like_slow_path() -> None:
    e, heads, b, n = 64, 4, 2, 10
    mha = torch.nn.MultiheadAttention(e, heads, batch_first=True)
    x = torch.randn(b, n, e)

    def run() -> None:
        mha(x, x, x, need_weights=False)

    mha.train()  # the fast path is off in train mode, so every matmul is seen separately
    slow = count_flops(run)
    mha.eval()
    fast = count_flops(run)
    assert slow == 2 * b * n * e * 3 * e + 2 * 2 * b * n * n * e + 2 * b * n * e * e
    assert fast == slow


def test_runs_without_grad_and_scales_with_batch() -> None:
    model = timm.create_model("test_vit", pretrained=False).eval()
    seen = []

    def fn() -> None:
        seen.append(torch.is_grad_enabled())
        model(torch.randn(2, 3, 160, 160))

    two = count_flops(fn)
    assert seen == [False]
    assert count_model_flops(model, torch.randn(4, 3, 160, 160)) == 2 * two


def test_custom_mapping_overrides() -> None:
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    assert count_flops(lambda: a @ b) == 2 * 3 * 4 * 5
    custom = {torch.ops.aten.mm: lambda *args, out_shape=None, **kw: 7}
    assert count_flops(lambda: a @ b, custom_mapping=custom) == 7
