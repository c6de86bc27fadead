"""Throughput / latency / FLOPs / memory benchmark of reduction settings on one model.

All settings run on the same model instance, interleaved round by round (unpatched, r=0,
r=8, ... then again), and the median time per batch is reported, so that machine noise hits
every setting alike. Each setting's speedup is measured against the unpatched model in the
same run, and its *efficiency* is speedup / FLOPs ratio: 1.0 means the wall-clock gain is
exactly the compute saved.

Owns :func:`run_bench`, the interleaved timing loop it shares with other benchmarks
(:func:`time_interleaved`, :func:`spread_pct`), its result (:class:`BenchResult`, :class:`BenchRow`: table, JSON,
CSV), :func:`plot_speedup` (also drawn by :mod:`vlprune.eval.vlm_bench`) and
:func:`run_fields`, the run facts every benchmark result records.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..api import describe
from .flops import count_flops
from .machine import OtherLoad, environment, load_warning, sync
from .memory import peak_memory
from .sweep import BASELINE, Setting, apply_setting, config_dict, progress_bar, with_baseline


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
    #: interquartile range of the timed calls over their median, in % (run-to-run noise)
    spread_pct: float = 0.0


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
    #: share of the machine's CPU time other processes used during the timed rounds
    other_cpu: float | None = None

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
            f"{'spread':>6} {'img/s':>8} {'speedup':>7} {'effic.':>6} {'peak MB':>8}"
        )
        lines = [self.title(), head, "-" * len(head)]
        for r in self.rows:
            mem = f"{r.peak_mem_mb:8.1f}" if r.peak_mem_mb is not None else f"{'-':>8}"
            tok = f"{r.tokens_final:>6}" if r.tokens_final is not None else f"{'-':>6}"
            lines.append(
                f"{r.setting:<{w}} {tok} {r.gflops_per_img:7.3f} {r.flops_ratio:7.2f} "
                f"{r.batch_ms:9.1f} {r.spread_pct:5.1f}% {r.img_per_s:8.1f} {r.speedup:7.2f} "
                f"{r.efficiency:6.2f} {mem}"
            )
        lines.append(
            f"{len(self.rows[0].times_ms) if self.rows else 0} timed calls per setting, "
            "interleaved; ms/batch: median, spread: interquartile range / median"
            + (f"; other processes: {self.other_cpu:.0%} CPU" if self.other_cpu is not None else "")
        )
        return "\n".join(lines)

    def title(self) -> str:
        """The run's first line: model, batch, input, device, dtype, threads, allocator."""
        return (
            f"{self.model}  batch {self.batch_size}  input {self.input_size}  {self.device} "
            f"{self.dtype}  threads {self.threads}  allocator {self.env.get('allocator', '?')}"
        )

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


Step = tuple[str, Callable[[], object], Callable[[], object]]  # label, switch to it, one call


