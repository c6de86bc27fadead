"""What the Hugging Face transformers adapters share (transformers is imported lazily)."""

from __future__ import annotations

import inspect

from torch import nn

# attention implementations that add a float attention_mask to the logits (ALL_ATTENTION_FUNCTIONS)
BIAS_IMPLEMENTATIONS = (None, "eager", "sdpa")


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def same_forward(module: nn.Module, cls: type) -> bool:
    """``module`` runs ``cls``'s own forward. transformers wraps every
    GradientCheckpointingLayer subclass's forward: compare the functions inside the wrappers."""
    return inspect.unwrap(type(module).forward) is inspect.unwrap(cls.forward)

