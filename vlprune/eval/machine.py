"""The machine a measurement runs on: the versions and facts stored beside every result
(:func:`environment`), the busy-CPU check before timings (:func:`machine_load`,
:func:`load_warning`), and the device synchronisation around a timed call (:func:`sync`)."""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

import torch

__all__ = ["environment", "load_warning", "machine_load", "sync"]


def environment() -> dict[str, Any]:
    """Versions and machine facts stored beside every result."""
    from ..version import __version__

    env: dict[str, Any] = {
        "vlprune": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
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
