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
and LLaVA (:mod:`vlprune.adapters.llava.tower`) reuse :func:`check_hf_vision_tower` and
:func:`patch_hf_vision_tower` for the image tower.

transformers is imported lazily: ``import vlprune`` does not need it.
"""

from __future__ import annotations

import importlib
import sys

import torch
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
    device_dtype,
    hf_image_input_size,
    refuse_grad_checkpointing,
    register_adapter,
    swap_class,
)
from .call import lookup, scoped
from .hf_common import (
    BIAS_IMPLEMENTATIONS,
    register_output_capture,
    same_forward,
    transformers_version,
)
from .step import enter_block, reduce_step
from .text import TextLayout, random_ids, start_text

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

SUPPORTED = (
    "transformers>=5 CLIPVisionModel, CLIPVisionModelWithProjection, SiglipVisionModel (also "
    "CLIPModel.vision_model / SiglipModel.vision_model) with the upstream encoder layers, "
    "eager or sdpa attention (flash/flex only with prop_attn=False)"
)


def _inner(model: nn.Module, wrappers: tuple[str, ...], attr: str) -> nn.Module:
    """``model.<attr>`` when ``model`` is one of the ``*WithProjection`` wrappers, else ``model``."""
    return getattr(model, attr) if any(p in wrappers for p in class_path_in_mro(model)) else model


def _family(tower: nn.Module, towers: dict, kind: str, supported: str) -> tuple[str, str]:
    """``(modeling module name, class prefix)`` of a tower's family, from ``towers``."""
    for path in class_path_in_mro(tower):
        if path in towers:
            return towers[path]
    raise UnsupportedModelError(
        f"{type(tower).__qualname__} is not a CLIP or SigLIP {kind} tower. Supported: {supported}"
    )


def vision_tower(model: nn.Module) -> nn.Module:
    """The ``CLIPVisionModel`` / ``SiglipVisionModel`` that holds the encoder of ``model``."""
    return _inner(model, _WITH_PROJECTION, "vision_model")


def _upstream(tower: nn.Module) -> tuple[str, str]:
    return _family(tower, _TOWERS, "vision", SUPPORTED)


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


def _check_encoder(tower: nn.Module, mod, prefix: str, part: str, supported: str) -> None:
    """The structure both tower kinds share: not patched yet, ``encoder.layers`` of the
    upstream encoder layer with the upstream attention, and ``part`` (a tower attribute)."""
    if "_vlprune_ctx" in tower.__dict__:
        raise ValueError(
            f"this {type(tower).__bases__[-1].__name__} is already patched as part of a larger "
            "model; call vlprune.unpatch on that model first"
        )
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    if not hasattr(tower, part) or not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(tower).__qualname__} has no `{part}` and `encoder.layers` (transformers "
            f"{transformers_version()}): vlprune knows the transformers>=5 layout. Supported: "
            f"{supported}"
        )
    layer_cls = getattr(mod, f"{prefix}EncoderLayer")
    attn_cls = getattr(mod, f"{prefix}Attention")
    for i, layer in enumerate(layers):
        if not isinstance(layer, layer_cls) or not same_forward(layer, layer_cls) or not all(
            hasattr(layer, n) for n in _LAYER_PARTS
        ):
            raise UnsupportedModelError(
                f"encoder.layers[{i}] is {type(layer).__qualname__}; supported: "
                f"{layer_cls.__qualname__} with its upstream forward. Supported: {supported}"
            )
        attn = layer.self_attn
        if not isinstance(attn, attn_cls) or not same_forward(attn, attn_cls) or not all(
            hasattr(attn, n) for n in _ATTN_PARTS
        ):
            raise UnsupportedModelError(
                f"encoder.layers[{i}].self_attn is {type(attn).__qualname__}; supported: "
                f"{attn_cls.__qualname__} with its upstream forward. Supported: {supported}"
            )


