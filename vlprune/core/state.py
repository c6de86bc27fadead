"""Per-forward token state: what each token stands for as a sequence is compacted.

One :class:`TokenState` lives for one forward pass of a patched model. It carries the size of
each token (how many input tokens it averages), optionally the source map (which input tokens
it holds), and how many leading tokens are protected (class, distillation, register tokens:
never merged or dropped).

Sequences (text) also carry, per token, its position (``pos``: the latest input position it
holds, so a causal mask stays causal after merging) and whether it is a real token or padding
(``valid``). With ``valid`` set, reduction is *ragged*: each row reduces its own real tokens
by its own budget and padding fills the difference, so a row's result does not depend on its
batch neighbours (see :mod:`vlprune.core.ragged`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import AttnSpec
from .plan import Plan, acc_dtype, dense_source, identity_origin, take_tokens


@dataclass
class TokenState:
    """Sizes, sources and protected prefix of the current token sequence.

    ``size`` is ``None`` until the first merge (all tokens have size 1): the unreduced path
    then does no extra work. ``attn_size`` is the size proportional attention uses; it is
    ``None`` (the same as ``size``) unless a plan created fresh tokens (EViT fusion). Both are
    ``(B, N, 1)`` in float32 (float64 for float64 tokens) whatever the activation dtype, so
    they stay exact counts (bfloat16 holds integers exactly only up to 256).

    With ``trace_source`` the state keeps ``origin`` ``(B, N0)`` int64: for each input token,
    the index of the current token that holds it, ``-1`` once it is dropped (``None`` until
    the first compaction). :attr:`source` builds the dense ``(B, N, N0)`` map from it on
    demand.
    """

    num_protected: int = 0
    trace_source: bool = False
    size: Tensor | None = None
    attn_size: Tensor | None = None
    origin: Tensor | None = None  # (B, N0) int64 with trace_source, -1 for dropped tokens
    num_tokens: int | None = None  # current token count, set by every compaction
    count_dtype: torch.dtype = torch.float32  # of sizes and the dense source map (acc_dtype)
    pos: Tensor | None = None  # (B, N) int64 input position; causal attention when set
    valid: Tensor | None = None  # (B, N) bool, False for padding; ragged reduction when set
    # Full-length output of padded sequences: for each input position, the current token that
    # holds it (-1 once dropped) and, for dropped ones, their value when they left.
    slot: Tensor | None = None  # (B, N0) int64
    left: Tensor | None = None  # (B, N0, C), allocated at the first drop
    just_left: Tensor | None = None  # (B, N0) bool: dropped since the adapter last looked
    _mask: AttnSpec | None = None  # positions / padding of the current tokens, masks cached

    @property
    def source(self) -> Tensor | None:
        """Dense ``(B, N, N0)`` source map of the current tokens, built from :attr:`origin`:
        1 where token ``i`` holds input token ``j``; the columns of dropped input tokens are
        zero. float32 (float64 for float64 tokens), like the sizes. ``None`` before the first
        compaction (or without ``trace_source``): every token holds only itself."""
        if self.origin is None:
            return None
        return dense_source(self.origin, self.num_tokens, self.count_dtype)

    def check(self, x: Tensor) -> None:
        """Fail loudly if ``x`` is not the sequence this state describes."""
        if self.size is not None and tuple(self.size.shape[:2]) != tuple(x.shape[:2]):
            raise RuntimeError(
                f"token state holds sizes for shape {tuple(self.size.shape[:2])} but the block got "
                f"tokens of shape {tuple(x.shape[:2])}; a patched model must be run from its "
                "top-level forward (or forward_features), which starts a fresh token state"
            )

    def attn_spec(self, prop_attn: bool = True) -> AttnSpec | None:
        """What shapes the attention of the current tokens, per key (no ``N x N`` tensor), or
        ``None`` when nothing does: ``log(size)`` as the key bias (proportional attention, if
        ``prop_attn``), and for sequences the positions (causal) and the padding mask. The
        masks built from positions and padding are cached until the next compaction."""
        size = self.size if self.attn_size is None else self.attn_size
        key_bias = size[..., 0].log() if prop_attn and size is not None else None
        if self.pos is None and self.valid is None:
            return None if key_bias is None else AttnSpec(key_bias=key_bias)
        if self._mask is None:
            valid = self.valid if self.valid is not None and not bool(self.valid.all()) else None
            self._mask = AttnSpec(pos=self.pos, valid=valid)
        if key_bias is None and not self._mask.masked:
            return None
        return self._mask.with_bias(key_bias)

    def attn_bias(self, dtype, prop_attn: bool = True) -> Tensor | None:
        """The additive attention mask of the current tokens, or ``None`` when there is none:
        ``log(size)`` as ``(B, 1, 1, N)`` (proportional attention, if ``prop_attn``), plus, for
        sequences, the causal mask by position and the padding mask as ``(B, 1, N, N)``
        (:meth:`AttnSpec.dense` of :meth:`attn_spec`)."""
        spec = self.attn_spec(prop_attn)
        return None if spec is None else spec.dense(dtype)

    def _follow(self, plan: Plan, x: Tensor) -> None:
        """Move ``slot`` through ``plan``; input positions whose token is dropped keep that
        token's value in ``left``."""
        held = self.slot >= 0
        new = plan.follow(self.slot)
        gone = held & (new < 0)
        if bool(gone.any()):
            if self.left is None:
                self.left = x.new_zeros(*self.slot.shape, x.shape[-1])
            value = take_tokens(x, self.slot.clamp(min=0))
            self.left = torch.where(gone.unsqueeze(-1), value.to(self.left.dtype), self.left)
            self.just_left = gone if self.just_left is None else self.just_left | gone
        self.slot = torch.where(held, new, self.slot)

    def full_length(self, x: Tensor) -> Tensor:
        """``(B, N0, C)``: for each input position tracked by ``slot``, the value of the token
        that holds it in ``x``, or its value when it was dropped (zeros where never tracked)."""
        if self.slot is None:
            raise RuntimeError("full_length needs a token state started with slot tracking")
        held = (self.slot >= 0).unsqueeze(-1)
        value = take_tokens(x, self.slot.clamp(min=0))
        rest = self.left if self.left is not None else torch.zeros_like(value)
        return torch.where(held, value, rest.to(value.dtype))

    def compact(self, plan: Plan, x: Tensor) -> Tensor:
        """Apply ``plan`` to ``x`` and to this state's sizes, index maps, positions and mask;
        return the new ``x``."""
        self.count_dtype = acc_dtype(x.dtype)
        if self.trace_source:
            if self.origin is None:
                self.origin = identity_origin(x.shape[0], x.shape[1], device=x.device)
            self.origin = plan.follow(self.origin)
        if self.attn_size is not None:
            self.attn_size = plan.accumulate(self.attn_size.to(self.count_dtype))
        if self.slot is not None:
            self._follow(plan, x)
        x, self.size = plan.apply(x, self.size)
        if self.pos is not None:
            self.pos = plan.take_max(self.pos)
        if self.valid is not None:
            self.valid = self.valid.gather(1, plan.keep)  # merges never mix real and padding
        self._mask = None
        self.num_tokens = x.shape[1]
        if plan.fresh:
            if self.attn_size is None:
                self.attn_size = self.size.clone()
            self.attn_size[:, list(plan.fresh)] = 1.0
        return x
