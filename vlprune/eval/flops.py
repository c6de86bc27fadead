"""Theoretical FLOP counts of a forward pass, from operator shapes.

Built on :class:`torch.utils.flop_counter.FlopCounterMode`, with formulas added for fused
attention kernels that some torch versions leave uncounted (the CPU flash kernel, the
"overrideable" fused kernel used by out-of-tree backends, and the
``nn.MultiheadAttention`` fast path). Without them a model with fused attention reads fewer
FLOPs than the same model with the unfused path, which would make a token-reduction method
look better or worse depending only on the attention backend.

Counts follow torch's convention: one multiply-add is 2 FLOPs; only matmul-like work
(linear, conv, attention products) is counted, not softmax, norms or elementwise ops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["count_flops", "count_model_flops", "flop_formulas"]


def _sdpa_formula(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                  **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    # The mask, dropout and causal flag do not change the matmul work the kernel does.
    return sdpa_flop_count(query, key, value)


def _native_mha_formula(query: Any, key: Any, value: Any, embed_dim: int, num_head: int,
                        *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # nn.MultiheadAttention's eval fast path runs the q/k/v projections, both attention
    # products and the output projection inside one kernel, so none of them reach the
    # dispatcher on their own. Shapes are (batch, length, embed_dim).
    if len(query) != 3 or len(key) != 3:
        raise ValueError(
            f"_native_multi_head_attention with query shape {tuple(query)} and key shape "
            f"{tuple(key)}: expected 3-d (batch, length, embed_dim) inputs"
        )
    b, len_q, e = query
    len_k = key[1]
    projections = 2 * b * e * embed_dim * (len_q + 2 * len_k)
    attention = 2 * 2 * b * len_q * len_k * embed_dim
    out_projection = 2 * b * len_q * embed_dim * embed_dim
    return projections + attention + out_projection


def flop_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas this module adds to ``FlopCounterMode`` (op packet -> shape formula).

    Only ops that exist in the running torch are included. Each formula takes the op's
    arguments with tensors replaced by their shapes, plus ``out_shape=``, the signature
    ``FlopCounterMode(custom_mapping=...)`` calls it with.
    """
    aten = torch.ops.aten
    formulas: dict[Any, Callable[..., int]] = {}
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    ):
        if hasattr(aten, name):
            formulas[getattr(aten, name)] = _sdpa_formula
    if hasattr(aten, "_native_multi_head_attention"):
        formulas[aten._native_multi_head_attention] = _native_mha_formula
    return formulas


def count_flops(fn: Callable[[], Any],
                custom_mapping: Mapping[Any, Callable[..., int]] | None = None) -> int:
    """Run ``fn()`` once under ``torch.no_grad()`` and return the FLOPs it performed.

    ``custom_mapping`` adds or overrides formulas (op packet -> formula, same signature as
    in :func:`flop_formulas`).
    """
    from torch.utils.flop_counter import FlopCounterMode

    mapping = flop_formulas()
    if custom_mapping:
        mapping.update(custom_mapping)
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.no_grad(), counter:
        fn()
    return int(counter.get_total_flops())


def count_model_flops(model: torch.nn.Module,
                      inputs: torch.Tensor | Sequence[Any]) -> int:
    """FLOPs of ``model(*inputs)`` (``inputs`` may be a single tensor) under ``no_grad``."""
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return count_flops(lambda: model(*args))
