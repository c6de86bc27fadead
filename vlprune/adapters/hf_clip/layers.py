"""What the CLIP / SigLIP image and text towers share: finding a tower and its family, the
structure check of its encoder, and the patched encoder layer and attention.

Owns :func:`tower_family` and :func:`inner_tower` (the tower inside a ``*WithProjection``
wrapper), :func:`check_encoder` (not patched yet, upstream ``encoder.layers`` with upstream
attention), :class:`EncoderLayerMixin` (the reduction point between the attention branch and
the MLP branch), :class:`AttentionMixin` (the copied projections and attention function with
``log(size)`` as additive mask, only when its layer asks for q, k, v or a size bias) and
:func:`take_cached` (a tower output a guided two-tower forward computed ahead).
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from ...core.attention import attend, combine_masks, uses_flex
from ...core.scores import AttnInputs
from ..base import PatchContext, UnsupportedModelError, class_path_in_mro
from ..call import lookup
from ..hf_common import BIAS_IMPLEMENTATIONS, same_forward, transformers_version
from ..recompute import run_block
from ..step import enter_block, reduce_step, scoring_bias

CLIP = "transformers.models.clip.modeling_clip"
SIGLIP = "transformers.models.siglip.modeling_siglip"
_LAYER_PARTS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")


def inner_tower(model: nn.Module, wrappers: tuple[str, ...], attr: str) -> nn.Module:
    """``model.<attr>`` when ``model`` is one of the ``*WithProjection`` wrappers, else ``model``."""
    return getattr(model, attr) if any(p in wrappers for p in class_path_in_mro(model)) else model


def tower_family(tower: nn.Module, towers: dict, kind: str, supported: str) -> tuple[str, str]:
    """``(modeling module name, class prefix)`` of a tower's family, from ``towers``."""
    for path in class_path_in_mro(tower):
        if path in towers:
            return towers[path]
    raise UnsupportedModelError(
        f"{type(tower).__qualname__} is not a CLIP or SigLIP {kind} tower. Supported: {supported}"
    )


def bias_refusal(impl: str | None) -> str:
    """The message refusing proportional attention under attention implementation ``impl``."""
    return (
        f"proportional attention adds log(size) to the attention logits, which the {impl!r} "
        "attention implementation cannot take; use attn_implementation='sdpa' or 'eager' "
        "(model.set_attn_implementation('sdpa')), or patch with prop_attn=False"
    )


def check_encoder(tower: nn.Module, mod, prefix: str, part: str, supported: str) -> None:
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


class EncoderLayerMixin:
    """Patched ``CLIPEncoderLayer`` / ``SiglipEncoderLayer``. Follows their forward
    (transformers 5.23): every submodule upstream calls is still called, in the same order."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        # a recompute under gradient checkpointing replays the first run (..recompute)
        return run_block(self._vlprune_ctx, self._vlprune_layer, hidden_states,
                         lambda: self._vlprune_forward(hidden_states, attention_mask, **kwargs))

    def _vlprune_forward(self, hidden_states: Tensor, attention_mask: Tensor | None, **kwargs) -> Tensor:
        ctx: PatchContext = self._vlprune_ctx
        layer: int = self._vlprune_layer
        todo = enter_block(ctx, layer, hidden_states)
        if todo is None:
            out = super().forward(hidden_states, attention_mask, **kwargs)
            ctx.log(layer, hidden_states.shape[1], out.shape[1])
            return out
        reduce, spec = todo
        if attention_mask is not None:
            raise ValueError(
                "attention_mask cannot be combined with token reduction (the mask would have to "
                "follow the merged tokens); run inside `with vlprune.disabled(model):`"
            )
        n_in = hidden_states.shape[1]
        call = ctx.call
        call.capture, call.pending_spec = reduce, spec
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), **kwargs)
        x = residual + hidden_states
        if reduce:
            x = reduce_step(ctx, layer, x, call.take_attn())
        x = x + self.mlp(self.layer_norm2(x))
        ctx.log(layer, n_in, x.shape[1])
        return x


class AttentionMixin:
    """Patched ``CLIPAttention`` / ``SiglipAttention``: upstream forward unless its layer asked
    for q, k, v or passed an :class:`~vlprune.core.attention.AttnSpec` (size bias, text masks).
    Then the upstream attention function of the model's attention implementation runs with
    the spec's float mask, or, where ``attn_backend`` runs FlexAttention, vlprune's
    :func:`~vlprune.core.attention.attend` (attention weights are not returned then, as with
    the ``"sdpa"`` implementation)."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs):
        ctx: PatchContext = self._vlprune_ctx
        call = ctx.call
        spec, capture = call.pending_spec, call.capture
        if spec is None and not capture:
            return super().forward(hidden_states, attention_mask=attention_mask, **kwargs)
        call.pending_spec, call.capture = None, False
        impl = self.config._attn_implementation
        if spec is not None and impl not in BIAS_IMPLEMENTATIONS:
            raise ValueError(bias_refusal(impl))
        flex = attention_mask is None and uses_flex(ctx.config.attn_backend, hidden_states.device, spec)
        bias = None if spec is None or flex else spec.dense(hidden_states.dtype)
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
            scored = scoring_bias(spec, hidden_states.dtype) if flex else mask
            call.attn = AttnInputs(q=queries, k=keys, v=values, scale=self.scale, bias=scored)
        if flex:
            dropout = 0.0 if not self.training else self.dropout
            out = attend(queries, keys, values, spec, scale=self.scale, dropout_p=dropout,
                         backend=ctx.config.attn_backend)
            out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
            return self.out_proj(out), None
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



def take_cached(ctx: PatchContext, key: tuple):
    """The output a guided forward of this thread computed for exactly these inputs, once."""
    cached = lookup(ctx.key, "cached")
    if not cached:
        return None
    inputs, out = cached.pop()
    if len(inputs) != len(key) or any(a is not b for a, b in zip(inputs, key)):
        return None
    return type(out)(**out)  # a shallow copy: callers may reassign its fields
