"""Evaluation split across processes: shard a list of samples, gather per-sample results.

An evaluation launched with ``accelerate launch`` (or ``torchrun``) runs once per process. Each
process takes its own shard of the sample indices (:meth:`DistContext.shard`), computes
per-sample results, and :meth:`DistContext.gather_samples` brings them back to every process
in the original sample order. Metrics computed from the gathered tensors are then the same
numbers a single process computes, whatever the number of processes and however unequal the
shards (a shard may even be empty).

Shards differ in length, and gloo refuses to gather tensors of different lengths, so every
tensor is padded to the longest shard (``Accelerator.pad_across_processes``) with its row index
set to -1, gathered, and the padding dropped.

A single process (no launcher) needs no ``accelerate``: :func:`init_distributed` returns a
context whose gathers are identity operations.

Typical use, e.g. in a VQA evaluation::

    ctx = init_distributed(device="cuda")
    mine = ctx.shard(len(dataset))                      # this process's sample indices
    scores = torch.tensor([score(dataset[i]) for i in mine])
    out = ctx.gather_samples(torch.tensor(mine), {"score": scores})
    accuracy = out["score"].float().mean()              # over all samples, in every process
    if ctx.is_main:
        write_results(...)
    ctx.barrier()
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["DistContext", "init_distributed", "launched_world_size"]


def launched_world_size() -> int:
    """Number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) evaluation.

    ``accelerator`` is the ``accelerate.Accelerator`` of a multi-process run, ``None`` in a
    single process.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        """True in the one process that prints and writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: int | Sequence[int]) -> list[int]:
        """This process's share of ``items`` (a count ``n`` means ``range(n)``).

        Strided (``items[rank::world_size]``): shard lengths differ by at most one, and with
        data sorted by class every shard sees every class.
        """
        seq = range(items) if isinstance(items, int) else items
        return list(seq[self.rank::self.world_size])

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.distributed:
            self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """Wait for every process, then leave the process group (end of a run)."""
        if self.distributed:
            self.barrier()
            _leave_process_group()

    def gather_object(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` in every process (picklable objects)."""
        if not self.distributed:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    def sum(self, value: float) -> float:
        """Sum of ``value`` over the processes."""
        return sum(self.gather_object(value))

    def max(self, value: float) -> float:
        """Maximum of ``value`` over the processes."""
        return max(self.gather_object(value))

    def gather_samples(self, index: torch.Tensor | Sequence[int],
                       values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sample results of all processes, ordered by their global sample index.

        ``index`` holds the global index (>= 0) of each of this process's samples and every
        tensor of ``values`` has one row per sample (any further dimensions are kept).
        Returns the same keys plus ``"index"``, all on the CPU, with the rows of every process
        sorted by index. Samples a process leaves out (e.g. images that failed to load) are
        simply absent. Boolean tensors come back boolean.
        """
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
        for name, t in values.items():
            if t.shape[:1] != index.shape:
                raise ValueError(
                    f"values[{name!r}] has {t.shape[0] if t.dim() else 0} rows but there are "
                    f"{len(index)} indices; give one row per sample"
                )
        if bool((index < 0).any()):
            raise ValueError("sample indices must be >= 0 (-1 marks padding)")
        if self.distributed:
            index, values = self._gather_padded(index, values)
        order = torch.argsort(index, stable=True)
        out = {"index": index[order]}
        out.update({name: t.cpu()[order] for name, t in values.items()})
        return out

    def _gather_padded(self, index: torch.Tensor, values: Mapping[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        acc = self.accelerator
        # Collectives run on the accelerator's device (NCCL needs CUDA tensors, gloo CPU ones).
        dev = acc.device

        def gather(t: torch.Tensor, pad: int) -> torch.Tensor:
            t = acc.pad_across_processes(t.to(dev).contiguous(), dim=0, pad_index=pad)
            return acc.gather(t).cpu()

        all_index = gather(index, -1)
        keep = all_index >= 0
        out = {}
        for name, t in values.items():
            is_bool = t.dtype == torch.bool
            g = gather(t.to(torch.uint8) if is_bool else t, 0)[keep]
            out[name] = g.bool() if is_bool else g
        return all_index[keep], out


def _leave_process_group() -> None:
    """Destroy the process group before the interpreter exits: a gloo group left open can
    abort the process at exit ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(device: str | torch.device | None = None) -> DistContext:
    """The context of this process.

    Without a launcher (``WORLD_SIZE`` unset or 1): a single-process context on ``device``
    (default: CUDA when available, else the CPU); ``accelerate`` is not imported.

    Under ``accelerate launch`` or ``torchrun`` with several processes: an
    ``accelerate.Accelerator`` joins the process group (NCCL on CUDA; gloo on the CPU, which is
    also used when ``device`` is ``"cpu"`` or CUDA is missing), and ``device`` becomes this
    process's device (``cuda:<local rank>`` on GPUs).
    """
    dev = torch.device(device if device is not None else _default_device())
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {dev} asked for but CUDA is not available here; use cpu")
    if launched_world_size() <= 1:
        return DistContext(device=dev)
    try:
        from accelerate import Accelerator
    except ImportError as e:
        raise RuntimeError(
            "a multi-process evaluation (WORLD_SIZE > 1) needs accelerate: pip install accelerate"
        ) from e
    acc = Accelerator(cpu=dev.type != "cuda")
    atexit.register(_leave_process_group)
    return DistContext(rank=acc.process_index, world_size=acc.num_processes,
                       device=acc.device, accelerator=acc)
