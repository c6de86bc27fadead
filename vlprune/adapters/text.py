"""What every text tower shares: where it pools, which tokens are real, the canonical order.

A text tower pools one token (CLIP: the EOT token, found as the argmax of the ids or the first
``eos_id``; SigLIP: the last token; some towers the first). That token and the first token
(BOS) are protected. Real tokens are those the pooled token can see: with a causal mask the
tokens up to the pooled one, and in any case only those the padding mask lets through.
:func:`start_text` moves each row into the canonical order of :mod:`vlprune.core.ragged`
(protected tokens first, then real tokens, then padding, cut to the longest row) and starts
the tower's token state with positions (causal towers) and the real-token mask, so every
patched block builds its attention mask from the state: causal by position, padding masked,
sizes as proportional attention. After the last block the pooled token sits at
``pool_slot``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.plan import take_tokens
from ..core.ragged import sequence_order
from .base import PatchContext

POOLS = ("argmax", "eos", "first", "last")


@dataclass(frozen=True)
class TextLayout:
    """How a text tower attends and pools.

    Attributes:
        causal: the tower uses a causal mask.
        pool: ``argmax`` (EOT = highest id), ``eos`` (first ``eos_id``), ``first`` or ``last``.
        eos_id: the EOS id for ``pool='eos'``.
        protect_first: protect the first token too (BOS of CLIP tokenizers).
    """

    causal: bool
    pool: str
    eos_id: int | None = None
    protect_first: bool = True

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"text pooling {self.pool!r} is not supported; supported: {list(POOLS)}")
        if self.pool == "eos" and self.eos_id is None:
            raise ValueError("pool='eos' needs eos_id")

    def pool_positions(self, ids: Tensor) -> Tensor:
        """``(B,)`` position of the pooled token of each row of ``ids`` (B, N)."""
        B, N = ids.shape
        if self.pool == "argmax":
            return ids.argmax(dim=-1)
        if self.pool == "eos":
            return (ids == self.eos_id).int().argmax(dim=-1)
        pos = 0 if self.pool == "first" else N - 1
        return torch.full((B,), pos, dtype=torch.long, device=ids.device)

    def num_protected(self) -> int:
        return 2 if self.protect_first and self.pool != "first" else 1


def start_text(
    ctx: PatchContext, x: Tensor, ids: Tensor, layout: TextLayout, padding: Tensor | None = None,
    training: bool = False,
) -> tuple[Tensor, int]:
    """Start a text tower's reduced forward on embeddings ``x`` (B, N, C) of ``ids`` (B, N).

    ``padding`` (B, N) bool, True for real tokens (an attention mask), if the tower has one.
    Returns the tokens in canonical order and the slot of the pooled token.
    """
    B, N = ids.shape
    pool = layout.pool_positions(ids)
    valid = torch.ones(B, N, dtype=torch.bool, device=ids.device)
    if layout.causal and layout.pool in ("argmax", "eos"):
        valid = torch.arange(N, device=ids.device).unsqueeze(0) <= pool.unsqueeze(1)
    if padding is not None:
        valid = valid & padding.to(device=ids.device, dtype=torch.bool)
    P = layout.num_protected()
    protect = pool.unsqueeze(1)
    if P == 2:
        protect = torch.cat([torch.zeros_like(protect), protect], dim=1)
        if bool((pool == 0).any()):
            raise ValueError(
                "a text row pools at its first token (no EOT after it?): token reduction needs the "
                "pooled token after BOS; check the tokenizer output"
            )
    x, _ = start_sequence(ctx, x, valid, protect, causal=layout.causal, training=training)
    return x, P - 1


def start_sequence(
    ctx: PatchContext, x: Tensor, valid: Tensor, protect: Tensor, causal: bool = False,
    track: bool = False, training: bool = False,
) -> tuple[Tensor, Tensor]:
    """Start the token state of a padded sequence batch ``x`` (B, N, C) and move it to the
    canonical order: ``valid`` (B, N) bool marks real tokens, ``protect`` (B, P) the positions
    of the protected tokens (first, in that order). Causal towers attend by input position.
    ``track``: follow every input position through the reductions (``TokenState.slot``) so
    :meth:`TokenState.full_length` can give a full-length output. Returns the reordered tokens
    and the permutation ``perm`` (B, L) of input positions."""
    P = protect.shape[1]
    perm, _ = sequence_order(valid, protect)
    state = ctx.begin(P, training=training)  # training: the random score draws anew
    real = valid.gather(1, perm)
    real[:, :P] = True
    state.valid = real
    state.pos = perm if causal else None
    if track:
        B, N = valid.shape
        slot = torch.full((B, N), -1, dtype=torch.long, device=valid.device)
        order = torch.arange(perm.shape[1], device=valid.device).expand_as(perm)
        slot.scatter_(1, perm, torch.where(real, order, torch.full_like(order, -1)))
        state.slot = slot
    return take_tokens(x, perm), perm


def random_ids(batch: int, length: int, vocab: int, layout: TextLayout, device=None) -> Tensor:
    """Full-length random token ids with the pooled token where the tower expects it (EOT =
    the highest id at the end for argmax pooling, ``eos_id`` at the end for eos pooling): the
    example input of text towers (describe, bench)."""
    high = vocab - 1
    ids = torch.randint(1, high, (batch, length), device=device)
    if layout.pool == "argmax":
        ids[:, -1] = high
    elif layout.pool == "eos":
        ids[ids == layout.eos_id] = 1 if layout.eos_id != 1 else 3
        ids[:, -1] = layout.eos_id
    return ids
