"""Hugging Face transformers 5.x BERT-style text encoders: ``BertModel`` (BERT, MiniLM,
sentence-transformers checkpoints), ``RobertaModel`` and ``XLMRobertaModel``.

Reduction point: inside each ``BertLayer``, after the attention block (its output LayerNorm
included) and before the feed-forward block, as for the other towers. Pruning ranks tokens by
the configured score (``cls_attn``: the [CLS] row; ``received_attn``: the attention each token
receives from the real tokens, PoWER-BERT / LTP) with a per-layer keep schedule, ToMe merges on
the layer's keys. [CLS] (the first real token) and the closing [SEP] (the last real token) are
protected.

Padded batches run on the shared sequence path (:func:`vlprune.adapters.text.start_sequence`,
:mod:`vlprune.core.ragged`): each row is put in canonical order ([CLS], [SEP], real tokens,
padding), reduces its own real tokens by its own budget, and every patched layer attends with a
mask built from the token state (padding keys masked, ``log(size)`` with ``prop_attn``). BERT's
position embeddings are added before the first layer and its attention is bidirectional, so the
order changes nothing.

Output (``text_output``):

* ``"full"`` (default): ``last_hidden_state`` has the input's shape. Each input position holds
  the final value of the token it was merged into; a pruned position keeps its token's output
  of the layer where it left (the pruned tokens still go through that layer's feed-forward
  block, so pruning saves compute from the next layer on); padding positions are zero. Mean
  pooling with the input's ``attention_mask`` (sentence-transformers) keeps working unchanged.
* ``"compact"``: the reduced tokens in canonical order ([CLS] first), with ``attention_mask``
  (1 for real tokens) and ``token_sizes`` (input tokens each one holds, 0 for padding) added to
  the output; ``(h * token_sizes).sum(1) / token_sizes.sum(1)`` is the size-weighted mean.

``pooler_output`` is the upstream pooler on that sequence's first token ([CLS]).

Refused while reducing: ``output_hidden_states`` / ``output_attentions``, a cache,
``encoder_hidden_states``, attention masks other than ``(B, N)``, rows with fewer than two real
tokens, attention implementations other than eager or sdpa, the full-length output under
reentrant gradient checkpointing (:mod:`vlprune.adapters.recompute`); always: decoder configs
(``is_decoder``, cross-attention), ``prune_fuse`` (padded rows).
"""

from __future__ import annotations

import importlib
import sys

import torch
from torch import Tensor, nn

from ..config import ReductionConfig
from ..core.attention import attend
from ..core.scores import AttnInputs
from .base import (
    Adapter,
    PatchContext,
    RootMixin,
    UnsupportedModelError,
    class_path_in_mro,
    device_dtype,
    register_adapter,
    swap_class,
    upstream_arguments,
)
from .hf_common import (
    BIAS_IMPLEMENTATIONS,
    same_forward,
    transformers_version,
)
from .recompute import run_block
from .step import block_attention, enter_block, reduce_step, scoring_bias
from .text import start_sequence

_BERT = "transformers.models.bert.modeling_bert"
_ROBERTA = "transformers.models.roberta.modeling_roberta"
_XLMR = "transformers.models.xlm_roberta.modeling_xlm_roberta"
# model class path -> (modeling module, class-name prefix of its parts)
_MODELS = {
    f"{_BERT}.BertModel": (_BERT, "Bert"),
    f"{_ROBERTA}.RobertaModel": (_ROBERTA, "Roberta"),
    f"{_XLMR}.XLMRobertaModel": (_XLMR, "XLMRoberta"),
}
_LAYER_PARTS = ("attention", "intermediate", "output", "feed_forward_chunk")
_ATTN_PARTS = ("query", "key", "value", "scaling", "attention_head_size")
DEFAULT_LENGTH = 128  # example input length (describe, bench): sentence-transformers' usual cap

SUPPORTED = (
    "transformers>=5 BertModel (BERT, MiniLM, sentence-transformers encoders), RobertaModel, "
    "XLMRobertaModel as encoders (not decoders) with the upstream layers, eager or sdpa attention"
)


def _family(model: nn.Module) -> tuple[str, str]:
    for path in class_path_in_mro(model):
        if path in _MODELS:
            return _MODELS[path]
    raise UnsupportedModelError(f"{type(model).__qualname__} is not a BERT-style encoder. Supported: {SUPPORTED}")


def _expect(module: nn.Module, cls: type, parts: tuple[str, ...], where: str) -> None:
    if not isinstance(module, cls) or not same_forward(module, cls) or not all(hasattr(module, n) for n in parts):
        raise UnsupportedModelError(
            f"{where} is {type(module).__qualname__}; supported: {cls.__qualname__} with its upstream "
            f"forward. Supported: {SUPPORTED}"
        )


