"""Per-call state: what one forward of a patched model carries, kept off the model.

A patched model's *settings* (its :class:`~vlprune.adapters.base.PatchContext`: config,
schedules, the tower's head) are shared by every caller. What a forward in flight needs (the
token state, the q/k/v hand-off from an attention module to its block, the size bias, the
random score's key, FastV's kept columns between prefill and decode) belongs to that call
alone, so it lives here, in :mod:`contextvars`, keyed by the settings object:

* every thread has its own context, so two threads running one patched model at once never
  see each other's tokens (a web server's thread pool, ``nn.DataParallel`` replicas that share
  their modules' ``__dict__``);
* an :mod:`asyncio` task sees a copy of its creator's context; the mappings below are never
  mutated in place, only replaced, so a task's changes stay its own.

Two kinds of values:

* :class:`CallState`: the state of the latest forward of one context in this thread/task,
  replaced by :meth:`PatchContext.begin` at the start of every forward and kept after it, so
  ``get_source`` and ``viz`` read the forward the caller just ran;
* scoped values (:func:`scoped`): set for the duration of a ``with`` block in this
  thread/task only: ``disabled(model)``, ``describe``'s layer records, the guide embeddings
  a two-tower forward hands its guided tower, and a tower output computed ahead.

A forward that reduces with gradients on also keeps a :class:`Tape` (what each block found
and decided), so that a block recomputed by gradient checkpointing replays its first run
(:mod:`vlprune.adapters.recompute`); the recompute runs in a call state of its own
(:func:`installed`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor

from ..core.attention import AttnSpec
from ..core.scores import AttnInputs
from ..core.state import TokenState

_KEYS = itertools.count(1)
_EMPTY: Mapping = MappingProxyType({})  # never mutated: every change sets a new mapping

# context key -> the CallState of its latest forward in this thread / task
_CALLS: ContextVar[Mapping[int, CallState]] = ContextVar("vlprune_calls", default=_EMPTY)
# (context key, name) -> value, set by `scoped` for a with-block
_SCOPED: ContextVar[Mapping[tuple[int, str], Any]] = ContextVar("vlprune_scoped", default=_EMPTY)


def new_key() -> int:
    """A key no other settings object has (ids may be reused once an object is freed)."""
    return next(_KEYS)


@dataclass(eq=False)
class BlockRecord:
    """One patched block's first run in a forward with gradients: the token state it found
    (tensors detached from the graph) and the plans its reduction steps made, in order
    (``None`` where a step removed nothing)."""

    state: TokenState
    plans: list = field(default_factory=list)


@dataclass(eq=False)
class Tape:
    """The blocks' records of one forward, by layer (see :mod:`vlprune.adapters.recompute`)."""

    records: dict[int, BlockRecord] = field(default_factory=dict)


@dataclass
class CallState:
    """The state of one forward (or one ``generate``) of one patched tower."""

    state: TokenState | None = None
    # A patched attention module hands its q, k, v to its block, only when asked for.
    capture: bool = False
    attn: AttnInputs | None = None
    # What shapes the next attention (key bias, text masks) when the patched attention
    # module computes it itself (nn.MultiheadAttention, or any module on the flex backend).
    pending_spec: AttnSpec | None = None
    # the ``random`` score's key for this forward (vlprune.core.scores.hash_uniform)
    random_key: int | Tensor = 0
    # Adapter-specific parts (e.g. FastV's kept columns, which live from prefill to decode).
    parts: dict[str, Any] = field(default_factory=dict)
    # A forward with gradients that reduces records each block's first run (gradient
    # checkpointing replays it): the forward's tape, and the record of the block running now.
    tape: Tape | None = None
    recording: BlockRecord | None = None
    # A recomputed block's call state: the plans of its first run, taken in order instead of
    # scoring and matching again.
    replay: Iterator | None = None

    def decided(self, plan):
        """Note ``plan`` (a reduction step's decision, or ``None``) in the running block's
        record, if it keeps one; returns ``plan``."""
        if self.recording is not None:
            self.recording.plans.append(plan)
        return plan

    def take_attn(self) -> AttnInputs:
        attn, self.attn = self.attn, None
        if attn is None:
            raise RuntimeError("the patched attention module did not hand over its inputs")
        return attn


def current(key: int) -> CallState:
    """The call state of ``key`` in this thread / task, created (empty) on first use."""
    calls = _CALLS.get()
    call = calls.get(key)
    if call is None:
        call = start(key)
    return call


def start(key: int, call: CallState | None = None) -> CallState:
    """Make ``call`` (a fresh one by default) the call state of ``key`` here; returns it."""
    call = CallState() if call is None else call
    _CALLS.set({**_CALLS.get(), key: call})
    return call


@contextlib.contextmanager
def installed(key: int, call: CallState) -> Iterator[CallState]:
    """Make ``call`` the call state of ``key`` here for a ``with`` block, then put back
    whatever was there (a recomputed block runs in its own call state)."""
    token = _CALLS.set({**_CALLS.get(), key: call})
    try:
        yield call
    finally:
        _CALLS.reset(token)


def lookup(key: int, name: str, default: Any = None) -> Any:
    """The value :func:`scoped` set for ``(key, name)`` here, or ``default``."""
    return _SCOPED.get().get((key, name), default)


@contextlib.contextmanager
def scoped(keys: Iterable[int], name: str, value: Any) -> Iterator[None]:
    """Set ``name`` to ``value`` for every key in ``keys``, in this thread / task only, for
    the duration of the ``with`` block (nested blocks restore the outer value)."""
    token = _SCOPED.set({**_SCOPED.get(), **{(k, name): value for k in keys}})
    try:
        yield
    finally:
        _SCOPED.reset(token)