def time_interleaved(
    steps: Sequence[Step],
    *,
    rounds: int,
    iters: int,
    warmup: int,
    device: torch.device | str = "cpu",
    bar=None,
    on_round: Callable[[int, dict[str, list[float]]], None] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds per call of each step, interleaved round by round so that machine noise
    hits every step alike. Each round runs every step in turn: its switch function, one
    untimed call (the first call after a switch), then ``iters`` timed calls. The first
    ``warmup`` rounds are not recorded; ``on_round(done, times)`` runs after each recorded
    round (``done`` counts them), ``bar`` (a progress bar) is updated once per step and round.
    """
    device = torch.device(device)
    times: dict[str, list[float]] = {label: [] for label, _, _ in steps}
    for rnd in range(warmup + rounds):
        for label, switch, call in steps:
            switch()
            call()  # untimed: first call after a switch
            for _ in range(iters):
                sync(device)
                t0 = time.perf_counter()
                call()
                sync(device)
                if rnd >= warmup:
                    times[label].append((time.perf_counter() - t0) * 1e3)
            if bar is not None:
                bar.update(1)
        if rnd >= warmup and on_round is not None:
            on_round(rnd - warmup + 1, times)
    return times


def spread_pct(times: Sequence[float]) -> float:
    """Interquartile range of ``times`` over their median, in %: 0 for fewer than 2 times."""
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return 100.0 * (q3 - q1) / statistics.median(times)


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
    live: Callable[[str], None] | None = None,
) -> BenchResult:
    """Benchmark ``settings`` on ``model`` (already on its device and dtype, any patch removed).

    An unpatched baseline row is always included first. Timed: ``rounds`` rounds, each running
    every setting ``iters`` times back to back after one untimed call; ``warmup`` untimed
    rounds first (:func:`time_interleaved`). FLOPs are counted at batch 1 (per image); peak
    memory at the full batch. ``live`` (e.g. ``print``) gets the table as it fills: each
    setting's tokens and FLOPs once counted, then the running median speedups after every
    round.
    """
    if batch_size < 1 or rounds < 1 or iters < 1 or warmup < 0:
        raise ValueError("batch_size, rounds and iters must be >= 1 and warmup >= 0")
    settings = with_baseline(settings)
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
    fields = run_fields(model, model_name, batch_size, tuple(x.shape[1:]), device, dtype, warning)
    w = max([14] + [len(s.label) for s in settings])
    if live is not None:
        live(BenchResult(**fields, rows=[]).title())
        live(f"{'setting':<{w}} {'tokens':>6} {'GFLOPs':>7} {'FLOPs x':>7}")
    flops, tokens, mem = {}, {}, {}
    with torch.inference_mode():
        for s in settings:
            apply_setting(model, s)
            if s.config is None:
                flops[s.label] = count_flops(lambda: model(x1))
                tokens[s.label] = None
            else:
                d = describe(model, x1)
                flops[s.label] = d.flops
                tokens[s.label] = d.layers[-1].tokens_out if d.layers else None
            if live is not None:
                tok = "-" if tokens[s.label] is None else tokens[s.label]
                live(f"{s.label:<{w}} {tok:>6} {flops[s.label] / 1e9:7.3f} "
                     f"{flops[BASELINE] / flops[s.label]:7.2f}")
            if measure_memory:
                mem[s.label] = peak_memory(lambda: model(x), device=device) / 2**20

    bar = progress_bar((warmup + rounds) * len(settings), progress,
                       f"bench {model_name or type(model).__name__}", "run")

    def report(done: int, times: dict[str, list[float]]) -> None:
        base = statistics.median(times[BASELINE])
        cells = ", ".join(f"{s.label} {base / statistics.median(times[s.label]):.2f}x"
                          for s in settings[1:])
        line = f"round {done}/{rounds}: median speedup so far {cells}"
        write_mode = getattr(bar, "external_write_mode", None)  # tqdm: clear the bar first
        if write_mode is None:
            live(line)
        else:
            with write_mode():
                live(line)

    steps = [(s.label, lambda s=s: apply_setting(model, s), lambda: model(x)) for s in settings]
    with torch.inference_mode(), OtherLoad() as load:
        times = time_interleaved(steps, rounds=rounds, iters=iters, warmup=warmup, device=device,
                                 bar=bar, on_round=report if live is not None else None)
    bar.close()
    apply_setting(model, Setting(BASELINE, None))
    if load.warning:
        warnings.warn(load.warning, stacklevel=2)
        fields["load_warning"] = "; ".join(w for w in (warning, load.warning) if w)

    base_ms = statistics.median(times[BASELINE])
    rows = []
    for s in settings:
        ms = statistics.median(times[s.label])
        ratio = flops[BASELINE] / flops[s.label]
        speedup = base_ms / ms
        rows.append(
            BenchRow(
                setting=s.label,
                config=config_dict(s),
                tokens_final=tokens[s.label],
                gflops_per_img=flops[s.label] / 1e9,
                flops_ratio=ratio,
                batch_ms=ms,
                img_per_s=batch_size / ms * 1e3,
                speedup=speedup,
                efficiency=speedup / ratio,
                peak_mem_mb=mem.get(s.label),
                times_ms=times[s.label],
                spread_pct=spread_pct(times[s.label]),
            )
        )
    return BenchResult(**fields, rows=rows, other_cpu=load.share)


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
