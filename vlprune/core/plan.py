"""The one compaction primitive: a :class:`Plan` turns ``(B, N, C)`` tokens into ``(B, K, C)``.

Every reduction method in vlprune (bipartite merging, score-based pruning, fusion, recycling,
temporal merging) ends in a Plan: which tokens survive (``keep``), which are merged into a
survivor (``src`` -> ``dst``), and, implicitly, which are dropped (all others). Applying a plan
is a gather plus a scatter-add, weighted by token size so that a merged token is the mean of
everything it absorbed.
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
    """

    keep: Tensor
    src: Tensor | None = None
    dst: Tensor | None = None
    weight: Tensor | None = None
    num_tokens: int = -1
    fresh: tuple[int, ...] = ()

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
        ``None`` (pure pruning of unmerged tokens keeps every size at 1).
        """
        self._check(x)
        if self.src is None:
            out = _gather(x, self.keep)
            return out, (None if size is None else _gather(size, self.keep))
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        w = size if self.weight is None else size * self.weight.to(size.dtype)
        xw = x * w
        dst = self.dst.unsqueeze(-1)
        num = _gather(xw, self.keep).scatter_add(1, dst.expand(-1, -1, x.shape[-1]), _gather(xw, self.src))
        den = _gather(w, self.keep).scatter_add(1, dst, _gather(w, self.src))
        if self.weight is None:
            return num / den, den
        new_size = _gather(size, self.keep).scatter_add(1, dst, _gather(size, self.src))
        return num / den, new_size

    def accumulate(self, t: Tensor) -> Tensor:
        """Compact ``t`` (B, N, C) by summing each merge group, no averaging: for a source map
        (row i marks the input tokens token i holds) or for counts."""
        self._check(t)
        out = _gather(t, self.keep)
        if self.src is not None:
            out = out.scatter_add(1, _expand_index(self.dst, t.shape[-1]), _gather(t, self.src))
        return out


def _expand_index(index: Tensor, channels: int) -> Tensor:
    return index.unsqueeze(-1).expand(-1, -1, channels)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, _expand_index(index, x.shape[-1]))


def identity_source(batch: int, num_tokens: int, *, device=None, dtype=torch.float32) -> Tensor:
    """The ``(B, N, N)`` source map of an untouched sequence (each token holds itself)."""
    eye = torch.eye(num_tokens, device=device, dtype=dtype)
    return eye.unsqueeze(0).expand(batch, -1, -1).contiguous()