def check_hf_vision_tower(tower: nn.Module, config: ReductionConfig, guided: bool = False) -> None:
    """Raise :class:`UnsupportedModelError` (or ``ValueError`` for settings this tower cannot
    run) unless :func:`patch_hf_vision_tower` can patch ``tower`` for ``config``. A ``guided``
    tower's pruning scores come from the other modality, not from ``prune_score``."""
    module_name, prefix = _upstream(tower)
    mod = importlib.import_module(module_name)
    _check_encoder(tower, mod, prefix, "embeddings", SUPPORTED)
    impl = tower.config._attn_implementation
    if _uses_bias(config) and impl not in BIAS_IMPLEMENTATIONS:
        raise UnsupportedModelError(_bias_refusal(impl))
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
    prunes = config.prune_keep is not None and not guided
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
    register_output_capture(tower)
    for i, layer in enumerate(tower.encoder.layers):
        swap_class(layer, _EncoderLayerMixin, ctx, layer=i)
        swap_class(layer.self_attn, _AttentionMixin, ctx, upstream=module_name)
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
        cached = _take_cached(self._vlprune_ctx, (pixels,))  # a guided forward ran it already
        if cached is not None:
            return cached
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
        call = ctx.call
        call.capture, call.pending_bias = reduce, bias
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), **kwargs)
        x = residual + hidden_states
        if reduce:
            x = reduce_step(ctx, layer, x, call.take_attn())
        x = x + self.mlp(self.layer_norm2(x))
        ctx.log(layer, n_in, x.shape[1])
        return x


class _AttentionMixin:
    """Patched ``CLIPAttention`` / ``SiglipAttention``: upstream forward unless its layer asked
    for q, k, v or passed a size bias."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs):
        ctx: PatchContext = self._vlprune_ctx
        call = ctx.call
        bias, capture = call.pending_bias, call.capture
        if bias is None and not capture:
            return super().forward(hidden_states, attention_mask=attention_mask, **kwargs)
        call.pending_bias, call.capture = None, False
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
            call.attn = AttnInputs(q=queries, k=keys, v=values, scale=self.scale, bias=mask)
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
        return hf_image_input_size(vision_tower(model).config)


# ---- text towers and two-tower models ------------------------------------------------------

_TEXT_TOWERS = {
    f"{_CLIP}.CLIPTextModel": (_CLIP, "CLIP"),
    f"{_SIGLIP}.SiglipTextModel": (_SIGLIP, "Siglip"),
}
_TEXT_WITH_PROJECTION = (f"{_CLIP}.CLIPTextModelWithProjection",)
_TWO_TOWERS = (f"{_CLIP}.CLIPModel", f"{_SIGLIP}.SiglipModel")

TEXT_SUPPORTED = (
    "transformers>=5 CLIPTextModel, CLIPTextModelWithProjection, SiglipTextModel (also inside "
    "CLIPModel / SiglipModel) with the upstream encoder layers, eager or sdpa attention"
)


def text_tower(model: nn.Module) -> nn.Module:
    """The ``CLIPTextModel`` / ``SiglipTextModel`` that holds the encoder of ``model``."""
    return _inner(model, _TEXT_WITH_PROJECTION, "text_model")


def _text_upstream(tower: nn.Module) -> tuple[str, str]:
    return _family(tower, _TEXT_TOWERS, "text", TEXT_SUPPORTED)


def text_layout(tower: nn.Module) -> TextLayout:
    """CLIP: causal, pools the EOT (argmax of the ids for old configs whose eos id is 2, else
    the first ``eos_token_id``), BOS protected. SigLIP: bidirectional, pools the last token."""
    _, prefix = _text_upstream(tower)
    if prefix == "Siglip":
        return TextLayout(causal=False, pool="last", protect_first=False)
    eos = tower.eos_token_id
    return TextLayout(causal=True, pool="argmax" if eos == 2 else "eos", eos_id=eos)


def check_hf_text_tower(tower: nn.Module, config: ReductionConfig) -> None:
    """Raise unless :func:`patch_hf_text_tower` can patch ``tower`` for ``config`` (the text
    tower's own config, see :meth:`ReductionConfig.for_tower`)."""
    module_name, prefix = _text_upstream(tower)
    mod = importlib.import_module(module_name)
    _check_encoder(tower, mod, prefix, "final_layer_norm", TEXT_SUPPORTED)
    impl = tower.config._attn_implementation
    if not config.is_identity and impl not in BIAS_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"a reduced text tower attends with a mask built from its token state, which the "
            f"{impl!r} attention implementation cannot take; use 'sdpa' or 'eager'"
        )
    if config.prune_fuse:
        raise ValueError("prune_fuse is not available in a text tower (padded sequences); use drop or prune_recycle")


