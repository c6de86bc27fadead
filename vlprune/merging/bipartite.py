"""ToMe bipartite soft matching, expressed as a core :class:`~vlprune.core.Plan`.

The unprotected tokens are split alternately into sets A and B. Each A token finds its most
similar B token (cosine similarity of the metric, usually head-averaged keys); the ``r`` A
tokens with the most similar partners are merged into them. The result keeps the protected
prefix, the unmerged A tokens (in their order) and every B token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.plan import Plan


def max_merge(num_tokens: int, num_protected: int = 0) -> int:
    """The largest r one bipartite step can remove: half the mergeable tokens."""
    return max(num_tokens - num_protected, 0) // 2


def bipartite_soft_matching(metric: Tensor, r: int, num_protected: int = 0) -> Plan | None:
    """Plan that merges ``r`` tokens of ``metric`` (B, N, C) into their best partners.

    ``r`` is capped at :func:`max_merge`; returns ``None`` when nothing is merged. The first
    ``num_protected`` tokens are never merged and stay first.
    """
    B, N, _ = metric.shape
    r = min(int(r), max_merge(N, num_protected))
    if r <= 0:
        return None
    P = num_protected
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, P::2], metric[:, P + 1 :: 2]
        num_a, num_b = a.shape[1], b.shape[1]
        best_sim, best_b = (a @ b.transpose(-1, -2)).max(dim=-1)
        order = best_sim.argsort(dim=-1, descending=True)
        src_a = order[:, :r]
        unm_a = order[:, r:].sort(dim=-1).values

        dev = metric.device
        prefix = torch.arange(P, device=dev).expand(B, P)
        b_idx = (P + 1 + 2 * torch.arange(num_b, device=dev)).expand(B, num_b)
        keep = torch.cat([prefix, P + 2 * unm_a, b_idx], dim=1)
        src = P + 2 * src_a
        dst = P + (num_a - r) + best_b.gather(1, src_a)
    return Plan(keep=keep, src=src, dst=dst, num_tokens=N)
