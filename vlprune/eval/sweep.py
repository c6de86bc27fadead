"""Settings and the sweep loop shared by every speed-accuracy evaluation (ImageNet, VQA,
captioning, the real-data accuracy sweeps) and by the benchmarks.

Owns: :class:`Setting` (one row: a label and a :class:`~vlprune.ReductionConfig`, ``None``
for the unpatched model, :data:`BASELINE`), its label (:func:`config_label`), curve
(:func:`method_of`) and dict (:func:`config_dict`), :func:`apply_setting` (patch or unpatch a
model for a setting), :func:`progress_bar`, :class:`Sweep` with its files
(:func:`output_paths`, :func:`atomic_write`, :func:`slug`) and its plot (:class:`PlotSpec`,
:func:`plot_sweep`).

A :class:`Sweep` runs one callable per reduction setting, the unpatched model first. The
callable does the task-specific work (patch, evaluate, time) and returns a dict of metrics;
the sweep adds the setting's label, its method and its full config, computes the columns
relative to the unpatched row (accuracy delta, speedup, FLOPs ratio), and rewrites the CSV,
JSON and plot (:func:`plot_sweep`) after every row. An interrupted or
failing sweep therefore keeps every row it finished; its JSON says ``"complete": false`` and
carries the error.

Usage, e.g. for a VQA evaluation (``ctx`` from :func:`vlprune.eval.distributed.init_distributed`;
``evaluate_vqa`` patches the model with ``setting.config``, or unpatches it for ``None``, runs
this process's shard and gathers, and returns ``{"accuracy": ..., "gflops": ...,
"samples_per_s": ...}``)::

    spec = PlotSpec(y="accuracy", ylabel="VQA accuracy (%)",
                    panels=(("gflops", "GFLOPs / sample"), ("samples_per_s", "samples / s")))
    sweep = Sweep(output_paths("results/eval_vqa_llava"), meta={"model": name, ...},
                  plot=spec, compare={"delta_accuracy": ("accuracy", "diff"),
                                      "speedup": ("samples_per_s", "ratio"),
                                      "flops_ratio": ("gflops", "inverse")},
                  columns=("setting", "method", "accuracy", "delta_accuracy"),
                  write=ctx.is_main, kind="eval_vqa")
    rows = sweep.run(settings, lambda s: evaluate_vqa(model, s), methods=methods)
    if ctx.is_main:
        print(sweep.table([("setting", "setting", ""), ("accuracy", "acc.", ".2f"),
                           ("speedup", "speedup", ".2f")]))
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..api import patch, unpatch
from ..config import ADAPTIVE_VISUAL_SCORES, MergeSchedule, ReductionConfig
from .machine import environment

__all__ = [
    "BASELINE",
    "OutputPaths",
    "PlotSpec",
    "Setting",
    "Sweep",
    "apply_setting",
    "atomic_write",
    "config_dict",
    "config_label",
    "method_of",
    "output_paths",
    "plot_sweep",
    "progress_bar",
    "slug",
    "with_baseline",
]

#: the label of the unpatched row, the reference of every relative column
BASELINE = "unpatched"

#: the keys of :func:`vlprune.eval.machine.environment` repeated as columns of every CSV row
VERSION_KEYS = ("vlprune", "torch", "timm", "open_clip", "transformers", "python")

Compare = Mapping[str, tuple[str, str]]


def config_label(cfg: ReductionConfig) -> str:
    """A short readable name of a config, e.g. ``r=8``, ``cls_attn 0.7@3/6/9 +fuse``."""
    parts = []
    if cfg.visual_keep is not None:
        seed = f" seed={cfg.visual_seed}" if cfg.visual_score == "random" else ""
        ctx = "" if cfg.visual_contextual is None else f" ctx={cfg.visual_contextual}"
        parts.append(f"visual {cfg.visual_keep:g} {cfg.visual_score}{seed}{ctx}")
    elif cfg.visual_score in ADAPTIVE_VISUAL_SCORES:  # the count is each image's own
        parts.append(f"visual {cfg.visual_score}")
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


def apply_setting(model: nn.Module, setting: Setting) -> None:
    """Patch ``model`` with the setting's config, or unpatch it for the unpatched row."""
    if setting.config is None:
        if getattr(model, "_vlprune", None) is not None:
            unpatch(model)
    else:
        patch(model, setting.config)


