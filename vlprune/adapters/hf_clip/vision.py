"""Hugging Face transformers 5.x image towers: ``CLIPVisionModel``,
``CLIPVisionModelWithProjection`` and ``SiglipVisionModel`` (also when the tower is the
``vision_model`` of a ``CLIPModel`` / ``SiglipModel``), and the image classifiers on them,
``CLIPForImageClassification`` and ``SiglipForImageClassification``.

Reduction point: inside each ``CLIPEncoderLayer`` / ``SiglipEncoderLayer``, between the
attention branch and the MLP branch, as for timm. What is patched (by
:func:`patch_hf_vision_tower`, one vision tower at a time):

* the tower: ``forward`` starts a fresh token state (CLIP's class token is protected; SigLIP
  has none). ``last_hidden_state`` is the reduced sequence; CLIP pools the class token as
  upstream does; ``output_hidden_states`` gives one tensor per layer, each as long as that
  layer's sequence;
* each encoder layer: the copied forward with the reduction step in between;
* each ``CLIPAttention`` / ``SiglipAttention``: only when its layer needs q, k, v or passes the
  size bias, the copied projections and the configured attention function with ``log(size)``
  as the additive ``attention_mask``; otherwise the upstream forward runs untouched;
* SigLIP's ``SiglipMultiheadAttentionPoolingHead``: after merging (with ``prop_attn``), its probe
  attends with the size bias, so a merged token weighs as much as the tokens it holds;
* an image classifier: its mean of the patch tokens is weighted by their sizes.

Refused: proportional attention with an attention implementation other than ``eager`` or
``sdpa`` (flash attention takes no additive bias), an ``attention_mask`` while reducing,
encoder layers, attention modules or pooling heads other than the upstream ones. This
adapter matches the vision models only, not a whole ``CLIPModel`` / ``SiglipModel`` (patch
``model.vision_model``); adapters of two-tower models and LLaVA
(:mod:`vlprune.adapters.llava.tower`) reuse :func:`check_hf_vision_tower` and
:func:`patch_hf_vision_tower` for the image tower.

The layer and attention mixins are shared with the text towers (:mod:`.layers`); the text
towers and the two-tower models are in :mod:`.text` and :mod:`vlprune.adapters.hf_clip`.

transformers is imported lazily: ``import vlprune`` does not need it.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn

from ...config import ReductionConfig
from ...core.attention import size_bias
from ...core.scores import NEEDS_CLASS_TOKEN
from ..base import (
    Adapter,
    PatchContext,
    RootMixin,
    UnsupportedModelError,
    class_path_in_mro,
    config_prunes,
    hf_image_input_size,
    swap_class,
    upstream_arguments,
)
from ..hf_common import BIAS_IMPLEMENTATIONS, same_forward
from ..step import pool_sizes, weighted_mean
from .layers import (
    CLIP,
    SIGLIP,
    AttentionMixin,
    EncoderLayerMixin,
    bias_refusal,
    check_encoder,
    inner_tower,
    take_cached,
    tower_family,
)

# vision tower class path -> (modeling module, class-name prefix of its parts)
_TOWERS = {
    f"{CLIP}.CLIPVisionModel": (CLIP, "CLIP"),
    f"{SIGLIP}.SiglipVisionModel": (SIGLIP, "Siglip"),
}
_WITH_PROJECTION = (f"{CLIP}.CLIPVisionModelWithProjection",)
# image classifiers on a vision tower (``vision_model``): mean of the patch tokens, a linear head
_CLASSIFIERS = (f"{CLIP}.CLIPForImageClassification", f"{SIGLIP}.SiglipForImageClassification")

SUPPORTED = (
    "transformers>=5 CLIPVisionModel, CLIPVisionModelWithProjection, SiglipVisionModel, "
    "CLIPForImageClassification, SiglipForImageClassification (also CLIPModel.vision_model / "
    "SiglipModel.vision_model) with the upstream encoder layers, eager or sdpa attention "
    "(flash/flex only with prop_attn=False)"
)


def vision_tower(model: nn.Module) -> nn.Module:
    """The ``CLIPVisionModel`` / ``SiglipVisionModel`` that holds the encoder of ``model``."""
    return inner_tower(model, _WITH_PROJECTION + _CLASSIFIERS, "vision_model")


def _upstream(tower: nn.Module) -> tuple[str, str]:
    return tower_family(tower, _TOWERS, "vision", SUPPORTED)


def _has_class_token(tower: nn.Module) -> bool:
    return getattr(tower.embeddings, "class_embedding", None) is not None


def _uses_bias(config: ReductionConfig) -> bool:
    return config.prop_attn and not config.is_identity


def check_hf_vision_tower(tower: nn.Module, config: ReductionConfig, guided: bool = False) -> None:
    """Raise :class:`UnsupportedModelError` (or ``ValueError`` for settings this tower cannot
    run) unless :func:`patch_hf_vision_tower` can patch ``tower`` for ``config``. A ``guided``
    tower's pruning scores come from the other modality, not from ``prune_score``."""
    module_name, prefix = _upstream(tower)
    mod = importlib.import_module(module_name)
    check_encoder(tower, mod, prefix, "embeddings", SUPPORTED)
    impl = tower.config._attn_implementation
    if _uses_bias(config) and impl not in BIAS_IMPLEMENTATIONS:
        raise UnsupportedModelError(bias_refusal(impl))
    head = getattr(tower, "head", None) if getattr(tower, "use_head", False) else None
    if head is not None:
        head_cls = getattr(mod, f"{prefix}MultiheadAttentionPoolingHead", None)
        mha = getattr(head, "attention", None)
        if head_cls is None or not isinstance(head, head_cls) or not same_forward(
            head, head_cls
        ) or not (isinstance(mha, nn.MultiheadAttention) and mha.batch_first):
            raise UnsupportedModelError(
                f"pooling head {type(head).__qualname__} is not the upstream "
                "SiglipMultiheadAttentionPoolingHead, so merged tokens could not be weighted "
                "by their size"
            )
    prunes = config_prunes(config) and not guided
    if prunes and config.prune_score in NEEDS_CLASS_TOKEN and not _has_class_token(tower):
        raise ValueError(
            f"prune_score={config.prune_score!r} ranks tokens by class-token attention, but this "
            "model has no class token; use one of 'key_norm', 'attn_entropy', 'diversity', 'random'"
        )


