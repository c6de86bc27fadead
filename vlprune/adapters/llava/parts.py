"""Where a LLaVA's parts are: the model that holds the vision tower, projector and language
model is ``model.model`` of a ``*ForConditionalGeneration`` and the model itself for a base
model (``LlavaModel``, ``LlavaNextModel``, ...), which has no language-model head."""

from __future__ import annotations

from torch import nn


def inner_model(model: nn.Module) -> nn.Module:
    """The base model of a LLaVA: the one holding ``vision_tower`` and ``language_model``."""
    return model if "vision_tower" in model._modules else model.model


def is_base_model(model: nn.Module) -> bool:
    """True for a base LLaVA model (no language-model head, no ``generate``)."""
    return inner_model(model) is model