def patch_hf_text_tower(tower: nn.Module, ctx: PatchContext) -> None:
    """Swap the classes of one CLIP / SigLIP text tower so it reduces tokens as ``ctx`` says."""
    module_name, _ = _text_upstream(tower)
    swap_class(tower, _TextTowerMixin, ctx)
    register_output_capture(tower)
    for i, layer in enumerate(tower.encoder.layers):
        swap_class(layer, _EncoderLayerMixin, ctx, layer=i)
        swap_class(layer.self_attn, _AttentionMixin, ctx, upstream=module_name)


class _TextTowerMixin(RootMixin):
    """Patched ``CLIPTextModel`` / ``SiglipTextModel``. When the tower reduces, follows their
    forward (transformers 5.23) on the shared text path (:mod:`vlprune.adapters.text`):
    ``last_hidden_state`` is the reduced sequence in canonical order (protected tokens first)
    and ``pooler_output`` the pooled token, as upstream."""

    @property
    def _vlprune(self) -> PatchContext:
        return self.__dict__["_vlprune_ctx"]

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, **kwargs):
        ctx: PatchContext = self._vlprune_ctx
        cached = _take_cached(ctx, (input_ids, attention_mask))
        if cached is not None:
            return cached
        if not ctx.reduces:
            ctx.call.state = None
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        asked = [k for k in ("output_hidden_states", "output_attentions") if kwargs.get(k)]
        if asked:
            raise ValueError(
                f"{', '.join(asked)} is not available while the text tower reduces tokens; run "
                "inside `with vlprune.disabled(model):`"
            )
        if input_ids is None:
            raise ValueError("You have to specify input_ids")
        ids = input_ids.view(-1, input_ids.shape[-1])
        x = self.embeddings(input_ids=ids, position_ids=position_ids)
        checkpointing = self.training and getattr(self.encoder, "gradient_checkpointing", False)
        refuse_grad_checkpointing(ctx, checkpointing)
        padding = None if attention_mask is None else attention_mask.view(ids.shape).bool()
        x, slot = start_text(ctx, x, ids, text_layout(self), padding)
        for layer in self.encoder.layers:
            x = layer(x, None)  # each patched layer builds its mask from the token state
        x = self.final_layer_norm(x)
        pooled = x[:, slot]
        if hasattr(self, "head"):  # SigLIP's text head
            pooled = self.head(pooled)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)

    def _vlprune_project(self, x: Tensor) -> Tensor:
        x = self.final_layer_norm(x)
        return self.head(x) if hasattr(self, "head") else x


def _take_cached(ctx: PatchContext, key: tuple):
    """The output a guided forward of this thread computed for exactly these inputs, once."""
    cached = lookup(ctx.key, "cached")
    if not cached:
        return None
    inputs, out = cached.pop()
    if len(inputs) != len(key) or any(a is not b for a, b in zip(inputs, key)):
        return None
    return type(out)(**out)  # a shallow copy: callers may reassign its fields


@register_adapter
class HFClipTextAdapter(Adapter):
    name = "hf_clip_text"
    supported = TEXT_SUPPORTED
    towers = ("text",)

    def matches(self, model: nn.Module) -> bool:
        paths = class_path_in_mro(model)
        return any(p in _TEXT_TOWERS or p in _TEXT_WITH_PROJECTION for p in paths)

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        check_hf_text_tower(text_tower(model), config.for_tower("text", False))

    def num_layers(self, model: nn.Module) -> int:
        return len(text_tower(model).encoder.layers)

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        tower = text_tower(model)
        text = ctx.children["text"]
        patch_hf_text_tower(tower, text)
        text.project = tower._vlprune_project
        model.__dict__["_vlprune"] = ctx

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        return (text_tower(model).config.max_position_embeddings,)

    def example_input(self, model, batch_size=1, input_size=None):
        tower = text_tower(model)
        length = (input_size or self.default_input_size(model))[0]
        device, _ = device_dtype(model)
        return random_ids(batch_size, length, tower.config.vocab_size, text_layout(tower), device)