def check_hf_bert(model: nn.Module, config: ReductionConfig) -> None:
    """Raise unless :func:`patch_hf_bert` can patch ``model`` for ``config`` (the text
    tower's config, :meth:`ReductionConfig.for_tower`)."""
    module_name, prefix = _family(model)
    mod = importlib.import_module(module_name)
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not hasattr(model, "embeddings") or not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__qualname__} has no `embeddings` and `encoder.layer` (transformers "
            f"{transformers_version()}): vlprune knows the transformers>=5 layout. Supported: {SUPPORTED}"
        )
    cfg = model.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is configured as a decoder (is_decoder / add_cross_attention): "
            "vlprune reduces BERT-style encoders only"
        )
    for i, layer in enumerate(layers):
        _expect(layer, getattr(mod, f"{prefix}Layer"), _LAYER_PARTS, f"encoder.layer[{i}]")
        _expect(layer.attention, getattr(mod, f"{prefix}Attention"), ("self", "output"),
                f"encoder.layer[{i}].attention")
        _expect(layer.attention.self, getattr(mod, f"{prefix}SelfAttention"), _ATTN_PARTS,
                f"encoder.layer[{i}].attention.self")
    impl = cfg._attn_implementation
    if not config.is_identity and impl not in BIAS_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"a reduced BERT-style encoder attends with a mask built from its token state, which "
            f"the {impl!r} attention implementation cannot take; use 'sdpa' or 'eager' "
            "(model.set_attn_implementation('sdpa'))"
        )
    if config.prune_fuse:
        raise ValueError("prune_fuse is not available in a text encoder (padded sequences); use drop or prune_recycle")


def patch_hf_bert(model: nn.Module, ctx: PatchContext) -> None:
    """Swap the classes of the encoder's layers and self-attention modules (reductions as
    ``ctx`` says; the caller swaps the model's own class)."""
    module_name, _ = _family(model)
    for i, layer in enumerate(model.encoder.layer):
        swap_class(layer, _LayerMixin, ctx, layer=i, upstream=module_name)
        swap_class(layer.attention.self, _SelfAttentionMixin, ctx, upstream=module_name)


def _refuse(kwargs: dict, config) -> None:
    asked = [k for k in ("output_hidden_states", "output_attentions") if kwargs.get(k, getattr(config, k, False))]
    given = [k for k in ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values")
             if kwargs.get(k) is not None]
    if asked or given:
        raise ValueError(
            f"{', '.join(asked + given)} is not available while a BERT-style encoder reduces tokens; "
            "run inside `with vlprune.disabled(model):`"
        )


def _protected(valid: Tensor) -> Tensor:
    """``(B, 2)``: the first ([CLS]) and last ([SEP]) real position of each row."""
    B, N = valid.shape
    counts = valid.sum(dim=1)
    if bool((counts < 2).any()):
        raise ValueError(
            "every row needs at least two real tokens ([CLS] ... [SEP]) for token reduction; got a "
            f"row with {int(counts.min())}: check the tokenizer output and the attention mask"
        )
    idx = torch.arange(N, device=valid.device).expand(B, N)
    first = torch.where(valid, idx, N).amin(dim=1)
    last = torch.where(valid, idx, -1).amax(dim=1)
    return torch.stack([first, last], dim=1)


class _BertModelMixin(RootMixin):
    """Patched ``BertModel`` / ``RobertaModel`` / ``XLMRobertaModel``: upstream forward unless it
    reduces; then embeddings, the shared sequence path and the patched layers (see the module
    docstring for the outputs)."""

    def forward(self, *args, **kwargs):
        ctx: PatchContext = self._vlprune.children["text"]
        if not ctx.reduces:
            ctx.call.state = None
            return super().forward(*args, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

        kwargs = upstream_arguments(self, "forward", args, kwargs) if args else dict(kwargs)
        input_ids, attention_mask = kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None)
        token_type_ids, position_ids = kwargs.pop("token_type_ids", None), kwargs.pop("position_ids", None)
        inputs_embeds = kwargs.pop("inputs_embeds", None)

        _refuse(kwargs, self.config)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds)
        B, N = x.shape[:2]
        if attention_mask is None:
            valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
        elif attention_mask.shape != (B, N):
            raise ValueError(
                f"token reduction takes a (batch, tokens) = {(B, N)} attention mask of 1 (real) and 0 "
                f"(padding), got shape {tuple(attention_mask.shape)}"
            )
        else:
            valid = attention_mask.to(device=x.device).bool()
        layers = self.encoder.layer
        full = ctx.config.text_output == "full"
        x, _ = start_sequence(ctx, x, valid, _protected(valid), track=full, training=self.training)
        for layer in layers:
            x = layer(x, None)  # each patched layer builds its mask from the token state
        state = ctx.state
        seq = state.full_length(x) if full else x
        pooled = self.pooler(seq) if getattr(self, "pooler", None) is not None else None
        out = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=seq, pooler_output=pooled)
        if not full:
            real = state.valid
            # float32 (float64 for float64 models) like the merged sizes, whatever the model dtype
            size_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            size = (torch.ones(real.shape, dtype=size_dtype, device=x.device) if state.size is None
                    else state.size[..., 0])
            out["attention_mask"] = real.long()
            out["token_sizes"] = size * real.to(size.dtype)
        if kwargs.get("return_dict", True) is False:
            return out.to_tuple()
        return out


