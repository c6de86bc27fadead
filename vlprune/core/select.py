"""Selection rules: turn per-token scores into a compaction :class:`~vlprune.core.Plan`.

* ``drop``: keep the protected prefix and the top-k unprotected tokens (in their order);
* ``fuse``: also fuse every dropped token into one extra token, appended last (EViT). With
  class-attention weights it is EViT's token: the sum of the dropped tokens, each times the
  class token's attention to it (not renormalised, so it is as small as the attention the
  dropped tokens got); without weights, the size-weighted mean of the dropped tokens. Its size
  is the count of tokens it holds, but proportional attention treats it as one fresh token
  (giving it the weight of all it holds cost 5.8 pt top-1 more on ViT-Ti);
* ``recycle``: nearest-kept recycling: merge every dropped token into its most similar kept
  token, sizes carried (PruMerge's own rule, a k-NN attention-weighted update of each kept
  token, differs).

Token counts depend only on the input length and the keep rate (top-k, no thresholds), so
shapes stay static for ``torch.compile``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .plan import Plan, acc_dtype, take_tokens

MODES = ("drop", "fuse", "recycle")


@dataclass(frozen=True)
class FusePlan(Plan):
    """EViT's fusion: the last output token is ``sum_j attn_j * x_j`` over its merge group
    (``keep[:, -1]`` and every ``src`` token: all the dropped tokens), a weighted sum, not a
    mean; every other survivor is kept as is. Sizes add up as for any plan, so the fused token
    counts every input token it holds (``fresh`` makes attention see it as one token).

    ``attn``: ``(B, N, 1)`` weight of each input token (the class token's attention, heads
    averaged). ``src``/``dst`` describe the group as usual, so the source map, positions and
    :meth:`~vlprune.core.Plan.index_map` follow the plan unchanged.
    """

    attn: Tensor | None = None

    def apply(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        acc = acc_dtype(x.dtype)  # the weighted sum and the sizes in float32 at least
        group = self.keep[:, -1:] if self.src is None else torch.cat([self.keep[:, -1:], self.src], 1)
        w = take_tokens(self.attn.to(acc), group)  # (B, D, 1)
        fused = (take_tokens(x, group).to(acc) * w).sum(dim=1, keepdim=True).to(x.dtype)
        out = torch.cat([take_tokens(x, self.keep[:, :-1]), fused], dim=1)
        size = torch.ones(*x.shape[:2], 1, dtype=acc, device=x.device) if size is None else size.to(acc)
        return out, self.accumulate(size)


NORM_EPS = 1e-6


def normalize(metric: Tensor, eps: float = NORM_EPS) -> Tensor:
    """``metric`` (…, C) divided by its L2 norm along the last axis (at least ``eps``, so a
    zero vector stays zero instead of NaN), in float32 at least: cosine similarities of
    bfloat16 keys would tie far more often."""
    m = metric.to(acc_dtype(metric.dtype))
    return m / m.norm(dim=-1, keepdim=True).clamp_min(eps)


def stable_order(scores: Tensor) -> Tensor:
    """Indices sorting ``scores`` (…, N) best first along the last axis; equal scores keep
    their input order (a stable sort), so ties break the same way on every run, device and
    batch layout (``topk`` and a plain ``argsort`` do not promise that)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def count_or_ratio(value: Any, name: str, what: str = "") -> int | float:
    """Validate a budget given as an ``int`` count (>= 1) or a ``float`` ratio in (0, 1]:
    returns it as ``int`` or ``float``; raises ``ValueError`` naming ``name`` and what is
    allowed (``what`` says what is counted, e.g. "tokens each frame keeps")."""
    about = f" ({what})" if what else ""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(
                f"{name}={value} keeps no token; give an int count >= 1 or a float ratio in (0, 1]"
            )
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 < value <= 1.0:
        return float(value)
    raise ValueError(f"{name} must be an int count >= 1 or a float ratio in (0, 1]{about}, got {value!r}")


def count_of(keep: int | float, num_tokens: int, name: str = "keep",
             have: str = "there are only {n} tokens") -> int:
    """Tokens a budget keeps of ``num_tokens``: an int count as is (refused above
    ``num_tokens``, the error saying ``have``), a float ratio as ``ceil(ratio * n)`` (at
    least one)."""
    if isinstance(keep, float):
        return min(num_tokens, max(1, math.ceil(keep * num_tokens)))
    if keep > num_tokens:
        raise ValueError(
            f"{name}={keep} but {have.format(n=num_tokens)}; give a count <= {num_tokens} or a "
            "ratio in (0, 1]"
        )
    return int(keep)


def keep_count(num_tokens: int, num_protected: int, keep: float) -> int:
    """How many unprotected tokens survive a keep rate (at least one, when there is one)."""
    n = num_tokens - num_protected
    return min(n, max(1, math.ceil(keep * n))) if n > 0 else 0


def prune_plan(
    scores: Tensor,
    n_keep: int,
    num_protected: int = 0,
    *,
    mode: str = "drop",
    metric: Tensor | None = None,
    fuse_weight: Tensor | None = None,
) -> Plan | None:
    """Plan keeping the protected prefix and the ``n_keep`` best-scored other tokens.

    ``metric`` (B, N, C) is needed for ``recycle``. ``fuse_weight`` (B, N), the class
    token's attention to each token, makes ``fuse`` EViT's: the fused token is the sum of the
    dropped tokens times their weights (:class:`FusePlan`, which keeps the weights' autograd
    graph: EViT trains through them); without it the fused token is the size-weighted mean of
    the dropped tokens. The selection itself runs without gradients. Returns ``None`` when
    every token survives.
    """
    if mode not in MODES:
        raise ValueError(f"unknown selection mode {mode!r}; allowed: {list(MODES)}")
    B, N = scores.shape
    P = num_protected
    n_drop = N - P - n_keep
    if n_drop <= 0:
        return None
    dev = scores.device
    with torch.no_grad():
        # stable: equal scores keep their input order, so ties resolve the same on every run
        order = stable_order(scores[:, P:]) + P
        kept = order[:, :n_keep].sort(dim=1).values
        dropped = order[:, n_keep:]  # best-scored dropped token first
        prefix = torch.arange(P, device=dev).expand(B, P)
        if mode == "drop":
            return Plan(keep=torch.cat([prefix, kept], dim=1), num_tokens=N)
        if mode == "fuse":
            keep = torch.cat([prefix, kept, dropped[:, :1]], dim=1)
            last = keep.shape[1] - 1
            src = dropped[:, 1:] if n_drop > 1 else None
            dst = None if src is None else torch.full_like(src, last)
            if fuse_weight is None:
                if src is None:
                    return Plan(keep=keep, num_tokens=N)
                return Plan(keep=keep, src=src, dst=dst, num_tokens=N, fresh=(last,))
        elif metric is None:
            raise ValueError("mode='recycle' needs the metric (keys) to find similar tokens")
    if mode == "fuse":  # EViT: the fused token is differentiated through its weights too
        return FusePlan(keep=keep, src=src, dst=dst, num_tokens=N, fresh=(last,),
                        attn=fuse_weight.unsqueeze(-1))
    with torch.no_grad():
        m = normalize(metric)
        sim = take_tokens(m, dropped) @ take_tokens(m, kept).transpose(1, 2)
        dst = P + sim.argmax(dim=-1)
        return Plan(keep=torch.cat([prefix, kept], dim=1), src=dropped, dst=dst, num_tokens=N)
