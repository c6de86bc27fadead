"""Hugging Face transformers 5.x image towers: ``CLIPVisionModel``,
``CLIPVisionModelWithProjection`` and ``SiglipVisionModel`` (also when the tower is the
``vision_model`` of a ``CLIPModel`` / ``SiglipModel``).

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
  attends with the size bias, so a merged token weighs as much as the tokens it holds.

Refused: proportional attention with an attention implementation other than ``eager`` or
``sdpa`` (flash attention takes no additive bias), an ``attention_mask`` while reducing,
encoder layers, attention modules or pooling heads other than the upstream ones, gradient
checkpointing while reducing. This adapter matches the vision models only, not a whole
``CLIPModel`` / ``SiglipModel`` (patch ``model.vision_model``); adapters of two-tower models
reuse :func:`check_hf_vision_tower` and :func:`patch_hf_vision_tower` for the image tower.

transformers is imported lazily: ``import vlprune`` does not need it.
"""

from __future__ import annotations

import importlib
import inspect
import sys

from torch import Tensor, nn

from ..config import ReductionConfig
from ..core.attention import combine_masks, size_bias
from ..core.scores import NEEDS_CLASS_TOKEN, AttnInputs
from .base import (
    Adapter,
    PatchContext,
    RootMixin,
    UnsupportedModelError,
    class_path_in_mro,
    register_adapter,
    swap_class,
)
from .step import enter_block, reduce_step

_CLIP = "transformers.models.clip.modeling_clip"
_SIGLIP = "transformers.models.siglip.modeling_siglip"
# vision tower class path -> (modeling module, class-name prefix of its parts)
_TOWERS = {
    f"{_CLIP}.CLIPVisionModel": (_CLIP, "CLIP"),
    f"{_SIGLIP}.SiglipVisionModel": (_SIGLIP, "Siglip"),
}
_WITH_PROJECTION = (f"{_CLIP}.CLIPVisionModelWithProjection",)
_LAYER_PARTS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")
# attention implementations that add a float attention_mask to the logits (ALL_ATTENTION_FUNCTIONS)
BIAS_IMPLEMENTATIONS = (None, "eager", "sdpa")

SUPPORTED = (
    "transformers>=5 CLIPVisionModel, CLIPVisionModelWithProjection, SiglipVisionModel (also "
    "CLIPModel.vision_model / SiglipModel.vision_model) with the upstream encoder layers, "
    "eager or sdpa attention (flash/flex only with prop_attn=False)"
)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def vision_tower(model: nn.Module) -> nn.Module:
    """The ``CLIPVisionModel`` / ``SiglipVisionModel`` that holds the encoder of ``model``."""
    if any(p in _WITH_PROJECTION for p in class_path_in_mro(model)):
        return model.vision_model
    return model


def _upstream(tower: nn.Module) -> tuple[str, str]:
    """``(modeling module name, class prefix)`` of the tower's family."""
    for path in class_path_in_mro(tower):
        if path in _TOWERS:
            return _TOWERS[path]
    raise UnsupportedModelError(
        f"{type(tower).__qualname__} is not a CLIP or SigLIP vision tower. Supported: {SUPPORTED}"
    )


def _same_forward(module: nn.Module, cls: type) -> bool:
    # transformers wraps every GradientCheckpointingLayer subclass's forward: compare the
    # functions inside the wrappers
    return inspect.unwrap(type(module).forward) is inspect.unwrap(cls.forward)


def _has_class_token(tower: nn.Module) -> bool:
    return getattr(tower.embeddings, "class_embedding", None) is not None


def _uses_bias(config: ReductionConfig) -> bool:
    return config.prop_attn and not config.is_identity


def _bias_refusal(impl: str | None) -> str:
    return (
        f"proportional attention adds log(size) to the attention logits, which the {impl!r} "
        "attention implementation cannot take; use attn_implementation='sdpa' or 'eager' "
        "(model.set_attn_implementation('sdpa')), or patch with prop_attn=False"
    )


