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


def register_output_capture(model: nn.Module) -> None:
    """transformers looks up what ``output_hidden_states`` / ``output_attentions`` record by the
    model's class name; register the swapped class under the upstream entry."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # other transformers versions: nothing keyed on the class
        return
    _CAN_RECORD_REGISTRY[model] = getattr(model, "_can_record_outputs", None)
