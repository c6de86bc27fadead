"""M-RoPE positions of a reduced Qwen-VL call: upstream's own positions of the full prompt.

Qwen-VL gives every token a 3-D (t, h, w) rotary position computed from the whole placeholder
layout (``get_rope_index``: text advances by one, an image spans its merged grid, and the text
after it continues from the grid's largest extent), and only when ``mm_token_type_ids`` comes
with the grids; otherwise upstream numbers the positions 0..L-1. Both cases are mirrored by
computing them with upstream's own code on the *full* prompt (:func:`full_positions`,
``compute_3d_position_ids``; in ``generate``, ``_prepare_position_ids_for_generation``), then
dropping the dropped columns with the same keep mask as ``input_ids``, so a kept token keeps
its position and nothing is renumbered from the shortened ``input_ids``.

``rope_deltas`` (what upstream adds to the cache length to place a decode step that comes
without ``position_ids``) is set by :func:`reduced_deltas` so such a step lands where it would
land after the full prompt.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from .detect import inner_model


def full_positions(model: nn.Module, named: dict) -> tuple[Tensor, Tensor | None]:
    """(3, B, L) positions upstream's forward gives the prompt of ``named`` (an empty cache),
    and the ``rope_deltas`` it computes (``None`` when it numbers positions 0..L-1)."""
    input_ids = named["input_ids"]
    given = named.get("position_ids")
    B, L = input_ids.shape
    if given is not None:
        if given.dim() == 2:
            given = given[None].expand(3, *given.shape)
        elif given.shape[0] == 4:  # packed: the first row is the text positions
            given = given[1:]
        return given, None
    inner = inner_model(model)
    fn = inner.compute_3d_position_ids
    params = inspect.signature(fn).parameters
    kw = dict(input_ids=input_ids, image_grid_thw=named.get("image_grid_thw"),
              video_grid_thw=named.get("video_grid_thw"), inputs_embeds=None,
              attention_mask=named.get("attention_mask"), cache=None,
              mm_token_type_ids=named.get("mm_token_type_ids"))
    if "second_per_grid_ts" in params:
        kw["second_per_grid_ts"] = named.get("second_per_grid_ts")
    before = inner.rope_deltas
    inner.rope_deltas = None  # its cached deltas of an earlier prompt play no part in a prefill
    try:
        pos = fn(**kw)
        deltas = inner.rope_deltas if pos is not None else None
    finally:
        inner.rope_deltas = before
    if pos is None:  # what the text model does without position_ids and without a cache
        pos = torch.arange(L, device=input_ids.device).view(1, 1, -1).expand(3, B, -1)
    return pos, deltas


def reduced_deltas(deltas: Tensor | None, keep: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, 1) ``rope_deltas`` for the shortened prompt: a decode step after it gets the
    position it gets after the full prompt. ``deltas``: upstream's for the full prompt (``None``:
    upstream numbers 0..L-1 and keeps no deltas, so a step lands at ``L + i``)."""
    B, L = keep.shape
    if attention_mask is not None:
        real = attention_mask.bool()
        # a step with a mask is placed by the mask's count of real tokens
        new_real = (keep & real).sum(dim=1, keepdim=True)
        if deltas is None:
            return L - new_real
        return deltas.to(keep.device) + real.sum(dim=1, keepdim=True) - new_real
    new_len = int(keep.sum(dim=1).max())  # a step without a mask is placed by the cache length
    base = torch.zeros(B, 1, dtype=torch.long, device=keep.device) if deltas is None else deltas
    return base.to(keep.device) + (L - new_len)
