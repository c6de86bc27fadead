"""The one compaction primitive: a :class:`Plan` turns ``(B, N, C)`` tokens into ``(B, K, C)``.

Every reduction method in vlprune (bipartite merging, score-based pruning, fusion, recycling,
temporal merging) ends in a Plan: which tokens survive (``keep``), which are merged into a
survivor (``src`` -> ``dst``), and, implicitly, which are dropped (all others). Applying a plan
is a gather plus a scatter-add, weighted by token size so that a merged token is the mean of
everything it absorbed.

Numerics: sizes are counts, kept in float32 (at least) whatever the activation dtype: bfloat16
holds integers exactly only up to 256 and float16 up to 2048, so heavy merging at high
resolution would otherwise get wrong sizes. Size-weighted means are computed in float32 and
cast back to the tokens' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Plan:
    """A many-to-one compaction of a token sequence.

    Attributes:
        keep: ``(B, K)`` int64 indices (into the input's N tokens) of the survivors, in output
            order. Protected tokens must come first and in their input order.
        src: ``(B, M)`` int64 indices of tokens merged away, or ``None`` for pure pruning.
        dst: ``(B, M)`` int64 *output* positions (``0 <= dst < K``) that each ``src`` token
            merges into.
        weight: optional ``(B, N, 1)`` positive weight per *input* token used when averaging
            a merge group (score-weighted fusion, EViT); sizes still add up unweighted, so a
            fused token keeps the count of input tokens it holds. ``None`` means 1.
        num_tokens: the input token count N the plan was built for.
        fresh: output positions of tokens that start afresh for proportional attention (a
            fused token of unrelated tokens is one new token, not ``size`` copies of one:
            EViT). Their size still counts every input token they hold.
        src_mask: optional ``(B, M)`` bool: ``False`` entries of ``src`` are dropped, not
            merged (padded rows of a ragged batch merge fewer tokens than others).
    """

    keep: Tensor
    src: Tensor | None = None
    dst: Tensor | None = None
    weight: Tensor | None = None
    num_tokens: int = -1
    fresh: tuple[int, ...] = ()
    src_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.keep.dim() != 2:
            raise ValueError(f"Plan.keep must be (B, K), got shape {tuple(self.keep.shape)}")
        if (self.src is None) != (self.dst is None):
            raise ValueError("Plan.src and Plan.dst must be given together")
        if self.src is not None and self.src.shape != self.dst.shape:
            raise ValueError(
                f"Plan.src {tuple(self.src.shape)} and Plan.dst {tuple(self.dst.shape)} differ"
            )

    @property
    def num_kept(self) -> int:
        return self.keep.shape[1]

    @property
    def num_merged(self) -> int:
        return 0 if self.src is None else self.src.shape[1]

    def _check(self, x: Tensor) -> None:
        if x.dim() != 3:
            raise ValueError(f"expected tokens of shape (B, N, C), got {tuple(x.shape)}")
        if self.num_tokens >= 0 and x.shape[1] != self.num_tokens:
            raise ValueError(
                f"this plan was built for {self.num_tokens} tokens, got {x.shape[1]}"
            )
        if x.shape[0] != self.keep.shape[0]:
            raise ValueError(f"plan batch {self.keep.shape[0]} != token batch {x.shape[0]}")

    def apply(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Compact ``x`` (B, N, C); returns the new tokens and their sizes.

        ``size`` is ``(B, N, 1)`` (how many input tokens each token stands for) or ``None`` for
        all ones. The returned size is ``None`` only when no merge happened and ``size`` was
        ``None`` (pure pruning of unmerged tokens keeps every size at 1). Sizes come back in
        :func:`acc_dtype` (float32 for float32 / float16 / bfloat16 tokens); the weighted
        means are computed in that dtype and returned in ``x``'s dtype.
        """
        self._check(x)
        B, N, _ = x.shape
        acc = acc_dtype(x.dtype)
        keep = _flat_index(self.keep, N)
        if size is not None and size.dtype != acc:
            size = size.to(acc)
        if self.src is None:
            return take_flat(x, keep, B), (None if size is None else take_flat(size, keep, B))
        src = _flat_index(self.src, N)
        dst = _flat_index(self.dst, self.num_kept)
        out = take_flat(x, keep, B).to(acc)
        merged = take_flat(x, src, B).to(acc)
        if self.weight is None:
            # Each survivor moves towards the tokens merged into it, by their share of the
            # group's size: x_d + sum_j s_j / S (x_j - x_d) with S = s_d + sum_j s_j, the
            # size-weighted mean. Only the M merged rows are computed on: a survivor nothing
            # merges into is copied unchanged (not multiplied and divided by its size).
            s_keep = (torch.ones(B, self.num_kept, 1, dtype=acc, device=x.device) if size is None
                      else take_flat(size, keep, B))
            s_src = (torch.ones(B, self.num_merged, 1, dtype=acc, device=x.device) if size is None
                     else take_flat(size, src, B))
            s_src = self._masked(s_src)
            den = _add_into(s_keep, dst, s_src)  # s_keep is a fresh gather: summed in place
            share = s_src / den.view(-1, 1).index_select(0, dst).view_as(s_src)
            towards = merged.sub_(take_flat(out, dst, B)).mul_(share)
            return _add_into(out, dst, towards).to(x.dtype), den
        # score-weighted groups: weight the gathered copies in place, then divide by the
        # summed weights (the sizes still add up unweighted)
        if size is None:
            size = torch.ones(B, N, 1, dtype=acc, device=x.device)
        w = size * self.weight.to(acc)
        w_keep, w_src = take_flat(w, keep, B), take_flat(w, src, B)
        num = _add_into(out.mul_(w_keep), dst, self._masked(merged.mul_(w_src)))
        den = _add_into(w_keep, dst, self._masked(w_src))
        new_size = _add_into(take_flat(size, keep, B), dst, self._masked(take_flat(size, src, B)))
        return num.div_(den).to(x.dtype), new_size

    def _masked(self, values: Tensor) -> Tensor:
        """Zero the merged-in ``values`` (B, M, C) of ``src`` entries that are only dropped."""
        if self.src_mask is None:
            return values
        return values * self.src_mask.unsqueeze(-1).to(values.dtype)

    def take_max(self, t: Tensor) -> Tensor:
        """Compact ``t`` (B, N) of integers by the maximum of each merge group (positions: a
        merged token is as late as its latest source, so causal masks stay causal)."""
        out = t.gather(1, self.keep)
        if self.src is None:
            return out
        src = t.gather(1, self.src)
        if self.src_mask is not None:
            src = src.masked_fill(~self.src_mask, torch.iinfo(t.dtype).min)
        return out.scatter_reduce(1, self.dst, src, reduce="amax")

    def index_map(self) -> Tensor:
        """``(B, N)`` int64: the output position each input token ends up in (kept, or merged
        into a survivor), ``-1`` for dropped tokens."""
        B, N = self.keep.shape[0], self.num_tokens
        if N < 0:
            raise ValueError("index_map needs the plan's num_tokens")
        out = torch.full((B, N), -1, dtype=torch.long, device=self.keep.device)
        out.scatter_(1, self.keep, torch.arange(self.num_kept, device=out.device).expand_as(self.keep))
        if self.src is not None:
            dst = self.dst
            if self.src_mask is not None:  # unmasked fillers keep what they already map to
                dst = torch.where(self.src_mask, dst, out.gather(1, self.src))
            out.scatter_(1, self.src, dst)
        return out

    def follow(self, origin: Tensor) -> Tensor:
        """Move an index map through this plan: ``origin`` (B, N0) int64 gives, for each of
        N0 input tokens, the current token (of this plan's N) that holds it, ``-1`` when it
        was dropped. Returns the same map after the plan (``-1`` stays ``-1``; a token whose
        holder is dropped becomes ``-1``)."""
        held = origin >= 0
        new = self.index_map().gather(1, origin.clamp(min=0))
        return torch.where(held, new, origin)

    def accumulate(self, t: Tensor) -> Tensor:
        """Compact ``t`` (B, N, C) by summing each merge group, no averaging: for a source map
        (row i marks the input tokens token i holds) or for counts."""
        self._check(t)
        B, N, _ = t.shape
        out = take_flat(t, _flat_index(self.keep, N), B)
        if self.src is not None:
            merged = self._masked(take_flat(t, _flat_index(self.src, N), B))
            out = _add_into(out, _flat_index(self.dst, self.num_kept), merged)
        return out


# Token gathers go through a flattened (B * N, C) view and index_select / index_add_, which on
# CPU is an order of magnitude faster than gather/scatter_add with an expanded (B, K, C) index.


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sizes and size-weighted sums use for tokens of ``dtype``: float32, or the
    tokens' own dtype when it is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def _flat_index(index: Tensor, n: int) -> Tensor:
    """``(B, K)`` per-sample indices into ``n`` tokens -> ``(B * K,)`` rows of a flat view."""
    if n <= 0:  # no tokens: the index is empty
        return index.reshape(-1)
    offsets = torch.arange(0, index.shape[0] * n, n, device=index.device).unsqueeze(1)
    return (index + offsets).reshape(-1)


def take_flat(x: Tensor, flat_index: Tensor, batch: int) -> Tensor:
    """Rows ``flat_index`` of ``x`` viewed as ``(B * N, C)``, shaped back to ``(B, K, C)``."""
    out = x.reshape(-1, x.shape[-1]).index_select(0, flat_index)
    return out.view(batch, -1, x.shape[-1])


def take_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` for ``x`` (B, N, C) and ``index`` (B, K)."""
    return take_flat(x, _flat_index(index, x.shape[1]), x.shape[0])


def _add_into(out: Tensor, flat_dst: Tensor, values: Tensor) -> Tensor:
    """``out`` (B, K, C) with ``values`` (B, M, C) added at flat rows ``flat_dst``."""
    out.view(-1, out.shape[-1]).index_add_(0, flat_dst, values.reshape(-1, values.shape[-1]))
    return out


def identity_source(batch: int, num_tokens: int, *, device=None, dtype=torch.float32) -> Tensor:
    """The ``(B, N, N)`` source map of an untouched sequence (each token holds itself)."""
    eye = torch.eye(num_tokens, device=device, dtype=dtype)
    return eye.unsqueeze(0).expand(batch, -1, -1).contiguous()


def identity_origin(batch: int, num_tokens: int, *, device=None) -> Tensor:
    """The ``(B, N)`` index map of an untouched sequence: input token ``j`` is held by token
    ``j`` (see :meth:`Plan.follow`)."""
    return torch.arange(num_tokens, device=device).expand(batch, num_tokens).contiguous()


def dense_source(origin: Tensor, num_tokens: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense ``(B, N, N0)`` source map of an index map ``origin`` (B, N0): entry
    ``[b, i, j]`` is 1 where current token ``i`` holds input token ``j``, 0 elsewhere; the
    column of a dropped input token (``origin == -1``) is all zeros. Row sums are the sizes."""
    B, N0 = origin.shape
    out = torch.zeros(B, num_tokens, N0, dtype=dtype, device=origin.device)
    held = (origin >= 0).to(dtype).unsqueeze(1)
    return out.scatter_(1, origin.clamp(min=0).unsqueeze(1), held)
