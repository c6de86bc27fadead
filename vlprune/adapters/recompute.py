"""Gradient checkpointing while reducing: a recomputed block replays its first run.

Gradient checkpointing (timm's and open_clip's ``set_grad_checkpointing``, transformers'
``gradient_checkpointing_enable`` / ``activation_checkpointing_enable``, or any
:func:`torch.utils.checkpoint.checkpoint` around the blocks) runs a block once keeping no
activations and runs it again during the backward pass. A patched block reads the forward's
token state (sizes, positions, padding) when it starts and compacts it when it reduces, so at
the recompute that state is whatever the whole forward left (or the next forward's), and
scoring again could decide otherwise (the ``random`` score's training key is the forward's;
near ties). So a forward that reduces with gradients on keeps a
:class:`~vlprune.adapters.call.Tape` (in its call state, from
:meth:`~vlprune.adapters.base.PatchContext.begin`):

* the first run of each patched block records the token state it found (a shallow copy,
  tensors detached from the graph) and the plans its reduction steps made, and tags the
  storage of its input tokens with the tape. The recompute gets the same storage: the same
  tensor with ``use_reentrant=False``, a detached alias of it with ``use_reentrant=True``;
* a block whose input storage carries a tape with a record for its layer is a recompute: it
  runs in a call state of its own (a copy of the recorded token state) where each reduction
  step takes the recorded plan instead of scoring and matching, and tags its output, so that
  the next block of a checkpointed segment of several blocks replays too. The forward's own
  call state is left alone, wherever and whenever the backward runs (another thread, after
  the next forward: gradient accumulation), so ``get_source`` still reads the forward's.

Scores and matching run without gradients in every pass, so a recompute saves exactly the
tensors the first run saved (torch's non-reentrant checkpoint checks their number and
shapes). The one exception is EViT's fusion weight (class attention), which the fused token
is differentiated through: it is computed with gradients in both passes, and a replayed plan
takes the recompute's own weight.

With ``use_reentrant=True`` the first run has no gradients; tokens that leave the network
through the token state instead of the block's output (a BERT-style encoder's full-length
output keeps the value of each pruned token) would then get none, so that case is refused.
The settings (``configure``) must not change between a forward and its backward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from ..core.state import TokenState
from .base import PatchContext
from .call import BlockRecord, CallState, Tape, installed

_TAG = "_vlprune_tapes"  # attribute of a token storage: {context key: Tape}

T = TypeVar("T")


def _storage(x):
    """The storage object of the tokens ``x`` (the first tensor of a tuple), or ``None`` for
    tensors without one (functorch wrappers, some subclasses)."""
    if isinstance(x, (tuple, list)):
        x = x[0] if x else None
    if not isinstance(x, Tensor):
        return None
    try:
        return x.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _tape_of(x, key: int) -> Tape | None:
    storage = _storage(x)
    tapes = getattr(storage, _TAG, None) if storage is not None else None
    return None if tapes is None else tapes.get(key)


def _tag(x, key: int, tape: Tape) -> None:
    storage = _storage(x)
    if storage is None:
        return
    tapes = getattr(storage, _TAG, None)
    if tapes is None:
        tapes = {}
        try:
            setattr(storage, _TAG, tapes)
        except (AttributeError, TypeError):
            return
    tapes[key] = tape


def _detached(state: TokenState) -> TokenState:
    """A shallow copy of ``state`` whose tensors carry no autograd graph (the record must not
    hold the graph: the storages tagged with it are saved by that graph). A tensor that
    required gradients still does, as a fresh leaf, so a recompute records the same graph
    ops (and saves the same tensors) as the first run."""
    snap = copy.copy(state)
    for name, value in vars(snap).items():
        if isinstance(value, Tensor) and value.grad_fn is not None:
            setattr(snap, name, value.detach().requires_grad_(value.requires_grad))
    return snap


def run_block(ctx: PatchContext, layer: int, x, body: Callable[[], T]) -> T:
    """Run a patched block's forward ``body`` on tokens ``x`` (its input) so that a recompute
    by gradient checkpointing replays this run (see the module docstring)."""
    if torch.compiler.is_compiling():
        return body()
    if torch.is_grad_enabled():
        tape = _tape_of(x, ctx.key)
        if tape is not None and layer in tape.records:
            return _replay(ctx, layer, tape, body)
    call = ctx.call
    tape = call.tape
    if tape is None:  # no gradients at the root forward, or nothing reduces: nothing to replay
        return body()
    if layer in tape.records:
        raise RuntimeError(
            f"layer {layer} of this patched model ran twice in one forward, or a recomputed "
            "block did not find the record of its first run (its input is not the tensor the "
            "first run got); checkpoint whole patched blocks with torch.utils.checkpoint"
        )
    state = call.state
    if not torch.is_grad_enabled() and state is not None and state.slot is not None:
        raise RuntimeError(
            "the full-length output of a reducing BERT-style encoder keeps pruned tokens in the "
            "token state, which gets no gradients when a block first runs without them "
            "(reentrant gradient checkpointing); use non-reentrant checkpointing "
            "(gradient_checkpointing_kwargs={'use_reentrant': False}, the default) or "
            "text_output='compact'"
        )
    record = BlockRecord(state=_detached(state))
    tape.records[layer] = record
    _tag(x, ctx.key, tape)
    call.recording = record
    try:
        return body()
    finally:
        call.recording = None


def _replay(ctx: PatchContext, layer: int, tape: Tape, body: Callable[[], T]) -> T:
    record = tape.records[layer]
    call = CallState(state=copy.copy(record.state), replay=iter(record.plans))
    with installed(ctx.key, call):
        out = body()
    _tag(out, ctx.key, tape)  # the next block of a checkpointed segment replays too
    return out


def next_plan(call: CallState):
    """A recomputed block's next reduction step: the plan its first run made there."""
    try:
        return next(call.replay)
    except StopIteration:
        raise RuntimeError(
            "a recomputed block took more reduction steps than its first run; the settings "
            "changed between the forward and its backward"
        ) from None
