"""FastV visual token pruning inside the language model of LLaVA, at prefill.

Matches the authors' FastV (github.com/pkunlp-icler/FastV @ d165972, the inplace branch of
``LlamaModel.forward`` in ``src/transformers/src/transformers/models/llama/modeling_llama.py``,
lines 730-760): the visual tokens are ranked by the attention map of decoder layer
``llm_layer - 1`` (K-1), heads averaged, the last prompt token's row; from layer ``llm_layer``
(K) on, each image keeps its ``llm_keep`` best visual tokens (plus every other token) at their
original positions. ``tests/test_golden_fastv.py`` checks the kept positions (exactly), the
final hidden states and logits (within 1e-4) against the reference's own outputs
(``tests/golden/fastv_llama.*``, made by ``benchmarks/fidelity/make_golden_fastv.py``).

Layer K-1 computes that row from its own input, ``input_layernorm``, ``q_proj``/``k_proj``
and the rotary embeddings it receives (:func:`last_token_attention`, float32 softmax, for the
last prompt row only), so every layer keeps its fast attention kernel (the reference needs
``output_attentions=True`` and eager attention everywhere).

Where it goes beyond the reference, which runs one unpadded row with the image at a fixed
configured offset (``fast_v_sys_length``, ``fast_v_image_token_length``):

* image positions come from the placeholder ids of each row; every image of a row keeps its
  own budget (``llm_keep``: a count, or a ratio of that image's tokens, ``ceil(ratio * n)``;
  the reference takes a count, ``fast_v_attention_rank``; its HF port ``round(n * (1 - R))``,
  the same for LLaVA-1.5's 576 tokens at R = 25/50/75/87.5%);
* batches: each row ranks with its own last prompt token (the last non-padding one), over its
  own non-padding keys; rows must keep the same number of tokens;
* decode steps (``generate`` with a cache): the prefill's selection stands, decode tokens
  attend to the kept prompt tokens only (as the authors' KV-cache variants); the reference's
  inplace branch runs without a cache and re-ranks the whole sequence at every step;
* ``llm_renumber_positions=True`` (off by default, not in the reference) renumbers positions.

Wiring (transformers >= 5; Llama, Mistral and Qwen2 decoder layers):

* The LLaVA root marks the image placeholder positions of a prefill (a forward whose cache
  is empty) in the call state of the thread (:class:`FastVCall`), read by the patched layers
  ``>= llm_layer - 1``.
* At prefill, layer ``llm_layer - 1`` (:class:`FastVRankLayerMixin`) stores the attention
  row of every batch row and runs unchanged on the full prompt; layer ``llm_layer``
  (:class:`FastVLayerMixin`, first) picks and stores the kept positions (B, R); each layer
  from ``llm_layer`` on index-selects the hidden states (first one only), the rotary
  ``(cos, sin)``, ``position_ids`` and the rows and columns of the 4D mask it gets.
  An absent mask (sdpa, no padding) stays absent: the kept tokens are in order, so plain
  causal attention over them is right. Layers ``< llm_layer`` cache the full prompt, layers
  ``>= llm_layer`` the reduced one.
* At decode steps the model builds its mask from layer 0's cache (full length: that is what
  ``DynamicCache.get_seq_length`` and ``get_mask_sizes`` read), so ``cache_position`` and the
  positions continue the original numbering; each patched layer keeps the mask's key columns
  of its own cache: the kept prompt columns, then every column after the prompt.
* ``llm_renumber_positions=True``: the patched layers recompute the rotary embeddings with
  contiguous positions (each kept token moves back by the visual tokens dropped before it;
  generated tokens by all the row's dropped tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..base import LayerRecord, PatchContext, UnsupportedModelError
from .parts import inner_model

_DECODER_LAYERS = (
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
    "transformers.models.mistral.modeling_mistral.MistralDecoderLayer",
    "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer",
)


class FastVPoint:
    """Where and how much FastV prunes in one patched LLaVA (settings, shared by the layers);
    :meth:`call` is the calling thread's :class:`FastVCall`."""

    def __init__(self, ctx: PatchContext, layer: int, rotary: nn.Module | None,
                 count: Callable[[int | float, int, str], int]):
        self.ctx = ctx  # the root context (settings); its call state carries FastVCall
        self.layer = layer
        self.rotary = rotary
        self.count = count  # (llm_keep, tokens, name) -> kept tokens

    def keep_count(self, tokens: int) -> int:
        """Visual tokens an image of ``tokens`` keeps under the current ``llm_keep``."""
        return self.count(self.ctx.config.llm_keep, tokens, "llm_keep")

    def call(self) -> FastVCall:
        """This thread's FastV state: armed at a prefill, read by the decode steps after it."""
        parts = self.ctx.call.parts
        st = parts.get("fastv")
        if st is None:
            st = parts["fastv"] = FastVCall()
        return st


