"""Peak memory of the tensors a callable allocates, on CUDA or on CPU.

On CUDA the caching allocator keeps peak statistics, so the answer is its peak minus what was
allocated before the call (this includes kernel workspaces and allocator rounding).

The CPU allocator keeps no statistics, so on CPU (and for ``device=None``) the tensors are
tracked instead: a dispatch mode sees every aten op that runs inside the call, and each output
whose storage is not shared with one of the op's inputs is a new allocation. Its bytes count
until the storage is freed, which a ``weakref.finalize`` on the storage reports (torch keeps one
Python object per storage alive for exactly as long as the storage, so the finalizer fires when
the last tensor or view using it goes away). Views and in-place results share an input's
storage and are not counted again.

What the tracker cannot see: scratch buffers that a kernel allocates and frees internally,
tensors made without an aten op (``torch.from_numpy``), and memory that is not a tensor
(the Python heap, the allocator's own overhead). It measures tensor bytes, which is what
token reduction changes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["peak_memory"]

# These ops hand back a tensor that was built outside the dispatcher (a literal made by
# torch.tensor), so its storage is an input and yet was allocated inside the call.
_FRESH_OPS = ("lift_fresh", "lift_fresh_copy")


def _storages(tree: Any) -> list[torch.UntypedStorage]:
    out = []
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor):
            try:
                out.append(leaf.untyped_storage())
            except (RuntimeError, NotImplementedError):
                # Sparse, nested and some wrapper tensors have no single storage.
                continue
    return out


class _StorageTracker(TorchDispatchMode):
    def __init__(self, device_type: str | None) -> None:
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._finalizers: dict[int, weakref.finalize] = {}

    def _add(self, storage: torch.UntypedStorage) -> None:
        # Empty storages are tracked too: an out= argument can be resized later.
        nbytes = storage.nbytes()
        key = id(storage)
        self._sizes[key] = nbytes
        self._finalizers[key] = weakref.finalize(storage, self._free, key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._finalizers.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(s) for s in _storages((args, kwargs))}
        fresh = func.overloadpacket.__name__ in _FRESH_OPS
        for storage in _storages(out):
            dev = storage.device.type
            # Meta tensors carry sizes but own no memory.
            if dev == "meta" or (self.device_type is not None and dev != self.device_type):
                continue
            key = id(storage)
            if key in self._sizes:
                # A resize (e.g. of an out= argument) grows a storage we already count.
                delta = storage.nbytes() - self._sizes[key]
                if delta:
                    self._sizes[key] += delta
                    self.live += delta
                    self.peak = max(self.peak, self.live)
            elif fresh or key not in inputs:
                self._add(storage)
        return out

    def close(self) -> None:
        # Storages that outlive the call must not call back into a finished tracker.
        for fin in list(self._finalizers.values()):
            fin.detach()
        self._finalizers.clear()
        self._sizes.clear()


def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, int(torch.cuda.max_memory_allocated(device)) - int(start))


def peak_memory(fn: Callable[[], Any], device: str | torch.device | None = None) -> int:
    """Peak bytes of tensor memory allocated while ``fn()`` runs, above what existed before.

    ``device``: a CUDA device uses the caching allocator's statistics; a non-CUDA device
    counts tensor storages created on that device type; ``None`` counts storages created on
    any device. What ``fn`` returns is still alive at the end of the call and is included.
    """
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda":
            return _cuda_peak(fn, device)
    tracker = _StorageTracker(device.type if device is not None else None)
    try:
        with tracker:
            fn()
        return tracker.peak
    finally:
        tracker.close()
