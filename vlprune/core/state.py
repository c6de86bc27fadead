"""Per-forward token state: what each token stands for as a sequence is compacted.

One :class:`TokenState` lives for one forward pass of a patched model. It carries the size of
each token (how many input tokens it averages), optionally the source map (which input tokens
it holds), and how many leading tokens are protected (class, distillation, register tokens:
never merged or dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .attention import size_bias
from .plan import Plan, identity_source


@dataclass
class TokenState:
    """Sizes, sources and protected prefix of the current token sequence.

    ``size`` is ``None`` until the first merge (all tokens have size 1): the unreduced path
    then does no extra work. ``source`` is only kept when ``trace_source`` is set.
    ``attn_size`` is the size proportional attention uses; it is ``None`` (the same as
    ``size``) unless a plan created fresh tokens (EViT fusion).
    """

    num_protected: int = 0
    trace_source: bool = False
    size: Tensor | None = None
    source: Tensor | None = None
    attn_size: Tensor | None = None

    def check(self, x: Tensor) -> None:
        """Fail loudly if ``x`` is not the sequence this state describes."""
        if self.size is not None and tuple(self.size.shape[:2]) != tuple(x.shape[:2]):
            raise RuntimeError(
                f"token state holds sizes for shape {tuple(self.size.shape[:2])} but the block got "
                f"tokens of shape {tuple(x.shape[:2])}; a patched model must be run from its "
                "top-level forward (or forward_features), which starts a fresh token state"
            )

    def attn_bias(self, dtype) -> Tensor | None:
        """Proportional-attention bias ``log(size)`` as ``(B, 1, 1, N)``, or ``None``."""
        size = self.size if self.attn_size is None else self.attn_size
        return None if size is None else size_bias(size, dtype)

    def compact(self, plan: Plan, x: Tensor) -> Tensor:
        """Apply ``plan`` to ``x`` and to this state's size and source; return the new ``x``."""
        if self.trace_source:
            if self.source is None:
                self.source = identity_source(x.shape[0], x.shape[1], device=x.device, dtype=x.dtype)
            self.source = plan.accumulate(self.source)
        if self.attn_size is not None:
            self.attn_size = plan.accumulate(self.attn_size)
        x, self.size = plan.apply(x, self.size)
        if plan.fresh:
            if self.attn_size is None:
                self.attn_size = self.size.clone()
            self.attn_size[:, list(plan.fresh)] = 1.0
        return x