class _LayerMixin:
    """Patched ``BertLayer`` (and the RoBERTa ones): follows its forward (transformers 5.24):
    attention, then the reduction step, then the feed-forward chunk."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs) -> Tensor:
        # a recompute under gradient checkpointing replays the first run (.recompute)
        return run_block(self._vlprune_ctx, self._vlprune_layer, hidden_states,
                         lambda: self._vlprune_forward(hidden_states, attention_mask, *args, **kwargs))

    def _vlprune_forward(self, hidden_states: Tensor, attention_mask: Tensor | None, *args, **kwargs) -> Tensor:
        ctx: PatchContext = self._vlprune_ctx
        layer: int = self._vlprune_layer
        todo = enter_block(ctx, layer, hidden_states)
        if todo is None:
            out = super().forward(hidden_states, attention_mask, *args, **kwargs)
            ctx.log(layer, hidden_states.shape[1], out.shape[1])
            return out
        reduce, spec = todo
        if attention_mask is not None:
            raise ValueError(
                "attention_mask cannot be combined with token reduction inside the layers (the mask "
                "follows the token state); call the patched model, not its encoder"
            )
        n_in = hidden_states.shape[1]
        call = ctx.call
        # the mask of the current tokens, for upstream to add to the logits; or, on the flex
        # backend, the spec, which the patched self-attention attends with itself
        bias, call.pending_spec = block_attention(ctx, hidden_states, spec)
        if not reduce:
            out = super().forward(hidden_states, bias, **kwargs)
            ctx.log(layer, n_in, out.shape[1])
            return out
        call.capture = True
        x, _ = self.attention(hidden_states, bias, **kwargs)
        x = reduce_step(ctx, layer, x, call.take_attn(), cls_index=0)
        chunking = sys.modules[self._vlprune_upstream].apply_chunking_to_forward
        out = chunking(self.feed_forward_chunk, self.chunk_size_feed_forward, self.seq_len_dim, x)
        state = ctx.state
        if state.just_left is not None:  # full output: tokens pruned here finish this layer
            gone, state.just_left = state.just_left, None
            left = state.left.clone()
            left[gone] = self.feed_forward_chunk(left[gone].unsqueeze(0))[0].to(left.dtype)
            state.left = left
        ctx.log(layer, n_in, out.shape[1])
        return out


class _SelfAttentionMixin:
    """Patched ``BertSelfAttention``: upstream forward unless its layer asked for q, k, v or
    handed it an :class:`~vlprune.core.attention.AttnSpec` (the flex backend: it attends with
    :func:`~vlprune.core.attention.attend`, returning no attention weights)."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs):
        ctx: PatchContext = self._vlprune_ctx
        call = ctx.call
        capture, spec = call.capture, call.pending_spec
        if not capture and spec is None:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        call.capture, call.pending_spec = False, None
        for name in ("cache", "past_key_values", "encoder_hidden_states"):
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"{name} is not available while a BERT-style encoder reduces tokens")
        # Follows BertSelfAttention.forward (transformers 5.24, no cache) and hands q, k, v to
        # the layer for scoring.
        upstream = sys.modules[self._vlprune_upstream]
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        query = self.query(hidden_states).view(*hidden_shape).transpose(1, 2)
        key = self.key(hidden_states).view(*hidden_shape).transpose(1, 2)
        value = self.value(hidden_states).view(*hidden_shape).transpose(1, 2)
        if capture:
            bias = attention_mask if spec is None else scoring_bias(spec, query.dtype)
            call.attn = AttnInputs(q=query, k=key, v=value, scale=self.scaling, bias=bias)
        if spec is not None:
            dropout = 0.0 if not self.training else self.dropout.p
            out = attend(query, key, value, spec, scale=self.scaling, dropout_p=dropout,
                         backend=ctx.config.attn_backend)
            return out.transpose(1, 2).reshape(*input_shape, -1).contiguous(), None
        attention_interface = upstream.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, upstream.eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout.p,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return attn_output, attn_weights


@register_adapter
class HFBertAdapter(Adapter):
    name = "hf_bert"
    supported = SUPPORTED
    towers = ("text",)
    full_text_output = True

    def matches(self, model: nn.Module) -> bool:
        return any(p in _MODELS for p in class_path_in_mro(model))

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        check_hf_bert(model, config.for_tower("text", False))

    def num_layers(self, model: nn.Module) -> int:
        return len(model.encoder.layer)

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        swap_class(model, _BertModelMixin, ctx)
        model.__dict__["_vlprune"] = ctx
        patch_hf_bert(model, ctx.children["text"])

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        # RoBERTa-style position ids start after the padding index: fewer usable positions
        cfg = model.config
        offset = cfg.pad_token_id + 1 if "roberta" in cfg.model_type else 0
        return (min(DEFAULT_LENGTH, cfg.max_position_embeddings - offset),)

    def example_input(self, model, batch_size=1, input_size=None):
        length = (input_size or self.default_input_size(model))[0]
        device, _ = device_dtype(model)
        return torch.randint(1, model.config.vocab_size, (batch_size, length), device=device)
