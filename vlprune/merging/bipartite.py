"""ToMe bipartite soft matching, expressed as a core :class:`~vlprune.core.Plan`.

The split follows ToMe (``tome/merge.py::bipartite_soft_matching``): every token goes to set
A or B by the parity of its position, A the even positions (0, 2, 4, ...) and B the odd ones,
over *all* tokens, protected ones included. Each A token finds its most similar B token
(cosine similarity of the metric, usually head-averaged keys); the ``r`` A tokens with the
most similar partners are merged into them. Ties in that ranking go to the earlier A token (a
stable sort; ToMe's plain ``argsort`` leaves them to the kernel, so the two agree except on
exact ties). Similarities are computed in float32 with the norm floored at ``1e-6``.

Protected tokens (the first ``num_protected``: class, distillation and register tokens) stay
wherever the parity puts them and are masked there, for any number of them: a protected A
token's row of similarities is ``-inf`` (it is never merged), a protected B token's column is
``-inf`` (nothing merges into it). With the class token alone this is ToMe's ``class_token``
rule, with class and distillation tokens its ``distill_token`` rule; ToMe's timm patch does
not know register tokens (it would merge them), here they are protected like the class token.
``r`` is capped at half the unprotected tokens, ``(N - P) // 2``, which never exceeds the
unprotected A tokens and leaves at least one unprotected B token.

Output order: the protected tokens first, in input order; then the unmerged unprotected A
tokens and then the unprotected B tokens, each in input order. With the class token alone
this is ToMe's order. ToMe's merge puts a distillation token (position 1, in B) first among
the B tokens, after the unmerged A tokens; here it stays second, where timm's distilled head
reads it. Attention does not depend on the order; only the protected prefix must stay first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.plan import Plan, take_tokens
from ..core.select import normalize, stable_order


def max_merge(num_tokens: int, num_protected: int = 0) -> int:
    """The largest r one bipartite step can remove: half the mergeable tokens."""
    return max(num_tokens - num_protected, 0) // 2


def bipartite_soft_matching(metric: Tensor, r: int, num_protected: int = 0) -> Plan | None:
    """Plan that merges ``r`` tokens of ``metric`` (B, N, C) into their best partners.

    ``r`` is capped at :func:`max_merge`; returns ``None`` when nothing is merged. The first
    ``num_protected`` tokens are never merged nor merged into, and stay first (see the module
    docstring for the split and the order).
    """
    B, N, _ = metric.shape
    P = min(int(num_protected), N)
    r = min(int(r), max_merge(N, P))
    if r <= 0:
        return None
    pa, pb = (P + 1) // 2, P // 2  # protected tokens in A (even positions) and in B (odd)
    with torch.no_grad():
        # ToMe's cosine similarity, in float32 with a floored norm (all-zero keys give
        # similarity 0, not NaN)
        metric = normalize(metric)
        a, b = metric[:, ::2], metric[:, 1::2]
        num_a, num_b = a.shape[1], b.shape[1]
        scores = a @ b.transpose(-1, -2)
        if pa:
            scores[:, :pa, :] = float("-inf")
        if pb:
            scores[:, :, :pb] = float("-inf")
        # the best similarity of every A token, but its partner only for the r merged ones:
        # amax is an order of magnitude faster than max with indices on the CPU, and argmax
        # of a row picks the same (first) maximum as max would
        best_sim = scores.amax(dim=-1)
        order = stable_order(best_sim)  # ToMe's argsort(descending=True); ties: earlier first
        # masked rows are -inf and sort last, so the r merged A tokens are all unprotected
        src_a = order[:, :r]
        best_b = take_tokens(scores, src_a).argmax(dim=-1)
        unm_a = order[:, r:].sort(dim=-1).values[:, pa:]  # the protected A rows come first

        dev = metric.device
        prefix = torch.arange(P, device=dev).expand(B, P)
        b_idx = (1 + 2 * torch.arange(pb, num_b, device=dev)).expand(B, num_b - pb)
        keep = torch.cat([prefix, 2 * unm_a, b_idx], dim=1)
        src = 2 * src_a
        # B token j (j >= pb) sits after the prefix and the unmerged unprotected A tokens
        dst = best_b + (P + num_a - pa - r - pb)
    return Plan(keep=keep, src=src, dst=dst, num_tokens=N)
