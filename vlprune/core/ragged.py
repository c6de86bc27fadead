"""Ragged reduction: sequences whose rows hold different numbers of real tokens (padded text).

A batch of texts is padded to one length, but a text's embedding must not depend on how much
padding its batch neighbours forced on it. So reduction here is per row:

* :func:`sequence_order` puts each row in a canonical order first (protected tokens, then the
  real tokens in their order, then padding) and the trailing columns that are padding in
  every row are cut off;
* at a reduction point each row ``i`` computes its own budget ``d_i`` from its own count of
  real tokens (``ceil(keep * n_i)`` kept, or ``min(r, n_i // 2)`` merged) and removes exactly
  that many real tokens; the batch removes ``k = max_i d_i`` tokens per row, the difference
  ``k - d_i`` being padding of row ``i``. Real tokens never merge with padding.

Because ``n - d(n)`` grows with ``n`` for both rules, a row always has enough padding to give
(its padding is at least the longest row's real count minus its own). Tokens stay in their
canonical order, so real tokens remain contiguous after every step and an unpadded row run
alone takes exactly the same decisions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plan import Plan, take_tokens
from .select import normalize


def sequence_order(valid: Tensor, protect: Tensor) -> tuple[Tensor, int]:
    """Canonical order of a padded batch: ``(perm, length)``.

    ``valid`` (B, N) bool marks real tokens; ``protect`` (B, P) int64 gives the positions of
    the protected tokens of each row (e.g. BOS and the pooling token), which come first in the
    given order. ``perm`` (B, length) lists input positions: protected, then real tokens, then
    padding, each in input order, cut to the longest row (``length`` columns).
    """
    B, N = valid.shape
    idx = torch.arange(N, device=valid.device).expand(B, N)
    key = torch.where(valid, idx, idx + N)  # real tokens first, padding after
    P = protect.shape[1]
    key = key.scatter(1, protect, torch.arange(-P, 0, device=valid.device).expand(B, P))
    perm = key.argsort(dim=1)
    is_real = valid.clone()
    is_real.scatter_(1, protect, True)
    length = int(is_real.sum(dim=1).max())
    return perm[:, :length], length


def real_counts(valid: Tensor, num_protected: int) -> Tensor:
    """``(B,)`` number of real unprotected tokens per row."""
    return valid[:, num_protected:].sum(dim=1)


def _top_positions(key: Tensor, count: int) -> Tensor:
    """Column indices of the ``count`` largest ``key`` entries per row, in ascending order.
    Ties go to the earlier column (keys are made distinct by subtracting a position ramp)."""
    N = key.shape[1]
    ramp = torch.arange(N, device=key.device, dtype=key.dtype) / (2 * N)
    return (key - ramp).topk(count, dim=1).indices.sort(dim=1).values


def _keep_counts(n: Tensor, keep: float) -> Tensor:
    """Vectorised :func:`vlprune.core.select.keep_count`: ``min(n, max(1, ceil(keep * n)))``."""
    kept = torch.ceil(n.double() * keep).long().clamp(min=1)
    return torch.minimum(kept, n)


def ragged_prune_plan(
    scores: Tensor,
    valid: Tensor,
    keep: float,
    num_protected: int,
    *,
    mode: str = "drop",
    metric: Tensor | None = None,
) -> Plan | None:
    """Keep ``ceil(keep * n_i)`` best-scored real tokens of each row (``scores`` (B, N), higher
    is better), drop the rest (``drop``) or merge each into its most similar kept real token
    (``recycle``, needs ``metric`` (B, N, C)). Returns ``None`` when no row drops anything."""
    if mode not in ("drop", "recycle"):
        raise ValueError(
            f"prune mode {mode!r} is not available on padded sequences (text); use drop "
            "(default) or prune_recycle=True"
        )
    B, N = scores.shape
    P = num_protected
    v = valid[:, P:]
    n = v.sum(dim=1)
    kept = _keep_counts(n, keep)
    k = int((n - kept).max())
    if k <= 0:
        return None
    with torch.no_grad():
        s = scores[:, P:].float().masked_fill(~v, float("-inf"))
        order = s.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(N - P, device=s.device).expand_as(order))
        keep_real = v & (rank < kept.unsqueeze(1))
        # kept real tokens first, then padding to fill the row; dropped real tokens never
        prio = keep_real.float() * 2 + (~v).float()
        sel = P + _top_positions(prio, N - P - k)
        prefix = torch.arange(P, device=s.device).expand(B, P)
        keep_idx = torch.cat([prefix, sel], dim=1)
        if mode == "drop":
            return Plan(keep=keep_idx, num_tokens=N)
        if metric is None:
            raise ValueError("mode='recycle' needs the metric (keys) to find similar tokens")
        dropped = v & ~keep_real
        src = P + _top_positions(dropped.float(), k)  # the dropped real tokens, then fillers
        src_mask = dropped.gather(1, src - P)
        m = normalize(metric)
        sim = take_tokens(m, src) @ take_tokens(m, sel).transpose(1, 2)
        sim = sim.masked_fill(~valid.gather(1, sel).unsqueeze(1), float("-inf"))
        dst = P + sim.argmax(dim=-1)
    return Plan(keep=keep_idx, src=src, dst=dst, src_mask=src_mask, num_tokens=N)


def ragged_bipartite(metric: Tensor, valid: Tensor, r: int, num_protected: int) -> Plan | None:
    """ToMe bipartite matching per row: row ``i`` merges ``min(r, n_i // 2)`` of its real
    tokens (ToMe's parity split A/B over the positions of the canonical order, each real A token
    into its most similar real B token), and drops padding to keep the batch rectangular. An
    unpadded row merges the same tokens into the same partners as
    :func:`~vlprune.merging.bipartite.bipartite_soft_matching`."""
    B, N, _ = metric.shape
    P = num_protected
    n = real_counts(valid, P)
    r_row = torch.clamp(n // 2, max=int(r))
    k = int(r_row.max()) if r > 0 else 0
    if k <= 0:
        return None
    dev = metric.device
    with torch.no_grad():
        m = normalize(metric)
        # ToMe's parity split over all positions of the canonical order (A even, B odd), the
        # protected prefix left out: as the dense bipartite_soft_matching splits an unpadded row
        a_idx = torch.arange(P + P % 2, N, 2, device=dev)
        b_idx = torch.arange(P + 1 - P % 2, N, 2, device=dev)
        va, vb = valid[:, a_idx], valid[:, b_idx]
        sim = m[:, a_idx] @ m[:, b_idx].transpose(1, 2)
        sim = sim.masked_fill(~vb.unsqueeze(1), float("-inf"))
        best_sim, best_b = sim.max(dim=-1)
        best_sim = best_sim.masked_fill(~va, float("-inf"))
        order = best_sim.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(a_idx.numel(), device=dev).expand_as(order)
        )
        merged_a = va & (rank < r_row.unsqueeze(1))
        merged = torch.zeros(B, N, dtype=torch.bool, device=dev)
        merged[:, a_idx] = merged_a
        # survivors: protected, unmerged real tokens, then padding (earliest first)
        prio = (valid & ~merged).float() * 2 + (~valid).float()
        prio[:, :P] = 3.0
        keep_idx = _top_positions(prio, N - k)
        out_pos = torch.full((B, N), -1, dtype=torch.long, device=dev)
        out_pos.scatter_(1, keep_idx, torch.arange(N - k, device=dev).expand(B, N - k))
        src_a = _top_positions(merged_a.float(), k)  # merged A tokens, then fillers (masked)
        src_mask = merged_a.gather(1, src_a)
        src = a_idx[src_a]
        dst = out_pos.gather(1, b_idx[best_b.gather(1, src_a)])
        dst = torch.where(src_mask, dst, torch.zeros_like(dst))
    return Plan(keep=keep_idx, src=src, dst=dst, src_mask=src_mask, num_tokens=N)