def check_hf_vision_tower(tower: nn.Module, config: ReductionConfig) -> None:
    """Raise :class:`UnsupportedModelError` (or ``ValueError`` for settings this tower cannot
    run) unless :func:`patch_hf_vision_tower` can patch ``tower`` for ``config``."""
    module_name, prefix = _upstream(tower)
    mod = importlib.import_module(module_name)
    if "_vlprune_ctx" in tower.__dict__:
        raise ValueError(
            f"this {type(tower).__bases__[-1].__name__} is already patched as part of a larger "
            "model; call vlprune.unpatch on that model first"
        )
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    if not hasattr(tower, "embeddings") or not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(tower).__qualname__} has no `embeddings` and `encoder.layers` (transformers "
            f"{_transformers_version()}): vlprune knows the transformers>=5 layout. Supported: "
            f"{SUPPORTED}"
        )
    layer_cls = getattr(mod, f"{prefix}EncoderLayer")
    attn_cls = getattr(mod, f"{prefix}Attention")
    for i, layer in enumerate(layers):
        if not isinstance(layer, layer_cls) or not _same_forward(layer, layer_cls) or not all(
            hasattr(layer, n) for n in _LAYER_PARTS
        ):
            raise UnsupportedModelError(
                f"encoder.layers[{i}] is {type(layer).__qualname__}; supported: "
                f"{layer_cls.__qualname__} with its upstream forward. Supported: {SUPPORTED}"
            )
        attn = layer.self_attn
        if not isinstance(attn, attn_cls) or not _same_forward(attn, attn_cls) or not all(
            hasattr(attn, n) for n in _ATTN_PARTS
        ):
            raise UnsupportedModelError(
                f"encoder.layers[{i}].self_attn is {type(attn).__qualname__}; supported: "
                f"{attn_cls.__qualname__} with its upstream forward. Supported: {SUPPORTED}"
            )
    impl = tower.config._attn_implementation
    if _uses_bias(config) and impl not in BIAS_IMPLEMENTATIONS:
        raise UnsupportedModelError(_bias_refusal(impl))
    head = getattr(tower, "head", None) if getattr(tower, "use_head", False) else None
    if head is not None:
        head_cls = getattr(mod, f"{prefix}MultiheadAttentionPoolingHead", None)
        mha = getattr(head, "attention", None)
        if head_cls is None or not isinstance(head, head_cls) or not _same_forward(
            head, head_cls
        ) or not (isinstance(mha, nn.MultiheadAttention) and mha.batch_first):
            raise UnsupportedModelError(
                f"pooling head {type(head).__qualname__} is not the upstream "
                "SiglipMultiheadAttentionPoolingHead, so merged tokens could not be weighted "
                "by their size"
            )
    prunes = config.prune_keep is not None
    if prunes and config.prune_score in NEEDS_CLASS_TOKEN and not _has_class_token(tower):
        raise ValueError(
            f"prune_score={config.prune_score!r} ranks tokens by class-token attention, but this "
            "model has no class token; use one of 'key_norm', 'attn_entropy', 'diversity', 'random'"
        )


def patch_hf_vision_tower(tower: nn.Module, ctx: PatchContext) -> None:
    """Swap the classes of one CLIP / SigLIP vision tower (checked by
    :func:`check_hf_vision_tower`) so it reduces tokens as ``ctx`` says.

    The tower starts the token state of ``ctx`` in its own ``forward``; the caller puts ``ctx``
    on its root module as ``_vlprune``. The schedule indexes the tower's encoder layers.
    """
    module_name, prefix = _upstream(tower)
    swap_class(tower, _VisionTowerMixin, ctx, num_protected=int(_has_class_token(tower)))
    _register_output_capture(tower)
    for i, layer in enumerate(tower.encoder.layers):
        swap_class(layer, _EncoderLayerMixin, ctx, layer=i)
        swap_class(layer.self_attn, _AttentionMixin, ctx, upstream=module_name)
    head = getattr(tower, "head", None) if getattr(tower, "use_head", False) else None
    if head is not None:
        swap_class(head, _PoolingHeadMixin, ctx)