def patch_hf_vision_tower(tower: nn.Module, ctx: PatchContext, mixin: type | None = None) -> None:
    """Swap the classes of one CLIP / SigLIP vision tower (checked by
    :func:`check_hf_vision_tower`) so it reduces tokens as ``ctx`` says.

    The tower starts the token state of ``ctx`` in its own ``forward``; the caller puts ``ctx``
    on its root module as ``_vlprune``. The schedule indexes the tower's encoder layers.
    ``mixin`` (a subclass of the tower mixin, e.g. LLaVA's, which checks the hidden states a
    call reads) replaces the tower's default mixin.
    """
    module_name, prefix = _upstream(tower)
    mixin = VisionTowerMixin if mixin is None else mixin
    if not issubclass(mixin, VisionTowerMixin):
        raise TypeError(f"mixin must subclass {VisionTowerMixin.__qualname__}, got {mixin!r}")
    swap_class(tower, mixin, ctx, num_protected=int(_has_class_token(tower)))
    for i, layer in enumerate(tower.encoder.layers):
        swap_class(layer, EncoderLayerMixin, ctx, layer=i)
        swap_class(layer.self_attn, AttentionMixin, ctx, upstream=module_name)
    head = getattr(tower, "head", None) if getattr(tower, "use_head", False) else None
    if head is not None:
        swap_class(head, _PoolingHeadMixin, ctx)