class _TwoTowerMixin(RootMixin):
    """Patched ``CLIPModel`` / ``SiglipModel``: with guidance and both inputs, the guiding tower
    runs first; its pooled embeddings guide the other tower's pruning and its output is handed
    back (not recomputed) when upstream ``forward`` asks for it."""

    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None, **kwargs):
        ctx: PatchContext = self._vlprune
        guided = next((c for c in ctx.children.values() if c.guided_by), None)
        if guided is None or not guided.reduces or input_ids is None or pixel_values is None:
            return super().forward(input_ids=input_ids, pixel_values=pixel_values,
                                   attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        tower_kw = {k: v for k, v in kwargs.items() if k != "return_loss"}
        if guided.tower == "image":
            key = (input_ids, attention_mask)
            out = self.text_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, **tower_kw)
            embeds = out.pooler_output
            if hasattr(self, "text_projection"):
                embeds = self.text_projection(embeds)
            leader = ctx.children["text"]
        else:
            key = (pixel_values,)
            out = self.vision_model(pixel_values=pixel_values, **{
                k: v for k, v in tower_kw.items() if k == "interpolate_pos_encoding"})
            embeds = out.pooler_output
            if hasattr(self, "visual_projection"):
                embeds = self.visual_projection(embeds)
            leader = ctx.children["image"]
        # this call's guide and the leading tower's output, in this thread only
        with scoped([guided.key], "guide", embeds.detach()), \
                scoped([leader.key], "cached", [(key, out)]):
            return super().forward(input_ids=input_ids, pixel_values=pixel_values,
                                   attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    def _vlprune_project_text(self, x: Tensor) -> Tensor:
        x = self.text_model._vlprune_project(x)
        return self.text_projection(x) if hasattr(self, "text_projection") else x

    def _vlprune_project_image(self, x: Tensor) -> Tensor:
        x = self.vision_model.post_layernorm(x)
        if hasattr(self, "visual_projection"):
            return self.visual_projection(x)
        head = self.vision_model.head  # SigLIP: the pooling head applied to each token alone
        B, N, C = x.shape
        return head(x.reshape(B * N, 1, C)).reshape(B, N, -1)


@register_adapter
class HFClipAdapter(Adapter):
    name = "hf_clip"
    supported = (
        "transformers>=5 CLIPModel and SiglipModel: image and text towers as in hf_clip_vision "
        "and hf_clip_text, cross-modal guidance"
    )
    towers = ("image", "text")

    def matches(self, model: nn.Module) -> bool:
        return any(p in _TWO_TOWERS for p in class_path_in_mro(model))

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        check_hf_vision_tower(model.vision_model, config.for_tower("image", True), config.guide == "text")
        check_hf_text_tower(model.text_model, config.for_tower("text", True))
        if config.guide == "text" and not hasattr(model, "visual_projection") and not getattr(
            model.vision_model, "use_head", False
        ):
            raise UnsupportedModelError("guide='text' needs the image tower's head (visual_projection or a pooling head)")

    def num_layers(self, model: nn.Module) -> int:
        return self.tower_layers(model, "image") + self.tower_layers(model, "text")

    def tower_layers(self, model: nn.Module, tower: str) -> int:
        return len((model.vision_model if tower == "image" else model.text_model).encoder.layers)

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        image, text = ctx.children["image"], ctx.children["text"]
        swap_class(model, _TwoTowerMixin, ctx)
        register_output_capture(model)
        model.__dict__["_vlprune"] = ctx
        patch_hf_vision_tower(model.vision_model, image)
        patch_hf_text_tower(model.text_model, text)
        image.project = model._vlprune_project_image
        text.project = model._vlprune_project_text

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        return hf_image_input_size(model.vision_model.config)

    def example_input(self, model, batch_size=1, input_size=None):
        device, dtype = device_dtype(model)
        size = input_size or self.default_input_size(model)
        tower = model.text_model
        ids = random_ids(batch_size, tower.config.max_position_embeddings, tower.config.vocab_size,
                         text_layout(tower), device)
        return {
            "input_ids": ids,
            "pixel_values": torch.randn(batch_size, *size, device=device, dtype=dtype),
        }
