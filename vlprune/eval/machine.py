"""The machine a measurement runs on: the versions and facts stored beside every result
(:func:`environment`, with the memory allocator in use: :func:`allocator`), the busy-CPU check
before timings (:func:`machine_load`, :func:`load_warning`) and during them
(:class:`OtherLoad`: CPU time other processes took), and the device synchronisation around a
timed call (:func:`sync`)."""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

import torch

__all__ = ["OtherLoad", "allocator", "environment", "load_warning", "machine_load", "sync"]

#: glibc malloc settings that keep freed memory instead of returning it to the system
#: (no page faults on every forward: steadier CPU timings); see the README's speed section
TUNED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}


def allocator() -> str:
    """The CPU memory allocator of this process as the environment sets it: a preloaded
    jemalloc / tcmalloc / mimalloc, else glibc with its ``MALLOC_*`` settings ("tuned" when
    they are :data:`TUNED_MALLOC`, "default" when none is set)."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return f"{name} (LD_PRELOAD={preload})"
    tuned = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if not tuned:
        return "glibc (default)"
    if tuned == TUNED_MALLOC:
        return "glibc (tuned: " + " ".join(f"{k}={v}" for k, v in sorted(tuned.items())) + ")"
    return "glibc (" + " ".join(f"{k}={v}" for k, v in sorted(tuned.items())) + ")"


def environment() -> dict[str, Any]:
    """Versions and machine facts stored beside every result."""
    from ..version import __version__

    env: dict[str, Any] = {
        "vlprune": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "allocator": allocator(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for lib in ("timm", "open_clip", "transformers"):
        mod = sys.modules.get(lib)
        if mod is not None:
            env[lib] = getattr(mod, "__version__", "?")
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def machine_load(sample_s: float = 0.5) -> tuple[float, float]:
    """(1-minute load average, fraction of CPU time busy over a short sample), Linux only."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = float("nan")

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = read()
        time.sleep(sample_s)
        t1, i1 = read()
        busy = 1.0 - (i1 - i0) / max(t1 - t0, 1)
    except OSError:
        busy = float("nan")
    return load1, busy


def load_warning(threshold: float = 0.25) -> str | None:
    """A warning text when other processes keep the CPU busy (timings would be unreliable)."""
    load1, busy = machine_load()
    if busy > threshold:
        return (
            f"the machine is busy before the benchmark starts ({busy:.0%} CPU in use, load "
            f"average {load1:.2f} on {os.cpu_count()} cores): timings may be off; ratios between "
            "settings are interleaved and more robust than absolute numbers"
        )
    return None


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a timer around a call measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OtherLoad:
    """Context manager measuring how much CPU *other* processes used while it was open: the
    machine's busy time (``/proc/stat``) minus this process's own CPU time, as a share of all
    cores' time (:attr:`share`, ``None`` where ``/proc/stat`` is not readable). A share above
    ``threshold`` means other work ran beside the timed calls (:attr:`warning`)."""

    def __init__(self, threshold: float = 0.25) -> None:
        self.threshold = threshold
        self.share: float | None = None

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    def __enter__(self) -> OtherLoad:
        self._stat, self._own = self._read(), _own_cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        end = self._read()
        if self._stat is None or end is None:
            return
        total = end[0] - self._stat[0]
        if total <= 0:
            return
        busy = total - (end[1] - self._stat[1])
        own = (_own_cpu_s() - self._own) * os.sysconf("SC_CLK_TCK")
        self.share = max(busy - own, 0) / total

    @property
    def warning(self) -> str | None:
        if self.share is None or self.share <= self.threshold:
            return None
        return (
            f"other processes used {self.share:.0%} of the machine's CPU time during the timed "
            "rounds: absolute timings are off; the interleaved ratios between settings are "
            "more robust, but rerun on an idle machine before quoting them"
        )


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system
