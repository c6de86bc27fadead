"""Temporal merging of a frame stream ``(B, T, N, D)``: tokens of frame ``t`` that repeat
frame ``t - 1`` are merged into it, as a core :class:`~vlprune.core.Plan`.

Frame 0 keeps every token. For ``t >= 1`` every token of frame ``t`` finds its *match* in
frame ``t - 1`` and its redundancy is the cosine similarity of the two (on ``metric``, by
default the tokens themselves):

* ``match="position"`` (default): the match is the token of frame ``t - 1`` at the same spatial
  place. Without spatial merging that is the token with the same index; after spatial merging
  (``spatial_r``) a token's place is the set of input positions it holds, and the match is the
  most similar token of frame ``t - 1`` that shares at least one of them. A static background
  collapses, a moving object stays (the places it enters and leaves both change).
* ``match="global"``: the most similar token anywhere in frame ``t - 1`` (camera motion,
  shuffled token orders); an object that moves without changing its look then merges too.

Which tokens merge:

* ``keep`` (static budget, the hot path): each frame ``t >= 1`` keeps its ``keep`` least
  redundant tokens (an int count, or a float ratio ``ceil(keep * N)``); the others merge. Every
  row then has ``N + (T - 1) * keep`` tokens.
* ``threshold``: every token of frame ``t >= 1`` whose similarity is ``>= threshold`` merges.
  Counts differ per row: the output is padded, with a ``valid`` mask.

A merged token joins the output token its match belongs to; when the match merged itself, the
chain is followed back to the survivor that holds it (so repeated frames end in frame 0's
tokens). Output tokens are the size-weighted mean of every input token they hold. They come
frame by frame, each frame's survivors in their order. ``spatial_r`` first runs ToMe bipartite
merging (:func:`~vlprune.merging.bipartite_soft_matching`) inside every frame.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.plan import Plan, acc_dtype
from ..core.select import count_of, count_or_ratio
from .bipartite import bipartite_soft_matching, max_merge

MATCH_MODES = ("position", "global")


@dataclass
class TemporalResult:
    """What :func:`temporal_merge` gives, for ``B`` rows of ``T`` frames of ``N`` tokens.

    Attributes:
        tokens: ``(B, K, D)`` merged tokens, frame by frame (padding at the end of a row in
            threshold mode).
        size: ``(B, K)`` how many input tokens each output token holds (weighted by the input
            ``sizes`` when given); 0 for padding. float32 (float64 for float64 tokens).
        frame: ``(B, K)`` int64 frame of each output token (the first frame it covers); -1 for
            padding.
        assign: ``(B, T, N)`` int64: the output token that holds input token ``(t, n)``.
        valid: ``(B, K)`` bool, ``False`` for padding; ``None`` when no row is padded (static
            budget).
        counts: output tokens of each row.
    """

    tokens: Tensor
    size: Tensor
    frame: Tensor
    assign: Tensor
    valid: Tensor | None
    counts: list[int]

    @property
    def num_frames(self) -> int:
        return self.assign.shape[1]

    @property
    def source(self) -> Tensor:
        """``(B, K, T, N)`` bool: ``source[b, k, t, n]`` when output token ``k`` holds input
        token ``n`` of frame ``t`` (for visualisation)."""
        B, T, N = self.assign.shape
        K = self.tokens.shape[1]
        out = torch.zeros(B, K, T * N, dtype=torch.bool, device=self.assign.device)
        out.scatter_(1, self.assign.view(B, 1, T * N), True)
        return out.view(B, K, T, N)

    def coverage(self) -> Tensor:
        """``(B, K, T)`` bool: the frames each output token covers."""
        return self.source.any(dim=-1)

    def rows(self) -> list[Tensor]:
        """Each row's ``(K_b, D)`` tokens without padding."""
        return [self.tokens[b, :k] for b, k in enumerate(self.counts)]


def temporal_keep_count(keep: int | float, num_tokens: int) -> int:
    """Tokens a frame ``t >= 1`` keeps: an int count as is, a ratio ``ceil(keep * n)`` (>= 1)."""
    return count_of(keep, num_tokens, "keep", "a frame has only {n} tokens")