def with_baseline(settings: Sequence[Setting]) -> list[Setting]:
    """The unpatched :data:`BASELINE` setting, then those of ``settings`` that reduce; a label
    given twice raises a ValueError."""
    settings = [Setting(BASELINE, None)] + [s for s in settings if s.config is not None]
    labels = [s.label for s in settings]
    dupes = sorted({lb for lb in labels if labels.count(lb) > 1})
    if dupes:
        raise ValueError(f"duplicate settings: {dupes}; each setting may appear once")
    return settings


def config_dict(setting: Setting) -> dict[str, Any] | None:
    """The full :class:`~vlprune.ReductionConfig` of a setting as a plain dict (``None``:
    unpatched)."""
    if setting.config is None:
        return None
    return {k: v for k, v in dataclasses.asdict(setting.config).items() if k != "version"}


def method_of(setting: Setting) -> str:
    """The curve a setting belongs to: ``unpatched``, ``merge`` (ToMe, all r values),
    ``prune <score>[ +fuse| +recycle]`` (all keep rates), their combination, or the
    visual-token / in-LLM methods of vision-language models."""
    cfg = setting.config
    if cfg is None:
        return BASELINE
    parts = []
    if cfg.visual_keep is not None:
        parts.append(f"visual {cfg.visual_score}")
    if cfg.text_keep is not None:
        parts.append("text")
    if cfg.llm_keep is not None:
        parts.append("llm")
    if cfg.prune_keep is not None:
        extra = {"fuse": " +fuse", "recycle": " +recycle", "drop": ""}[cfg.prune_mode]
        parts.append(f"prune {cfg.prune_score}{extra}")
    r = cfg.merge_r  # an int, an (r, inflection) pair or a per-layer list
    merges = any(r) if isinstance(r, list) else bool(r[0] if isinstance(r, tuple) else r)
    if merges or not parts:
        parts.append("merge")
    return " + ".join(parts)


@dataclass
class OutputPaths:
    """Where a sweep writes; ``None`` skips that file."""

    csv: Path | None = None
    json: Path | None = None
    plot: Path | None = None


def output_paths(prefix: str | os.PathLike | None = None, *, csv: str | os.PathLike | None = None,
                 json: str | os.PathLike | None = None,
                 plot: str | os.PathLike | None = None) -> OutputPaths:
    """``PREFIX.csv``, ``PREFIX.json`` and ``PREFIX.png``; explicit paths win over the prefix."""
    def pick(explicit: Any, suffix: str) -> Path | None:
        if explicit is not None:
            return Path(explicit)
        return None if prefix is None else Path(f"{prefix}{suffix}")

    return OutputPaths(pick(csv, ".csv"), pick(json, ".json"), pick(plot, ".png"))


@dataclass
class PlotSpec:
    """What :func:`plot_sweep` draws: accuracy column ``y`` against one panel per ``panels``
    entry (column, axis label), one curve per ``group`` value, the ``reference`` row marked
    with a star and a dashed line at its accuracy."""

    y: str = "top1"
    ylabel: str = "top-1 accuracy (%)"
    panels: Sequence[tuple[str, str]] = (("gflops_per_img", "GFLOPs / image"),
                                         ("img_per_s", "images / s"))
    group: str = "method"
    reference: str = BASELINE
    title: str = ""


_MARKERS = "osD^v<>pPXh*"


