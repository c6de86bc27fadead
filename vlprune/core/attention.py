"""Attention helpers that keep the fused ``scaled_dot_product_attention`` kernel.

Proportional attention (ToMe): a token that stands for ``s`` input tokens should receive ``s``
times the attention mass, which is the same as adding ``log(s)`` to its key's logits. That bias
goes into the fused kernel as an additive float mask, so no N x N matrix is built in Python.
"""

from __future__ import annotations

import torch
from torch import Tensor


def size_bias(size: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``log(size)`` of ``(B, N, 1)`` token sizes as an additive key bias of shape ``(B, 1, 1, N)``."""
    bias = size.log().transpose(1, 2).unsqueeze(1)
    return bias if dtype is None else bias.to(dtype)


def combine_masks(attn_mask: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Add a float ``bias`` to an SDPA-style ``attn_mask`` (bool: True = attend, or float)."""
    if bias is None:
        return attn_mask
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
            ~attn_mask, float("-inf")
        )
    return attn_mask + bias
