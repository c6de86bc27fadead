"""User-facing configuration: what to reduce, validated at construction with clear errors.

A :class:`ReductionConfig` says *what* a patched model does; adapters say *where*. Schedules
are resolved per layer with :func:`parse_schedule`, which follows ToMe's semantics for
``merge_r``: an ``int`` (the same r at every layer), an ``(r, inflection)`` pair (a linear
ramp whose mean is r; positive inflection merges more in late layers) or an explicit per-layer
list (shorter lists are padded with zeros).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Union

MergeSchedule = Union[int, tuple, list]  # noqa: UP007 (runtime alias on 3.10)

_SCHEDULE_HELP = (
    "an int >= 0 (same r at every layer), an (r, inflection) tuple with r >= 0 and "
    "inflection in [-1, 1], or a list of ints >= 0 with one entry per layer"
)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def validate_merge_r(merge_r: Any) -> MergeSchedule:
    """Check the form of a ``merge_r`` value (not its length: that needs the model)."""
    if _is_int(merge_r):
        if merge_r < 0:
            raise ValueError(f"merge_r must be >= 0, got {merge_r}; allowed: {_SCHEDULE_HELP}")
        return int(merge_r)
    if isinstance(merge_r, tuple):
        if len(merge_r) != 2 or not _is_int(merge_r[0]) or not isinstance(
            merge_r[1], numbers.Real
        ) or isinstance(merge_r[1], bool):
            raise ValueError(f"merge_r tuple must be (r, inflection), got {merge_r!r}; allowed: {_SCHEDULE_HELP}")
        r, inflect = int(merge_r[0]), float(merge_r[1])
        if r < 0 or not -1.0 <= inflect <= 1.0:
            raise ValueError(f"merge_r={merge_r!r} is out of range; allowed: {_SCHEDULE_HELP}")
        return (r, inflect)
    if isinstance(merge_r, list):
        if not all(_is_int(v) and v >= 0 for v in merge_r):
            raise ValueError(f"merge_r list must hold ints >= 0, got {merge_r!r}; allowed: {_SCHEDULE_HELP}")
        return [int(v) for v in merge_r]
    raise ValueError(f"merge_r has type {type(merge_r).__name__}; allowed: {_SCHEDULE_HELP}")


def parse_schedule(merge_r: MergeSchedule, num_layers: int) -> list[int]:
    """Resolve a ``merge_r`` value to one requested r per layer (before any capping).

    ``(r, inflection)`` gives a linear ramp from ``r * (1 - inflection)`` at the first layer to
    ``r * (1 + inflection)`` at the last (the mean stays r): positive inflection merges more in
    late layers, negative more in early ones. This is ToMe's rule.
    """
    merge_r = validate_merge_r(merge_r)
    if num_layers <= 0:
        raise ValueError(f"num_layers must be > 0, got {num_layers}")
    if isinstance(merge_r, list):
        if len(merge_r) > num_layers:
            raise ValueError(
                f"merge_r has {len(merge_r)} entries but the model has {num_layers} layers; "
                f"give at most {num_layers} (missing trailing layers count as 0)"
            )
        return merge_r + [0] * (num_layers - len(merge_r))
    inflect = 0.0
    if isinstance(merge_r, tuple):
        merge_r, inflect = merge_r
    lo = int(merge_r * (1.0 - inflect))
    hi = 2 * merge_r - lo
    if num_layers == 1:
        return [merge_r]
    step = (hi - lo) / (num_layers - 1)
    return [int(lo + step * i) for i in range(num_layers)]


@dataclass
class ReductionConfig:
    """What a patched model does. Validated on construction and on every change.

    Args:
        merge_r: ToMe bipartite merging: tokens removed per layer. ``int``, ``(r, inflection)``
            or a per-layer list (see :func:`parse_schedule`). 0 switches merging off.
        prop_attn: proportional attention: add ``log(size)`` of each key token to the attention
            logits so a merged token counts as many as it absorbed (ToMe, Eq. 1).
        trace_source: keep a ``(B, N, N0)`` map of which input tokens each token holds, read with
            :func:`vlprune.get_source` (for visualisation; costs memory).
        family: force an adapter by name instead of detecting it from the model's class.
    """

    merge_r: MergeSchedule = 0
    prop_attn: bool = True
    trace_source: bool = False
    family: str | None = None
    version: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.merge_r = validate_merge_r(self.merge_r)
        for name in ("prop_attn", "trace_source"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.family is not None and not isinstance(self.family, str):
            raise ValueError(f"family must be a string or None, got {self.family!r}")
        if not self.version:
            from vlprune import __version__

            self.version = __version__

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "version")

    def replace(self, **changes: Any) -> ReductionConfig:
        """A validated copy with ``changes`` applied; unknown names raise ``TypeError``."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise TypeError(
                f"unknown setting(s) {unknown}; known settings: {list(self.field_names())}"
            )
        return dataclasses.replace(self, **changes)

    @property
    def is_identity(self) -> bool:
        """True when this config removes no token at any layer."""
        r = self.merge_r
        if isinstance(r, list):
            return not any(r)
        if isinstance(r, tuple):
            return r[0] == 0
        return r == 0
