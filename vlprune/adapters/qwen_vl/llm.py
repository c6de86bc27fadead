"""FastV inside the Qwen2.5-VL / Qwen3-VL language model (``llm_layer`` / ``llm_keep``).

The rule and its wiring are LLaVA's (:mod:`vlprune.adapters.llava.llm`, reused here): decoder
layer ``llm_layer - 1`` ranks each image's (and video's) visual tokens by the attention its
last prompt row gives them, heads averaged; from layer ``llm_layer`` on only each item's
``llm_keep`` best visual tokens (and every other token) go on, at their original positions.
What differs here:

* **M-RoPE positions are kept**: the text model computes the rotary ``(cos, sin)`` once from
  the 3-D positions and hands them to every layer; the pruned layers select the kept columns
  of them (and of the 4D mask), so every kept token keeps its 3-D position. Renumbering
  (``llm_renumber_positions``) is refused: a 3-D position has no "one less".
* the ranking layer's attention row includes Qwen3-VL's per-head ``q_norm`` / ``k_norm``
  (:func:`last_token_attention`);
* Qwen3-VL's DeepStack adds features at the visual places after each of its first
  ``len(deepstack_visual_indexes)`` layers, on the full sequence: pruning must start after
  them (``llm_layer >= len(deepstack_visual_indexes)``, checked at ``patch()``);
* the layers are called with keyword arguments in upstream's order (Qwen3-VL's decoder
  layers take ``position_embeddings`` second), through :class:`_KeywordCall`.

Images and videos are both visual tokens: the prefill marks every image and video
placeholder, each item with its own budget (in the order the items appear in a row).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...config import ReductionConfig
from ..base import PatchContext, UnsupportedModelError, swap_class
from ..llava.llm import FastVCall, FastVLayerMixin, FastVPoint, last_token_attention
from .detect import inner_model, qwen_family
from .select import keep_count

_DECODER_LAYERS = (
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLDecoderLayer",
    "transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLTextDecoderLayer",
)


def llm_layers(model: nn.Module):
    """The decoder layers of the language model."""
    return inner_model(model).language_model.layers


def check_llm(model: nn.Module, config: ReductionConfig) -> None:
    """Raise unless FastV at ``config.llm_layer`` can run on ``model``."""
    layers = llm_layers(model)
    if not 0 < config.llm_layer < len(layers):
        raise ValueError(
            f"llm_layer={config.llm_layer} out of range: the language model has {len(layers)} "
            f"decoder layers, give 1..{len(layers) - 1}"
        )
    if config.llm_renumber_positions:
        raise ValueError(
            f"llm_renumber_positions is not supported on {type(model).__name__}: its M-RoPE "
            "positions are 3-D (t, h, w), which have no contiguous renumbering; the kept "
            "tokens keep their positions"
        )
    for layer in layers[config.llm_layer - 1:]:
        names = [f"{c.__module__}.{c.__qualname__}" for c in type(layer).__mro__]
        if not any(n in names for n in _DECODER_LAYERS):
            raise UnsupportedModelError(
                f"llm_keep prunes inside the decoder layers; {type(layer).__name__} is not "
                f"supported (supported: {', '.join(n.rsplit('.', 1)[1] for n in _DECODER_LAYERS)})"
            )
    deep = getattr(model.config.vision_config, "deepstack_visual_indexes", None)
    if qwen_family(model) == "qwen3_vl" and deep and config.llm_layer < len(deep):
        raise ValueError(
            f"llm_layer={config.llm_layer}: Qwen3-VL adds DeepStack features at the visual "
            f"places after each of its first {len(deep)} decoder layers, on the full sequence, "
            f"so pruning must start after them: give llm_layer >= {len(deep)}"
        )


class _KeywordCall:
    """Calls upstream's decoder layer with keyword arguments (its own parameter order)."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, *args,
                position_embeddings=None, **kwargs):
        if args:
            raise TypeError("vlprune's FastV layers take the cache and the rest by keyword")
        return super().forward(hidden_states, attention_mask=attention_mask,
                               position_ids=position_ids,
                               position_embeddings=position_embeddings, **kwargs)


