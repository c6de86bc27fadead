"""The prompt rewrite: placeholder spans, prompt-token dropping, and the shorter sequences.

Owns the bookkeeping between images (or videos) and their placeholder spans in
``input_ids`` (:func:`span_rows`, :func:`span_keep`), prompt dropping (``text_keep``:
:func:`text_embeds`, :func:`text_drop`, droppable tokens ranked by their best cosine
similarity to the row's kept visual tokens) and :func:`rewrite_sequences`, which removes the
dropped positions from ``input_ids`` and every aligned (B, L) tensor with one keep mask,
re-padding each row on the side it was padded on (left when unknown).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...config import DEFAULT_TEXT_PROTECT_LAST, ReductionConfig
from ...core.visual import image_text_alignment

_SEQ_FILLS = {"attention_mask": 0, "position_ids": 0, "labels": -100}


def span_rows(input_ids: Tensor, token_id: int, lens: list[int], what: str = "image") -> list[int]:
    """The row of each image (or video): they fill the placeholder spans of ``token_id``
    row by row, ``lens[j]`` places each."""
    counts = (input_ids == token_id).sum(dim=1).tolist()
    if sum(counts) != sum(lens):
        raise ValueError(
            f"input_ids hold {sum(counts)} {what} tokens for {len(lens)} {what}s of "
            f"{sum(lens)} tokens ({lens}); expand each {what} placeholder to its full span "
            "(the processor does) before a patched forward"
        )
    rows, j = [], 0
    for b, c in enumerate(counts):
        while c > 0:
            rows.append(b)
            c -= lens[j]
            j += 1
        if c:
            raise ValueError(
                f"row {b}'s {what} placeholders do not add up to whole {what}s ({lens} tokens)"
            )
    return rows


def span_keep(input_ids: Tensor, token_id: int, lens: list[int], n_kept: list[int]) -> Tensor:
    """(B, L) bool: ``False`` at the places of ``token_id`` spans that go. The j-th
    placeholder of the flattened batch belongs to span j (``lens[j]`` places), which keeps
    its first ``n_kept[j]`` places."""
    is_span = input_ids == token_id
    keep = torch.ones_like(is_span)
    if not lens:
        return keep
    dev = input_ids.device
    lens_t = torch.tensor(lens, device=dev)
    ends = lens_t.cumsum(0)
    flat = torch.arange(int(ends[-1]), device=dev)
    span = torch.searchsorted(ends, flat, right=True)
    keep[is_span.nonzero(as_tuple=True)] = (flat - (ends - lens_t)[span]) < torch.tensor(
        n_kept, device=dev)[span]
    return keep


#: the config attributes naming ids prompt dropping never drops (BOS / EOS / padding, image and
#: video placeholders)
SPECIAL_ID_NAMES = ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_id",
                    "video_token_id", "image_token_index", "video_token_index")


def special_ids(model: nn.Module, names: tuple[str, ...] = SPECIAL_ID_NAMES) -> set[int]:
    """The token ids that the model's config, text config and generation config give under
    ``names`` (ints or lists): what prompt dropping never drops."""
    ids: set[int] = set()
    for cfg in (model.config, model.config.text_config, getattr(model, "generation_config", None)):
        for name in names:
            v = getattr(cfg, name, None)
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(i) for i in v)
    return ids


def text_embeds(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                rows, special: set[int] | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Per row: the positions of its prompt text tokens (not ``special``, default
    :func:`special_ids`) and their input embeddings (only for the ``rows`` holding an image,
    ``None`` elsewhere)."""
    ids = special_ids(model) if special is None else special
    special = torch.tensor(sorted(ids), device=input_ids.device)
    text = ~torch.isin(input_ids, special)
    if attention_mask is not None:
        text &= attention_mask.bool()
    emb = model.get_input_embeddings()
    pos, embs = [], []
    for b in range(input_ids.shape[0]):
        p = text[b].nonzero()[:, 0]
        pos.append(p)
        embs.append(emb(input_ids[b, p]) if b in rows else None)
    return pos, embs


def text_drop(model: nn.Module, cfg: ReductionConfig, input_ids: Tensor,
              attention_mask: Tensor | None, positions: list[Tensor], kept: list[Tensor],
              rows: list[int]) -> Tensor:
    """(B, L) bool: prompt tokens dropped by ``text_keep``; ``kept[j]``: the kept tokens of
    image j, in row ``rows[j]``; ``positions``: each row's text positions (:func:`text_embeds`)."""
    protect_last = DEFAULT_TEXT_PROTECT_LAST if cfg.text_protect_last is None else cfg.text_protect_last
    B, L = input_ids.shape
    drop = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
    emb = model.get_input_embeddings()
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(drop)
    for b in range(B):
        mine = [kept[j] for j, r in enumerate(rows) if r == b]
        if not mine:
            continue  # no image to be guided by
        row_real = real[b].nonzero()[:, 0]
        tail = set(row_real[-protect_last:].tolist()) if protect_last else set()
        cand = torch.tensor([p for p in positions[b].tolist() if p not in tail],
                            dtype=torch.long, device=input_ids.device)
        if cand.numel() == 0:
            continue
        k = math.ceil(cfg.text_keep * cand.numel())
        score = image_text_alignment(emb(input_ids[b, cand]), torch.cat(mine))
        keep = torch.zeros(cand.numel(), dtype=torch.bool, device=drop.device)
        keep[score.topk(k).indices] = True
        drop[b, cand[~keep]] = True
    return drop


def rewrite_sequences(model: nn.Module, input_ids: Tensor, keep: Tensor, seqs: dict) -> dict:
    """Remove the positions ``~keep`` (B, L) from ``input_ids`` and the aligned (B, L)
    tensors of ``seqs``, re-padding each row on the side it was padded on. A row's padding
    (the masked positions before its first and after its last real one) goes too, so the
    batch is as long as its longest kept row (a text-only row, which loses nothing, does not
    hold the others at the caller's length)."""
    mask = seqs.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape == keep.shape:
        real = mask.bool()
        pos = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        first = torch.where(real, pos, keep.shape[1]).min(dim=1, keepdim=True).values
        last = torch.where(real, pos, -1).max(dim=1, keepdim=True).values
        keep = keep & (pos >= first) & (pos <= last)
    lengths = keep.sum(dim=1)
    L = int(lengths.max())
    right = mask is not None and bool((mask[:, -1] == 0).any()) and not bool((mask[:, 0] == 0).any())
    if mask is None and bool((lengths != L).any()):
        seqs["attention_mask"] = torch.ones_like(input_ids)
    image_id = model.config.image_token_id
    pad_id = model.config.text_config.pad_token_id
    if pad_id is None or pad_id == image_id:
        pad_id = 0 if image_id != 0 else 1
    fills = {"input_ids": pad_id, **_SEQ_FILLS}
    out = {}
    for name, t in {"input_ids": input_ids, **seqs}.items():
        if t is None:
            out[name] = None
            continue
        new = torch.full((t.shape[0], L), fills[name], dtype=t.dtype, device=t.device)
        for b in range(t.shape[0]):
            row = t[b][keep[b]]
            if right:
                new[b, : row.shape[0]] = row
            else:
                new[b, L - row.shape[0]:] = row
        out[name] = new
    return out