def _check(x, keep, threshold, spatial_r, sizes, metric, match) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"temporal_merge expects frames of shape (B, T, N, D), got {shape}")
    B, T, N, _ = x.shape
    if T < 1 or N < 1:
        raise ValueError(f"temporal_merge needs at least one frame and one token, got {tuple(x.shape)}")
    if (keep is None) == (threshold is None):
        raise ValueError("give exactly one of keep (a static per-frame budget) and threshold "
                         "(merge every token at least this similar to its match)")
    if not isinstance(spatial_r, numbers.Integral) or isinstance(spatial_r, bool) or spatial_r < 0:
        raise ValueError(f"spatial_r must be an int >= 0, got {spatial_r!r}")
    n = N - min(int(spatial_r), max_merge(N))
    if keep is not None:
        count_of(count_or_ratio(keep, "keep", "tokens each frame after the first keeps"), n,
                 "keep", "each frame has only {n} tokens (after spatial merging)")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                                  or not -1.0 <= threshold <= 1.0):
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold!r}")
    if match not in MATCH_MODES:
        raise ValueError(f"unknown match {match!r}; allowed: {list(MATCH_MODES)}")
    if metric is not None and tuple(metric.shape[:3]) != (B, T, N):
        raise ValueError(f"metric must be (B, T, N, C) = ({B}, {T}, {N}, C), got {tuple(metric.shape)}")
    if sizes is not None and tuple(sizes.shape[:3]) != (B, T, N):
        raise ValueError(f"sizes must be (B, T, N) = ({B}, {T}, {N}), got {tuple(sizes.shape)}")


def _spatial(x: Tensor, metric: Tensor, size: Tensor, r: int):
    """ToMe-merge ``r`` tokens inside each frame of ``(F, N, C)`` frames. Returns the merged
    tokens, metric, sizes and, per input token, the index of the frame token holding it."""
    F, N, _ = x.shape
    arange = torch.arange(N, device=x.device).expand(F, N)
    plan = bipartite_soft_matching(metric, r) if r > 0 else None
    if plan is None:
        return x, metric, size, arange
    x, new_size = plan.apply(x, size)
    metric, _ = plan.apply(metric, size)
    slot = torch.empty(F, N, dtype=torch.long, device=x.device)
    slot.scatter_(1, plan.keep, arange[:, : plan.num_kept])
    slot.scatter_(1, plan.src, plan.dst)
    return x, metric, new_size, slot


def _matches(m: Tensor, slot: Tensor | None, match: str) -> tuple[Tensor, Tensor]:
    """For frames ``t >= 1`` of ``m`` (B, T, n, C): the similarity of each token to its match in
    frame ``t - 1`` and the match's index, both ``(B, T - 1, n)``."""
    m = torch.nn.functional.normalize(m.float(), dim=-1)
    cur, prev = m[:, 1:], m[:, :-1]
    if match == "position" and slot is None:
        sim = (cur * prev).sum(-1)
        idx = torch.arange(m.shape[2], device=m.device).expand_as(sim)
        return sim, idx
    sim = cur @ prev.transpose(-1, -2)  # (B, T-1, n, n)
    if match == "position":
        # a token's place: the input positions it holds; matches must share one
        B, T, N = slot.shape
        n = m.shape[2]
        held = torch.zeros(B, T, n, N, device=m.device)
        held.scatter_(2, slot.unsqueeze(2), 1.0)
        overlap = held[:, 1:] @ held[:, :-1].transpose(-1, -2)
        sim = sim.masked_fill(overlap == 0, float("-inf"))
    return sim.max(dim=-1)


