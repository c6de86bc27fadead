"""FastV inside the Qwen-VL language model (placeholder until implemented)."""

from __future__ import annotations

from torch import nn

from ...config import ReductionConfig


def check_llm(model: nn.Module, config: ReductionConfig) -> None:
    """Refuse ``llm_keep`` (FastV) on Qwen-VL models."""
    raise ValueError(
        f"llm_layer / llm_keep (FastV) not supported on {type(model).__name__} yet; use "
        "visual_keep (reduction before the language model)"
    )