class VisionTowerMixin(RootMixin):
    """Patched ``CLIPVisionModel`` / ``SiglipVisionModel``: starts the token state."""

    @property
    def _vlprune(self) -> PatchContext:
        # RootMixin reads the context here; a tower inside a larger patched model is not the
        # root (which holds ``_vlprune``), so read the reference every patched module holds
        return self.__dict__["_vlprune_ctx"]

    def forward(self, *args, **kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        cached = take_cached(self._vlprune_ctx, (pixels,))  # a guided forward ran it already
        if cached is not None:
            return cached
        self._vlprune_start(self._vlprune_num_protected)
        return super().forward(*args, **kwargs)


class _PoolingHeadMixin:
    """Patched ``SiglipMultiheadAttentionPoolingHead``: the probe attends with the size bias
    once tokens are merged; otherwise the upstream forward runs."""

    def forward(self, hidden_state: Tensor) -> Tensor:
        ctx: PatchContext = self._vlprune_ctx
        # raises on tokens that are not the latest forward's (their sizes would be wrong)
        sizes = pool_sizes(ctx, hidden_state) if ctx.config.prop_attn else None
        if sizes is None:
            return super().forward(hidden_state)
        size = sizes[1]
        # Follows SiglipMultiheadAttentionPoolingHead.forward (transformers 5.23); the float
        # mask (B * heads, 1 probe, N) adds log(size) to every key's logit.
        batch_size = hidden_state.shape[0]
        probe = self.probe.repeat(batch_size, 1, 1)
        bias = size_bias(size, hidden_state.dtype)[:, 0]  # (B, 1, N)
        mask = bias.repeat_interleave(self.attention.num_heads, dim=0)
        hidden_state = self.attention(probe, hidden_state, hidden_state, attn_mask=mask)[0]
        residual = hidden_state
        hidden_state = self.layernorm(hidden_state)
        hidden_state = residual + self.mlp(hidden_state)
        return hidden_state[:, 0]


class ImageClassifierMixin(RootMixin):
    """Patched ``CLIPForImageClassification`` / ``SiglipForImageClassification``: upstream
    forward unless the tower reduces; then upstream's mean of the patch tokens is weighted by
    their sizes (a merged token counts for every token it holds)."""

    def forward(self, *args, **kwargs):
        ctx: PatchContext = self._vlprune
        if not ctx.reduces:
            return super().forward(*args, **kwargs)
        from transformers.modeling_outputs import ImageClassifierOutput

        # Follows CLIPForImageClassification.forward / SiglipForImageClassification.forward
        # (transformers 5.25) and their can_return_tuple decorator.
        named = upstream_arguments(self, "forward", args, kwargs)
        return_dict = named.pop("return_dict", None)
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        labels = named.pop("labels", None)
        outputs = self.vision_model(named.pop("pixel_values", None), **named)
        tokens = outputs.last_hidden_state
        start = self.vision_model._vlprune_num_protected  # CLIP leaves out its class token
        sizes = pool_sizes(ctx, tokens)
        if sizes is None:
            pooled = torch.mean(tokens[:, start:, :], dim=1)
        else:
            pooled = weighted_mean(tokens[:, start:], sizes[0][:, start:])
        logits = self.classifier(pooled)
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                    attentions=outputs.attentions)
        return out if return_dict else out.to_tuple()


class HFClipVisionAdapter(Adapter):
    """``hf_clip_vision``: a CLIP / SigLIP vision model (registered by the package)."""

    name = "hf_clip_vision"
    supported = SUPPORTED

    def matches(self, model: nn.Module) -> bool:
        paths = class_path_in_mro(model)
        return any(p in _TOWERS or p in _WITH_PROJECTION or p in _CLASSIFIERS for p in paths)

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        check_hf_vision_tower(vision_tower(model), config)

    def num_layers(self, model: nn.Module) -> int:
        return len(vision_tower(model).encoder.layers)

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        if any(p in _CLASSIFIERS for p in class_path_in_mro(model)):
            swap_class(model, ImageClassifierMixin, ctx)
        patch_hf_vision_tower(vision_tower(model), ctx)
        model.__dict__["_vlprune"] = ctx

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        return hf_image_input_size(vision_tower(model).config)