def plot_sweep(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], spec: PlotSpec) -> None:
    """A PNG of accuracy against cost, one panel per ``spec.panels`` entry.

    Every ``spec.group`` value (method) is a line through its points sorted by x, each point
    annotated with its setting label; the reference row is a black star with a dashed
    horizontal line at its accuracy. Rows lacking a panel's column (or holding ``None``)
    are left out of that panel.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install 'vlprune[eval]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def num(row: Mapping[str, Any], key: str) -> float | None:
        v = row.get(key)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    if not rows:
        raise ValueError("nothing to plot")
    panels = list(spec.panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.6), squeeze=False)
    groups = list(dict.fromkeys(str(r.get(spec.group)) for r in rows
                                if r.get("setting") != spec.reference))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ref = next((r for r in rows if r.get("setting") == spec.reference), None)
    for ax, (xkey, xlabel) in zip(axes[0], panels):
        for j, g in enumerate(groups):
            pts = sorted(
                (num(r, xkey), num(r, spec.y), str(r.get("setting")))
                for r in rows
                if str(r.get(spec.group)) == g and r.get("setting") != spec.reference
                and num(r, xkey) is not None and num(r, spec.y) is not None
            )
            if not pts:
                continue
            xs, ys, labels = zip(*pts)
            color = colors[j % len(colors)]
            ax.plot(xs, ys, marker=_MARKERS[j % len(_MARKERS)], color=color, lw=1.2, ms=5,
                    label=g)
            for x, y, label in pts:
                short = label[len(g) + 2:] if label.startswith(f"{g}: ") else label
                ax.annotate(short, (x, y), textcoords="offset points", xytext=(4, 3),
                            fontsize=6, color=color)
        if ref is not None and num(ref, spec.y) is not None:
            ax.axhline(num(ref, spec.y), ls="--", color="grey", lw=0.8)
            if num(ref, xkey) is not None:
                ax.scatter([num(ref, xkey)], [num(ref, spec.y)], marker="*", s=160,
                           color="black", zorder=4, label=f"{spec.reference} (reference)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(spec.ylabel)
        ax.grid(alpha=0.3)
    entries: dict[str, Any] = {}
    for ax in axes[0]:  # a method missing from the first panel still gets its entry
        for h, lb in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(lb, h)
    ncol = min(len(entries), 4) or 1
    legend_rows = -(-len(entries) // ncol)
    fig.legend(list(entries.values()), list(entries), fontsize=7, loc="lower center",
               ncol=ncol, frameon=False)
    if spec.title:
        fig.suptitle(spec.title, fontsize=9)
    fig.tight_layout(rect=(0, 0.03 + 0.045 * legend_rows, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress_bar(total: int, enabled: bool = True, desc: str = "", unit: str = "batch") -> Any:
    """A tqdm bar (on stderr, cleared when done) when tqdm is installed and ``enabled``, else
    an object that does nothing; both work as context managers and have ``update`` and
    ``close``."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)


def _relative(value: Any, base: Any, kind: str) -> float | None:
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)):
        return None
    if kind == "diff":
        return float(value) - float(base)
    if kind == "ratio":
        return float(value) / float(base) if base else None
    if kind == "inverse":
        return float(base) / float(value) if value else None
    raise ValueError(f"unknown compare kind {kind!r}; allowed: diff, ratio, inverse")