class FastVCall:
    """Per-call state of the pruning inside the language model: set at one prefill, used by
    every decode step of the same ``generate`` (in the same thread)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefill = False
        self.visual: Tensor | None = None  # (B, L) bool: image placeholder positions
        self.row_lens: list[list[int]] = []  # per row: tokens of each image entering the LLM
        self.last: Tensor | None = None  # (B,) index of each row's last prompt token
        self.valid: Tensor | None = None  # (B, L) bool: keys the last token may attend to
        self.length = 0  # prefill length L
        self.scores: Tensor | None = None  # (B, L) layer llm_layer - 1's last-row attention
        self.kept: Tensor | None = None  # (B, R) kept original positions
        self.shift: Tensor | None = None  # (B, R) positions each kept token moves back
        self.dropped: Tensor | None = None  # (B, 1) visual tokens each row dropped

    def begin(self, input_ids: Tensor, attention_mask: Tensor | None, image_id: int,
              lens: list[int]) -> None:
        """Arm a prefill of ``input_ids`` (B, L) whose images give ``lens`` tokens each (in
        the order their placeholder spans appear, row by row)."""
        self.reset()
        visual = input_ids == image_id
        B, L = input_ids.shape
        counts = visual.sum(dim=1).tolist()
        if not any(counts):
            return
        if sum(counts) != sum(lens):
            raise ValueError(
                f"input_ids hold {sum(counts)} image tokens for images of {sum(lens)} tokens"
            )
        row_lens: list[list[int]] = []
        j = 0
        for c in counts:
            mine: list[int] = []
            while c > 0 and j < len(lens):
                mine.append(lens[j])
                c -= lens[j]
                j += 1
            if c != 0:
                raise ValueError(
                    "an image's placeholder span crosses a row boundary: every row must hold whole "
                    f"images (rows hold {counts} image tokens, images {lens})"
                )
            row_lens.append(mine)
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask.bool()
            pos = torch.arange(L, device=input_ids.device).expand(B, L)
            last = torch.where(valid, pos, -1).max(dim=1).values.clamp(min=0)
            valid = valid & (pos <= last[:, None])
        elif attention_mask is None:
            valid = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
            last = torch.full((B,), L - 1, device=input_ids.device)
        else:
            raise ValueError("llm_keep needs a 2D attention_mask (or none)")
        self.prefill, self.visual, self.row_lens = True, visual, row_lens
        self.last, self.valid, self.length = last, valid, L

    def end(self) -> None:
        """The prefill forward is over: later forwards with a cache are decode steps."""
        self.prefill = False


def llm_layers(model: nn.Module):
    """The decoder layers of a LLaVA's language model (``language_model.layers`` of its base
    model)."""
    lm = getattr(inner_model(model), "language_model", None)
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"llm_keep needs a decoder-only language model with .layers, got {type(lm).__name__}"
        )
    return layers


def check_decoder_layers(layers) -> None:
    for layer in layers:
        cls = type(layer)
        names = [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__]
        if not any(n in names for n in _DECODER_LAYERS):
            raise UnsupportedModelError(
                f"llm_keep prunes inside the language model's decoder layers; {cls.__name__} is "
                f"not supported (supported: {', '.join(n.rsplit('.', 1)[1] for n in _DECODER_LAYERS)})"
            )


def _rows(t: Tensor, B: int) -> Tensor:
    return t.expand(B, *t.shape[1:]) if t.shape[0] == 1 and B > 1 else t


def _take_seq(t: Tensor, idx: Tensor) -> Tensor:
    """``t[b, idx[b]]`` along dim 1 for (B or 1, L, ...) tensors."""
    t = _rows(t, idx.shape[0])
    index = idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
    return t.gather(1, index)


def _take_mask(mask, rows: Tensor | None, cols: Tensor):
    """Select query rows (dim 2) and key columns (dim 3) of a 4D mask, per batch row."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 4:
        raise ValueError(
            f"llm_keep needs a 4D tensor attention mask in the decoder layers, got "
            f"{type(mask).__name__}; use attn_implementation 'sdpa' or 'eager'"
        )
    B = cols.shape[0]
    m = _rows(mask, B)
    H = m.shape[1]
    if rows is not None:
        m = m.gather(2, rows[:, None, :, None].expand(B, H, rows.shape[1], m.shape[3]))
    return m.gather(3, cols[:, None, None, :].expand(B, H, m.shape[2], cols.shape[1]))