def _register_output_capture(model: nn.Module) -> None:
    """transformers looks up what ``output_hidden_states`` / ``output_attentions`` record by the
    model's class name; register the swapped class under the upstream entry."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # other transformers versions: nothing keyed on the class
        return
    _CAN_RECORD_REGISTRY[model] = getattr(model, "_can_record_outputs", None)


class _VisionTowerMixin(RootMixin):
    """Patched ``CLIPVisionModel`` / ``SiglipVisionModel``: starts the token state."""

    @property
    def _vlprune(self) -> PatchContext:
        # RootMixin reads the context here; a tower inside a larger patched model is not the
        # root (which holds ``_vlprune``), so read the reference every patched module holds
        return self.__dict__["_vlprune_ctx"]

    def forward(self, *args, **kwargs):
        layers = self.encoder.layers
        checkpointing = self.training and (
            getattr(self.encoder, "gradient_checkpointing", False)
            or any(getattr(layer, "gradient_checkpointing", False) for layer in layers)
        )
        self._vlprune_start(self._vlprune_num_protected, checkpointing)
        return super().forward(*args, **kwargs)


class _EncoderLayerMixin:
    """Patched ``CLIPEncoderLayer`` / ``SiglipEncoderLayer``. Follows their forward
    (transformers 5.23): every submodule upstream calls is still called, in the same order."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        ctx: PatchContext = self._vlprune_ctx
        layer: int = self._vlprune_layer
        todo = enter_block(ctx, layer, hidden_states)
        if todo is None:
            out = super().forward(hidden_states, attention_mask, **kwargs)
            ctx.log(layer, hidden_states.shape[1], out.shape[1])
            return out
        reduce, bias = todo
        if attention_mask is not None:
            raise ValueError(
                "attention_mask cannot be combined with token reduction (the mask would have to "
                "follow the merged tokens); run inside `with vlprune.disabled(model):`"
            )
        n_in = hidden_states.shape[1]
        ctx.capture = reduce
        ctx.pending_bias = bias
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), **kwargs)
        x = residual + hidden_states
        if reduce:
            x = reduce_step(ctx, layer, x, ctx.take_attn())
        x = x + self.mlp(self.layer_norm2(x))
        ctx.log(layer, n_in, x.shape[1])
        return x


class _AttentionMixin:
    """Patched ``CLIPAttention`` / ``SiglipAttention``: upstream forward unless its layer asked
    for q, k, v or passed a size bias."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs):
        ctx: PatchContext = self._vlprune_ctx
        bias, capture = ctx.pending_bias, ctx.capture
        if bias is None and not capture:
            return super().forward(hidden_states, attention_mask=attention_mask, **kwargs)
        ctx.pending_bias, ctx.capture = None, False
        impl = self.config._attn_implementation
        if bias is not None and impl not in BIAS_IMPLEMENTATIONS:
            raise ValueError(_bias_refusal(impl))
        mask = combine_masks(attention_mask, bias, hidden_states.dtype)
        # Follows CLIPAttention.forward / SiglipAttention.forward (transformers 5.23) and hands
        # q, k, v to the layer for scoring.
        upstream = sys.modules[self._vlprune_upstream]
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        keys = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if capture:
            ctx.attn = AttnInputs(q=queries, k=keys, v=values, scale=self.scale, bias=mask)
        attention_interface = upstream.ALL_ATTENTION_FUNCTIONS.get_interface(
            impl, upstream.eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            queries,
            keys,
            values,
            mask,
            scaling=self.scale,
            dropout=0.0 if not self.training else self.dropout,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


class _PoolingHeadMixin:
    """Patched ``SiglipMultiheadAttentionPoolingHead``: the probe attends with the size bias
    once tokens are merged; otherwise the upstream forward runs."""

    def forward(self, hidden_state: Tensor) -> Tensor:
        ctx: PatchContext = self._vlprune_ctx
        state = ctx.state if ctx.enabled else None
        size = None
        if state is not None and ctx.config.prop_attn:
            size = state.size if state.attn_size is None else state.attn_size
        if size is None or tuple(size.shape[:2]) != tuple(hidden_state.shape[:2]):
            return super().forward(hidden_state)
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


@register_adapter
class HFClipVisionAdapter(Adapter):
    name = "hf_clip_vision"
    supported = SUPPORTED

    def matches(self, model: nn.Module) -> bool:
        paths = class_path_in_mro(model)
        return any(p in _TOWERS or p in _WITH_PROJECTION for p in paths)

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        check_hf_vision_tower(vision_tower(model), config)

    def num_layers(self, model: nn.Module) -> int:
        return len(vision_tower(model).encoder.layers)

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        patch_hf_vision_tower(vision_tower(model), ctx)
        model.__dict__["_vlprune"] = ctx

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        cfg = vision_tower(model).config
        size = cfg.image_size
        h, w = size if isinstance(size, (tuple, list)) else (size, size)
        return (cfg.num_channels, h, w)