class QwenRankLayerMixin(_KeywordCall):
    """Decoder layer ``llm_layer - 1``: at a prefill it stores its last prompt row's attention
    (:func:`last_token_attention`), then runs unchanged on the full sequence."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, *args,
                position_embeddings=None, **kwargs):
        st = self._vlprune_llm.call()
        ctx: PatchContext = self._vlprune_ctx
        if (ctx.enabled and st.prefill and st.kept is None and position_embeddings is not None
                and hidden_states.shape[1] == st.length):
            st.scores = last_token_attention(self, hidden_states, position_embeddings, st.last,
                                             st.valid)
        return super().forward(hidden_states, attention_mask, position_ids, *args,
                               position_embeddings=position_embeddings, **kwargs)


class QwenFastVLayerMixin(FastVLayerMixin, _KeywordCall):
    """A decoder layer at or after ``llm_layer`` that runs on the kept tokens only
    (LLaVA's :class:`~vlprune.adapters.llava.llm.FastVLayerMixin`, called by keyword)."""


def patch_llm(model: nn.Module, ctx: PatchContext) -> None:
    """Patch time: the ranking layer and the pruned layers."""
    cfg = ctx.config
    state = FastVPoint(ctx, cfg.llm_layer, None, keep_count)
    model.__dict__["_vlprune_llm"] = state
    layers = llm_layers(model)
    swap_class(layers[cfg.llm_layer - 1], QwenRankLayerMixin, ctx, llm=state)
    for i, layer in enumerate(layers[cfg.llm_layer:]):
        swap_class(layer, QwenFastVLayerMixin, ctx, llm=state, first=i == 0)


def _item_lens(named: dict, modality: str, merge: int) -> list[int]:
    """Tokens each image / video gives the language model in this call."""
    mm = named.get("mm_encoder_outputs") or {}
    if mm.get(modality) is not None:
        return [f.shape[0] for f in mm[modality].pooler_output]
    grid = named.get("image_grid_thw" if modality == "image" else "video_grid_thw")
    pixels = named.get("pixel_values" if modality == "image" else "pixel_values_videos")
    if grid is None or pixels is None:
        return []
    return (grid.prod(dim=-1) // merge ** 2).tolist()


def llm_begin(model: nn.Module, named: dict) -> FastVCall:
    """The calling thread's FastV state, armed for a prefill of ``named`` (a forward with an
    empty cache and visual tokens); a decode step keeps the prefill's selection."""
    st = model.__dict__["_vlprune_llm"].call()
    ctx: PatchContext = model._vlprune
    if not ctx.enabled or ctx.config.llm_is_identity:
        st.reset()
        return st
    if named.get("labels") is not None:
        raise ValueError(
            "llm_keep drops visual tokens inside the language model, so the logits no longer "
            "line up with labels; compute the loss unpatched or without llm_keep"
        )
    cache = named.get("cache", named.get("past_key_values"))
    if cache is not None and cache.get_seq_length():
        return st  # a decode step: the prefill's selection stands
    input_ids = named.get("input_ids")
    if input_ids is None:
        st.reset()
        return st
    cfg = model.config
    merge = cfg.vision_config.spatial_merge_size
    ids, lens = _visual_layout(input_ids, cfg.image_token_id, cfg.video_token_id,
                               _item_lens(named, "image", merge), _item_lens(named, "video", merge))
    if not lens:
        st.reset()
        return st
    st.begin(ids, named.get("attention_mask"), cfg.image_token_id, lens)
    return st


def _visual_layout(input_ids: Tensor, image_id: int, video_id: int, img_lens: list[int],
                   vid_lens: list[int]) -> tuple[Tensor, list[int]]:
    """``input_ids`` with every video placeholder marked as an image one, and the token
    counts of all items in the order their placeholders appear, row by row."""
    items = []  # (row, first column, length)
    for token, lens in ((image_id, img_lens), (video_id, vid_lens)):
        where = (input_ids == token).nonzero()
        if where.shape[0] != sum(lens):
            raise ValueError(f"input_ids hold {where.shape[0]} placeholders of token {token} for "
                             f"items of {sum(lens)} tokens")
        start = 0
        for n in lens:
            items.append((int(where[start, 0]), int(where[start, 1]), n))
            start += n
    items.sort()
    ids = torch.where(input_ids == video_id, image_id, input_ids)
    return ids, [n for _, _, n in items]