def temporal_merge(
    x: Tensor,
    keep: int | float | None = None,
    threshold: float | None = None,
    spatial_r: int = 0,
    sizes: Tensor | None = None,
    metric: Tensor | None = None,
    match: str = "position",
) -> TemporalResult:
    """Merge the tokens of each frame that repeat the previous frame (see the module docstring).

    Args:
        x: ``(B, T, N, D)`` tokens: ``B`` independent rows (videos) of ``T`` frames.
        keep: static budget: tokens each frame ``t >= 1`` keeps, an int count (1 .. tokens per
            frame after spatial merging) or a float ratio in (0, 1]. ``1.0`` keeps everything.
        threshold: instead of ``keep``: merge every token of a frame ``t >= 1`` whose cosine
            similarity to its match is ``>= threshold`` (in [-1, 1]).
        spatial_r: ToMe merges inside each frame first (capped at half the frame's tokens).
        sizes: optional ``(B, T, N)`` or ``(B, T, N, 1)`` sizes of the input tokens.
        metric: optional ``(B, T, N, C)`` features to compare (keys, say); default ``x``.
        match: ``"position"`` (the same spatial place in frame ``t - 1``) or ``"global"``.

    Returns:
        a :class:`TemporalResult`. Rows are independent of each other.
    """
    _check(x, keep, threshold, spatial_r, sizes, metric, match)
    B, T, N, D = x.shape
    metric = x if metric is None else metric
    acc = acc_dtype(x.dtype)  # sizes are counts: float32 whatever the tokens' dtype
    size = None if sizes is None else sizes.reshape(B * T, N, 1).to(acc)
    r = min(int(spatial_r), max_merge(N))
    if r > 0 and size is None:
        size = torch.ones(B * T, N, 1, dtype=acc, device=x.device)
    xs, ms, size, slot = _spatial(x.reshape(B * T, N, D), metric.reshape(B * T, N, -1), size, r)
    n = xs.shape[1]
    xs = xs.reshape(B, T * n, D)
    slot = slot.view(B, T, N)
    size_flat = None if size is None else size.reshape(B, T * n, 1)

    # which tokens survive, and the frame t-1 token each merged one joins
    survive = torch.ones(B, T, n, dtype=torch.bool, device=x.device)
    if T > 1:
        sim, idx = _matches(ms.reshape(B, T, n, -1), slot if r > 0 else None, match)
        if keep is not None:
            k = temporal_keep_count(keep, n)
            order = sim.argsort(dim=-1, stable=True)  # least redundant first
            survive[:, 1:].scatter_(-1, order[..., k:], False)
        else:
            survive[:, 1:] = sim < threshold
    # output index of every frame token, following merge chains back to their survivor
    counts_per_frame = survive.sum(dim=-1)  # (B, T)
    first = counts_per_frame.cumsum(dim=-1) - counts_per_frame
    rank = survive.long().cumsum(dim=-1) - 1 + first.unsqueeze(-1)
    root = torch.empty(B, T, n, dtype=torch.long, device=x.device)
    root[:, 0] = rank[:, 0]
    for t in range(1, T):
        root[:, t] = torch.where(survive[:, t], rank[:, t], root[:, t - 1].gather(1, idx[:, t - 1]))
    counts = counts_per_frame.sum(dim=-1)
    frames = torch.arange(T, device=x.device).view(1, T, 1).expand(B, T, n)

    if keep is not None or bool((counts == counts[0]).all()):
        out, out_size, out_frame = _apply(xs, size_flat, survive.view(B, -1), root.view(B, -1),
                                          frames.reshape(B, -1))
        valid = None
    else:  # threshold mode: one plan per row, padded to the longest
        K = int(counts.max())
        out = xs.new_zeros(B, K, D)
        out_size = torch.zeros(B, K, dtype=acc, device=x.device)
        out_frame = torch.full((B, K), -1, dtype=torch.long, device=x.device)
        valid = torch.zeros(B, K, dtype=torch.bool, device=x.device)
        for b in range(B):
            kb = int(counts[b])
            o, s, f = _apply(xs[b : b + 1], None if size_flat is None else size_flat[b : b + 1],
                             survive[b].view(1, -1), root[b].view(1, -1), frames[b].reshape(1, -1))
            out[b, :kb], out_size[b, :kb], out_frame[b, :kb] = o[0], s[0], f[0]
            valid[b, :kb] = True
    assign = root.view(B, T * n).gather(1, (slot + n * torch.arange(T, device=x.device).view(1, T, 1))
                                        .view(B, T * N)).view(B, T, N)
    return TemporalResult(out, out_size, out_frame, assign, valid, counts.tolist())


def _apply(xs: Tensor, size: Tensor | None, survive: Tensor, root: Tensor, frames: Tensor):
    """One Plan over the flattened frames ``(B, T * n, D)``: survivors in order, every other
    token merged into its root."""
    B = xs.shape[0]
    keep = survive.nonzero()[:, 1].view(B, -1)
    gone = (~survive).nonzero()[:, 1].view(B, -1)
    if gone.shape[1]:
        plan = Plan(keep=keep, src=gone, dst=root.gather(1, gone), num_tokens=xs.shape[1])
    else:
        plan = Plan(keep=keep, num_tokens=xs.shape[1])
    out, new_size = plan.apply(xs, size)
    if new_size is None:
        new_size = torch.ones(B, keep.shape[1], dtype=acc_dtype(xs.dtype), device=xs.device)
    else:
        new_size = new_size[..., 0]
    return out, new_size, frames.gather(1, keep)