def last_token_attention(layer: nn.Module, x: Tensor, position_embeddings, last: Tensor,
                         valid: Tensor) -> Tensor:
    """Attention (B, L) of each row's last prompt token to every position, heads averaged,
    as ``layer`` computes it from its input ``x`` (B, L, C): ``input_layernorm``, the q/k
    projections (with ``q_norm`` / ``k_norm`` where the layer has them: Qwen3), the rotary
    embeddings it receives, grouped-query heads repeated."""
    from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

    # Llama, Mistral, Qwen2 and the Qwen-VL decoders share this attention layout

    attn = layer.self_attn
    h = layer.input_layernorm(x)
    B, L, _ = h.shape
    hd = attn.head_dim
    rows = torch.arange(B, device=x.device)
    cos, sin = (_rows(t, B) for t in position_embeddings)  # (B, L, hd)
    q = attn.q_proj(h[rows, last]).view(B, -1, hd)  # (B, H, hd)
    k = attn.k_proj(h).view(B, L, -1, hd)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    k = k.transpose(1, 2)  # (B, Hkv, L, hd)
    q = q * cos[rows, last][:, None] + rotate_half(q) * sin[rows, last][:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k = repeat_kv(k, attn.num_key_value_groups)
    logits = (q.float()[:, :, None] @ k.float().transpose(-2, -1))[:, :, 0] * attn.scaling
    logits = logits.masked_fill(~valid[:, None], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


class FastVRankLayerMixin:
    """Decoder layer ``llm_layer - 1``: at a prefill it computes, from its own input, the
    attention its last prompt row gives every position (heads averaged) -- the row of the
    attention map this layer outputs, which FastV ranks the visual tokens with -- then runs
    unchanged on the full sequence."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, *args,
                position_embeddings=None, **kwargs):
        point: FastVPoint = self._vlprune_llm
        st = point.call()
        ctx: PatchContext = self._vlprune_ctx
        if (ctx.enabled and st.prefill and st.kept is None and position_embeddings is not None
                and hidden_states.shape[1] == st.length):
            st.scores = last_token_attention(self, hidden_states, position_embeddings, st.last,
                                             st.valid)
        return super().forward(
            hidden_states, attention_mask, position_ids, *args,
            position_embeddings=position_embeddings, **kwargs,
        )


class FastVLayerMixin:
    """A decoder layer at or after ``llm_layer`` that runs on the kept tokens only."""

    def _vlprune_select(self, st: FastVCall) -> Tensor:
        point: FastVPoint = self._vlprune_llm
        B, L = st.visual.shape
        scores = st.scores  # set by layer llm_layer - 1 (FastVRankLayerMixin) in this prefill
        if scores is None:
            raise RuntimeError(
                f"FastV: decoder layer {point.layer - 1} did not rank the visual tokens of this "
                "prefill (was it skipped, or called without position_embeddings?)"
            )
        keep = ~st.visual
        kept_visual = []
        for b in range(B):
            vis = st.visual[b].nonzero()[:, 0]
            n_kept = 0
            for span in vis.split(st.row_lens[b]):  # each image keeps its own budget
                k = point.keep_count(span.shape[0])
                keep[b, span[scores[b, span].topk(k).indices]] = True
                n_kept += k
            kept_visual.append(n_kept)
        lengths = keep.sum(dim=1)
        if bool((lengths != lengths[0]).any()):
            raise ValueError(
                "llm_keep needs every row of a batch to keep the same number of tokens inside the "
                f"language model; the rows keep {kept_visual} visual tokens of "
                f"{[sum(r) for r in st.row_lens]} (rows differ in their images). Run such rows "
                "in separate batches, or use visual_keep (before the language model), which has "
                "no such limit"
            )
        st.kept = keep.nonzero()[:, 1].view(B, -1)
        dropped = st.visual & ~keep
        st.shift = dropped.cumsum(dim=1).gather(1, st.kept)
        st.dropped = dropped.sum(dim=1, keepdim=True)
        ctx: PatchContext = self._vlprune_ctx
        record = ctx.record
        if record is not None:
            record.append(LayerRecord(point.layer, sum(st.row_lens[0]), kept_visual[0], 0, None, "llm"))
        return st.kept

    def forward(self, hidden_states, attention_mask=None, position_ids=None, *args,
                position_embeddings=None, **kwargs):
        point: FastVPoint = self._vlprune_llm
        st = point.call()
        ctx: PatchContext = self._vlprune_ctx
        if ctx.enabled and st.prefill and position_embeddings is not None:
            if self._vlprune_first and hidden_states.shape[1] == st.length:
                hidden_states = _take_seq(hidden_states, self._vlprune_select(st))
            if st.kept is not None and position_embeddings[0].shape[1] == st.length:
                idx = st.kept
                attention_mask = _take_mask(attention_mask, idx, idx)
                if position_ids is not None:
                    position_ids = _take_seq(position_ids, idx)
                if ctx.config.llm_renumber_positions and position_ids is not None:
                    position_ids = position_ids - st.shift
                    position_embeddings = point.rotary(hidden_states, position_ids)
                else:
                    position_embeddings = tuple(_take_seq(t, idx) for t in position_embeddings)
        elif ctx.enabled and not st.prefill and st.kept is not None:
            if attention_mask is not None:
                K = attention_mask.shape[-1]
                B = st.kept.shape[0]
                after = torch.arange(st.length, K, device=st.kept.device).expand(B, K - st.length)
                attention_mask = _take_mask(attention_mask, None, torch.cat([st.kept, after], dim=1))
            if ctx.config.llm_renumber_positions and position_ids is not None:
                position_ids = _rows(position_ids, st.dropped.shape[0]) - st.dropped
                position_embeddings = point.rotary(hidden_states, position_ids)
        # the cache and the rest pass through under whatever names this transformers uses
        return super().forward(
            hidden_states, attention_mask, position_ids, *args,
            position_embeddings=position_embeddings, **kwargs,
        )
