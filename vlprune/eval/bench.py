"""Throughput / latency / FLOPs / memory benchmark of reduction settings on one model.

All settings run on the same model instance, interleaved round by round (unpatched, r=0,
r=8, ... then again), and the median time per batch is reported, so that machine noise hits
every setting alike. Each setting's speedup is measured against the unpatched model in the
same run, and its *efficiency* is speedup / FLOPs ratio: 1.0 means the wall-clock gain is
exactly the compute saved.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import describe, patch, unpatch
from ..config import MergeSchedule, ReductionConfig
from .flops import count_flops
from .memory import peak_memory

BASELINE = "unpatched"


def config_label(cfg: ReductionConfig) -> str:
    """A short readable name of a config, e.g. ``r=8``, ``cls_attn 0.7@3/6/9 +fuse``."""
    parts = []
    if cfg.visual_keep is not None:
        seed = f" seed={cfg.visual_seed}" if cfg.visual_score == "random" else ""
        ctx = "" if cfg.visual_contextual is None else f" ctx={cfg.visual_contextual}"
        parts.append(f"visual {cfg.visual_keep:g} {cfg.visual_score}{seed}{ctx}")
    if cfg.text_keep is not None:  # image-guided prompt dropping
        last = "" if cfg.text_protect_last is None else f" last={cfg.text_protect_last}"
        parts.append(f"text {cfg.text_keep:g}{last}")
    if cfg.llm_keep is not None:  # FastV inside the language model
        renumber = " +renumber" if cfg.llm_renumber_positions else ""
        parts.append(f"llm {cfg.llm_keep:g}@{cfg.llm_layer}{renumber}")
    if cfg.prune_keep is not None:
        keep = cfg.prune_keep
        keep_txt = "/".join(f"{k:g}" for k in keep) if isinstance(keep, list) else f"{keep:g}"
        where = "" if cfg.prune_layers is None else "@" + "/".join(map(str, cfg.prune_layers))
        extra = {"fuse": " +fuse", "recycle": " +recycle", "drop": ""}[cfg.prune_mode]
        seed = f" seed={cfg.prune_seed}" if cfg.prune_score == "random" else ""
        parts.append(f"{cfg.prune_score} {keep_txt}{where}{extra}{seed}")
    r = cfg.merge_r
    if isinstance(r, tuple):
        parts.append(f"r={r[0]}@{r[1]:g}")
    elif isinstance(r, list):
        parts.append("r=" + "/".join(map(str, r)))
    elif r or not parts:
        parts.append(f"r={r}")
    if not cfg.prop_attn:
        parts.append("no-prop")
    return " + ".join(parts)


@dataclass
class Setting:
    """One row of a benchmark: a label and the patch settings (``None``: unpatched)."""

    label: str
    config: ReductionConfig | None

    @classmethod
    def of(cls, label: str | None = None, **settings: Any) -> Setting:
        """A setting from :class:`ReductionConfig` keywords, labelled by :func:`config_label`."""
        cfg = ReductionConfig(**settings)
        return cls(label or config_label(cfg), cfg)

    @classmethod
    def merge(cls, r: MergeSchedule) -> Setting:
        return cls.of(merge_r=r)


@dataclass
class BenchRow:
    setting: str
    config: dict | None
    tokens_final: int | None
    gflops_per_img: float
    flops_ratio: float
    batch_ms: float
    img_per_s: float
    speedup: float
    efficiency: float
    peak_mem_mb: float | None
    times_ms: list[float] = field(default_factory=list)


@dataclass
class BenchResult:
    model: str
    batch_size: int
    input_size: tuple[int, ...]
    device: str
    dtype: str
    threads: int
    rows: list[BenchRow]
    env: dict
    load_warning: str | None = None

    #: the y axis of :meth:`plot` (what "speedup" measures)
    speedup_axis = "measured speedup"

    def row(self, label: str) -> BenchRow:
        for r in self.rows:
            if r.setting == label:
                return r
        raise KeyError(f"no setting {label!r}; have {[r.setting for r in self.rows]}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        w = max([14] + [len(r.setting) for r in self.rows])
        head = (
            f"{'setting':<{w}} {'tokens':>6} {'GFLOPs':>7} {'FLOPs x':>7} {'ms/batch':>9} "
            f"{'img/s':>8} {'speedup':>7} {'effic.':>6} {'peak MB':>8}"
        )
        lines = [
            f"{self.model}  batch {self.batch_size}  input {self.input_size}  {self.device} "
            f"{self.dtype}  threads {self.threads}",
            head,
            "-" * len(head),
        ]
        for r in self.rows:
            mem = f"{r.peak_mem_mb:8.1f}" if r.peak_mem_mb is not None else f"{'-':>8}"
            tok = f"{r.tokens_final:>6}" if r.tokens_final is not None else f"{'-':>6}"
            lines.append(
                f"{r.setting:<{w}} {tok} {r.gflops_per_img:7.3f} {r.flops_ratio:7.2f} "
                f"{r.batch_ms:9.1f} {r.img_per_s:8.1f} {r.speedup:7.2f} {r.efficiency:6.2f} {mem}"
            )
        return "\n".join(lines)

    def write_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def plot(self, path: str | os.PathLike) -> None:
        """Speedup against FLOPs reduction per setting, with the ideal line (efficiency 1)."""
        plot_speedup(
            path, {"": [(r.setting, r.flops_ratio, r.speedup, r.efficiency) for r in self.rows]},
            xlabel="FLOPs reduction (x)",
            ylabel=f"{self.speedup_axis} (x), batch {self.batch_size}",
            title=f"{self.model} on {self.device} {self.dtype}, {self.threads} threads",
        )

    def write_csv(self, path: str | os.PathLike) -> None:
        row_type = type(self.rows[0]) if self.rows else BenchRow
        names = [
            f.name for f in dataclasses.fields(row_type)
            if f.name != "config" and not f.name.startswith("times_")
        ]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "batch_size", "device", "dtype", "threads", *names])
            for r in self.rows:
                w.writerow(
                    [self.model, self.batch_size, self.device, self.dtype, self.threads]
                    + [getattr(r, n) for n in names]
                )


PlotPoint = tuple[str, float, float, float]  # setting, FLOPs ratio, speedup, efficiency


def plot_speedup(path: str | os.PathLike, series: dict[str, Sequence[PlotPoint]], *,
                 xlabel: str, ylabel: str, title: str) -> None:
    """A PNG of speedup against FLOPs ratio with the ideal line ``speedup = FLOPs ratio``.

    ``series`` maps a series name (e.g. ``"batch 8"``; ``""`` for a single unnamed series) to
    its points. Every point gets its own legend entry, ``[series: ]setting (eff. E)``; within a
    series each setting has its own marker, and a setting keeps its marker across series,
    which differ by colour.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install 'vlprune[eval]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for pts in series.values() for p in pts]
    if not points:
        raise ValueError("nothing to plot")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    top = max(max(p[1] for p in points), max(p[2] for p in points)) * 1.05
    ax.plot([1, top], [1, top], "--", color="grey", lw=1, label="speedup = FLOPs ratio")
    markers = "osD^v<>pP*Xh"
    settings = list(dict.fromkeys(p[0] for p in points))  # first-seen order
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, (name, pts) in enumerate(series.items()):
        for i, (setting, ratio, speedup, eff) in enumerate(pts):
            # one series: a colour per point (as before); several: a colour per series
            color = colors[(i if len(series) == 1 else j) % len(colors)]
            prefix = f"{name}: " if name else ""
            # a legend entry per point: clusters stay readable
            ax.scatter(ratio, speedup, marker=markers[settings.index(setting) % len(markers)],
                       color=color, zorder=3, label=f"{prefix}{setting} (eff. {eff:.2f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _apply(model: nn.Module, setting: Setting) -> None:
    if setting.config is None:
        if getattr(model, "_vlprune", None) is not None:
            unpatch(model)
    else:
        patch(model, setting.config)


def run_bench(
    model: nn.Module,
    settings: Sequence[Setting],
    *,
    model_name: str = "",
    batch_size: int = 32,
    input_size: tuple[int, ...] | None = None,
    rounds: int = 5,
    iters: int = 2,
    warmup: int = 1,
    measure_memory: bool = True,
    progress: bool = True,
    example_input: Callable[[nn.Module, int], torch.Tensor] | None = None,
) -> BenchResult:
    """Benchmark ``settings`` on ``model`` (already on its device and dtype, any patch removed).

    An unpatched baseline row is always included first. Timed: ``rounds`` rounds, each running
    every setting ``iters`` times back to back after one untimed call; ``warmup`` untimed
    rounds first. FLOPs are counted at batch 1 (per image); peak memory at the full batch.
    """
    if batch_size < 1 or rounds < 1 or iters < 1 or warmup < 0:
        raise ValueError("batch_size, rounds and iters must be >= 1 and warmup >= 0")
    settings = [Setting(BASELINE, None)] + [s for s in settings if s.config is not None]
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate settings: {labels}")
    from ..adapters.base import device_dtype, find_adapter

    model.eval()
    device, dtype = device_dtype(model)
    warning = load_warning()
    if warning:
        warnings.warn(warning, stacklevel=2)

    def make_input(bs: int) -> torch.Tensor:
        if example_input is not None:
            return example_input(model, bs)
        return find_adapter(model).example_input(model, bs, input_size)

    x = make_input(batch_size)
    x1 = x[:1]
    flops, tokens, mem = {}, {}, {}
    with torch.inference_mode():
        for s in settings:
            _apply(model, s)
            if s.config is None:
                flops[s.label] = count_flops(lambda: model(x1))
                tokens[s.label] = None
            else:
                d = describe(model, x1)
                flops[s.label] = d.flops
                tokens[s.label] = d.layers[-1].tokens_out if d.layers else None
            if measure_memory:
                mem[s.label] = peak_memory(lambda: model(x), device=device) / 2**20

    times: dict[str, list[float]] = {s.label: [] for s in settings}
    total = (warmup + rounds) * len(settings)
    bar = _progress(total, progress, f"bench {model_name or type(model).__name__}")
    with torch.inference_mode():
        for rnd in range(warmup + rounds):
            for s in settings:
                _apply(model, s)
                model(x)  # untimed: first call after a switch
                for _ in range(iters):
                    _sync(device)
                    t0 = time.perf_counter()
                    model(x)
                    _sync(device)
                    if rnd >= warmup:
                        times[s.label].append((time.perf_counter() - t0) * 1e3)
                bar.update(1)
    bar.close()
    _apply(model, Setting(BASELINE, None))

    base_ms = statistics.median(times[BASELINE])
    rows = []
    for s in settings:
        ms = statistics.median(times[s.label])
        ratio = flops[BASELINE] / flops[s.label]
        speedup = base_ms / ms
        rows.append(
            BenchRow(
                setting=s.label,
                config=None if s.config is None else {
                    k: v for k, v in dataclasses.asdict(s.config).items() if k != "version"
                },
                tokens_final=tokens[s.label],
                gflops_per_img=flops[s.label] / 1e9,
                flops_ratio=ratio,
                batch_ms=ms,
                img_per_s=batch_size / ms * 1e3,
                speedup=speedup,
                efficiency=speedup / ratio,
                peak_mem_mb=mem.get(s.label),
                times_ms=times[s.label],
            )
        )
    return BenchResult(
        **run_fields(model, model_name, batch_size, tuple(x.shape[1:]), device, dtype, warning),
        rows=rows,
    )


def run_fields(model, model_name, batch_size, input_size, device, dtype, warning) -> dict:
    """The fields every benchmark result records about its run (model, shapes, machine)."""
    return dict(
        model=model_name or type(model).__name__,
        batch_size=batch_size,
        input_size=input_size,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads(),
        env=environment(),
        load_warning=warning,
    )


def environment() -> dict[str, Any]:
    """Versions and machine facts stored beside every result."""
    from .. import __version__

    env: dict[str, Any] = {
        "vlprune": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for lib in ("timm", "open_clip", "transformers"):
        mod = __import__("sys").modules.get(lib)
        if mod is not None:
            env[lib] = getattr(mod, "__version__", "?")
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="run", leave=False)