@dataclass
class Sweep:
    """Settings -> rows, written to disk after every row.

    Args:
        paths: where to write (see :func:`output_paths`).
        meta: run facts stored in the JSON and repeated in every CSV row (model, data,
            batch size, device, ...); JSON-serialisable values.
        plot: what the PNG shows; ``None``: no plot.
        compare: extra columns relative to the reference row, ``name -> (column, kind)``
            with kind ``diff`` (value - reference), ``ratio`` (value / reference) or
            ``inverse`` (reference / value).
        columns: the leading CSV columns, in order (others follow in first-seen order).
        write: whether this process writes (only the main process of a multi-process run).
        kind: a name for the JSON's ``kind`` field, e.g. ``eval_imagenet``.
    """

    paths: OutputPaths = field(default_factory=OutputPaths)
    meta: Mapping[str, Any] = field(default_factory=dict)
    plot: PlotSpec | None = None
    compare: Compare = field(default_factory=dict)
    columns: Sequence[str] = ()
    write: bool = True
    kind: str = "sweep"
    rows: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    error: str | None = None
    #: the files the latest :meth:`save` wrote (a plot that failed is not among them)
    written: list[Path] = field(default_factory=list)
    _plot_warned: bool = field(default=False, repr=False)

    def run(self, settings: Sequence[Setting], evaluate: Callable[[Setting], Mapping[str, Any]],
            *, methods: Mapping[str, str] | None = None,
            on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Evaluate the unpatched model, then every setting, in order.

        ``evaluate(setting)`` returns the metrics of one setting (``setting.config is None``:
        the unpatched model; it is always first). ``methods`` maps a setting label to its
        curve name (default: :func:`method_of`). ``on_row`` sees every finished row (e.g. to
        print it). Labels must be unique. Exceptions (also ``KeyboardInterrupt``) leave the
        finished rows on disk with ``complete: false`` and the error, then propagate.
        """
        settings = with_baseline(settings)
        self.env = environment()
        self.rows, self.complete, self.error = [], False, None
        methods = methods or {}
        try:
            for s in settings:
                self.add(s, evaluate(s), method=methods.get(s.label))
                if on_row is not None:
                    on_row(self.rows[-1])
        except BaseException as e:
            self.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            try:
                self.save()
            except Exception as save_error:  # the original error matters more
                warnings.warn(f"could not save the partial results: {save_error}", stacklevel=2)
            raise
        self.complete = True
        self.save()
        return self.rows

    def add(self, setting: Setting, metrics: Mapping[str, Any], *,
            method: str | None = None) -> dict[str, Any]:
        """Append one row (label, method, metrics, relative columns, config) and save."""
        row: dict[str, Any] = {"setting": setting.label,
                               "method": method or method_of(setting)}
        row.update(metrics)
        ref = self.rows[0] if self.rows else row
        for name, (column, kind) in self.compare.items():
            row[name] = _relative(row.get(column), ref.get(column), kind)
        row["config"] = config_dict(setting)
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        """Rewrite the CSV, JSON and plot from the rows so far (main process only)."""
        if not self.write:
            return
        self.written = []
        for p in (self.paths.csv, self.paths.json, self.paths.plot):
            if p is not None:
                p.parent.mkdir(parents=True, exist_ok=True)
        if self.paths.json is not None:
            atomic_write(self.paths.json, json.dumps(self.to_dict(), indent=2, default=str))
            self.written.append(self.paths.json)
        if self.paths.csv is not None:
            self._write_csv(self.paths.csv)
            self.written.append(self.paths.csv)
        if self.paths.plot is not None and self.plot is not None and self.rows:
            try:
                plot_sweep(self.paths.plot, self.rows, self.plot)
                self.written.append(self.paths.plot)
            except Exception as e:  # the numbers are saved; a plot is not worth the run
                if not self._plot_warned:
                    warnings.warn(f"no plot written to {self.paths.plot}: {e}", stacklevel=2)
                    self._plot_warned = True

    def to_dict(self) -> dict[str, Any]:
        versions = {k: self.env[k] for k in VERSION_KEYS if k in self.env}
        return {
            "kind": self.kind,
            "complete": self.complete,
            "error": self.error,
            "meta": dict(self.meta),
            "env": self.env,
            "plot": None if self.plot is None else dataclasses.asdict(self.plot),
            "rows": [{**r, "meta": dict(self.meta), "versions": versions} for r in self.rows],
        }

    def csv_columns(self) -> list[str]:
        seen = dict.fromkeys(self.columns)
        for r in self.rows:
            seen.update(dict.fromkeys(k for k in r if k != "config"))
        meta = [k for k in self.meta if not isinstance(self.meta[k], (dict, list))]
        versions = [k for k in VERSION_KEYS if k in self.env]
        return [*seen, *meta, "config", *versions]

    def _write_csv(self, path: Path) -> None:
        names = self.csv_columns()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(names)
            for r in self.rows:
                full = {**self.env, **self.meta, **r}
                full["config"] = json.dumps(r.get("config"))
                w.writerow(["" if full.get(n) is None else full.get(n) for n in names])
        os.replace(tmp, path)

    def table(self, columns: Sequence[tuple[str, str, str]]) -> str:
        """A plain-text table: ``columns`` are (row key, header, format spec)."""
        cells = [[h for _, h, _ in columns]]
        for r in self.rows:
            cells.append([
                "-" if r.get(k) is None else format(r[k], fmt) if fmt else str(r[k])
                for k, _, fmt in columns
            ])
        widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
        lines = []
        for j, c in enumerate(cells):
            lines.append("  ".join(
                v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))
            ))
            if j == 0:
                lines.append("-" * len(lines[0]))
        return "\n".join(lines)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (folders made): beside it first, then a rename, so a reader
    (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def slug(text: str) -> str:
    """``text`` as a file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"
