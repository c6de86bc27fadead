"""The prompt rewrite of a Qwen-VL call: which placeholder places stay, and the shorter
sequences.

Unlike LLaVA's (:mod:`vlprune.adapters.llava.rewrite`), where the kept tokens of an image
fill the first places of its shortened span, here every kept token stays at *its own*
placeholder place (:func:`placeholder_keep`), because the place decides its 3-D M-RoPE
position. :func:`shorten` removes the dropped places from ``input_ids`` and every aligned
tensor (``(B, L)`` ones and ``(3 or 4, B, L)`` position ids) with one keep mask, re-padding
each row on the side it was padded on (left when unknown).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..llava.rewrite import SPECIAL_ID_NAMES
from ..llava.rewrite import special_ids as llava_special_ids
from ..llava.rewrite import text_embeds as llava_text_embeds

_FILLS = {"attention_mask": 0, "labels": -100, "mm_token_type_ids": 0, "position_ids": 0}


def placeholder_keep(input_ids: Tensor, token_id: int, lens: list[int],
                     kept: list[Tensor]) -> Tensor:
    """(B, L) bool, ``False`` at the ``token_id`` places that go. The placeholders of the
    flattened batch belong, in order, to items of ``lens[j]`` places each (an item's places
    need not be contiguous: Qwen3-VL puts a timestamp between a video's frames); item ``j``
    keeps its places ``kept[j]`` (indices into its own places)."""
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    where = (input_ids == token_id).nonzero(as_tuple=True)
    if not lens:
        return keep
    starts = torch.tensor([0, *lens[:-1]], device=input_ids.device).cumsum(0)
    flat = torch.cat([idx.to(input_ids.device) + s for idx, s in zip(kept, starts)])
    stay = torch.zeros(where[0].shape[0], dtype=torch.bool, device=input_ids.device)
    stay[flat] = True
    keep[where] = stay
    return keep


def special_ids(model: nn.Module) -> set[int]:
    """Token ids prompt dropping never drops and the ``text`` score never reads: BOS / EOS /
    padding, the image and video placeholders and the vision start / end markers."""
    return llava_special_ids(model, SPECIAL_ID_NAMES + ("vision_start_token_id", "vision_end_token_id"))


def text_embeds(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                rows: set[int]) -> tuple[list[Tensor], list[Tensor | None]]:
    """Per row: the positions of its prompt text tokens (not :func:`special_ids`) and (for
    ``rows``) their input embeddings."""
    return llava_text_embeds(model, input_ids, attention_mask, rows, special_ids(model))


def padded_right(mask: Tensor | None) -> bool:
    """True when ``mask`` pads some row on the right and none on the left."""
    return (mask is not None and bool((mask[:, -1] == 0).any())
            and not bool((mask[:, 0] == 0).any()))


def shorten(input_ids: Tensor, keep: Tensor, seqs: dict, pad_id: int) -> dict:
    """``input_ids`` and the tensors of ``seqs`` (``(B, L)`` or ``(P, B, L)``; ``None`` passes
    through) without the places ``~keep``; rows re-padded on their padding side."""
    lengths = keep.sum(dim=1)
    L = int(lengths.max())
    right = padded_right(seqs.get("attention_mask"))
    if seqs.get("attention_mask") is None and bool((lengths != L).any()):
        seqs["attention_mask"] = torch.ones_like(input_ids)
    out = {}
    for name, t in {"input_ids": input_ids, **seqs}.items():
        if t is None:
            out[name] = None
            continue
        fill = pad_id if name == "input_ids" else _FILLS.get(name, 0)
        lead = t.shape[:-2]
        new = torch.full((*lead, t.shape[-2], L), fill, dtype=t.dtype, device=t.device)
        for b in range(t.shape[-2]):
            row = t[..., b, :][..., keep[b]]
            n = row.shape[-1]
            if right:
                new[..., b, :n] = row
            else:
                new[..., b, L - n:] = row
        out[name] = new
    return out
