"""The ImageNet task (``vlprune eval imagenet``): a speed-accuracy sweep of reduction settings
on a classifier (:func:`eval_imagenet`, :class:`ImageNetEval`), its model and data
(:func:`build_classifier`, :func:`open_dataset`), and :func:`accuracy_sweep`, the short
in-memory top-1 sweep of the real-data tests and ``benchmarks/imagenet_sweep.py``.

One model, one dataset, many settings. The images are decoded once (when they fit in memory,
see :data:`PRELOAD_MAX_BYTES`) and every setting runs over the same tensors: the unpatched
model first, then each setting. Per setting the sweep records top-1 / top-5 accuracy, the
agreement of its top-1 predictions with the unpatched model's, throughput, GFLOPs per image,
peak memory and the tokens left at the last layer, and rewrites the CSV, JSON and plot after
every row (:class:`vlprune.eval.sweep.Sweep`).

Under ``accelerate launch`` (or ``torchrun``) every process evaluates a strided shard of the
images and the per-sample predictions are gathered in dataset order
(:mod:`vlprune.eval.distributed`), so accuracy, agreement and counts equal those of one
process. Only the main process writes.

Unreadable images (missing, truncated, not an image) are skipped and counted (``skipped``),
with a warning naming a few; ``strict=True`` refuses them instead.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..api import describe, patch
from ..config import ReductionConfig
from .distributed import DistContext
from .flops import count_model_flops
from .image_data import (
    DecodedImages,
    ImageFolderCSV,
    ImageFolderTree,
    UnreadableImagesError,
    decode_images,
    evaluate_top1,
    iter_images,
    load_item,
    sample_name,
)
from .machine import sync
from .memory import peak_memory
from .sweep import BASELINE, OutputPaths, PlotSpec, Setting, Sweep, apply_setting, progress_bar

__all__ = [
    "COLUMNS",
    "PRELOAD_MAX_BYTES",
    "TIMING",
    "ImageNetEval",
    "UnreadableImagesError",
    "accuracy_sweep",
    "build_classifier",
    "eval_imagenet",
    "format_rows",
    "num_classes_of",
    "open_dataset",
]

#: ``preload="auto"`` decodes a process's images into memory up to this many bytes of
#: float32 tensors (about 21,000 images at 224 px); larger shards are decoded per setting.
PRELOAD_MAX_BYTES = 4 * 2**30

#: how ``img_per_s`` is measured (stored with the results)
TIMING = ("forward passes of the evaluation itself on already decoded images (loading and "
          "decoding excluded), synchronized per batch; the first batch of each process is "
          "untimed (warm-up) when the process has more than one batch; all processes: "
          "images timed / slowest process's timed seconds")

#: the leading columns of the CSV, in order
COLUMNS = ("setting", "method", "top1", "delta_top1", "top5", "agreement", "img_per_s",
           "speedup", "gflops_per_img", "flops_ratio", "tokens_final", "peak_mem_mb", "n",
           "skipped", "seconds")

COMPARE = {
    "delta_top1": ("top1", "diff"),
    "speedup": ("img_per_s", "ratio"),
    "flops_ratio": ("gflops_per_img", "inverse"),
}

_SHOWN_SKIPPED = 5


def _skipped_text(skipped: Sequence[tuple[int, str, str]], total: int) -> str:
    shown = "; ".join(f"{name} ({err})" for _, name, err in skipped[:_SHOWN_SKIPPED])
    more = f"; ... (+{len(skipped) - _SHOWN_SKIPPED} more)" if len(skipped) > _SHOWN_SKIPPED else ""
    return f"{len(skipped)} of {total} images could not be read: {shown}{more}"


def build_classifier(name: str, *, pretrained: bool = False, weights: str | os.PathLike | None = None,
                     num_classes: int | None = None, img_size: int | None = None) -> nn.Module:
    """A timm classifier in eval mode: hub weights with ``pretrained``, a local checkpoint
    with ``weights`` (see :func:`vlprune.eval.weights.load_weights`), else random weights.

    ``name`` may carry a pretrained tag (``vit_tiny_patch16_224.augreg_in21k_ft_in1k``); the
    tag also picks the preprocessing.
    """
    try:
        import timm
    except ImportError as e:
        raise RuntimeError("timm models need timm: pip install 'vlprune[timm]'") from e
    if pretrained and weights is not None:
        raise ValueError("give pretrained=True (hub weights) or a weights file, not both")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:10]
        raise ValueError(f"unknown timm model {name!r}; similar names: {close}")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not get the pretrained weights of {name} ({type(e).__name__}: {e}); "
            "without the hub, pass a local checkpoint with --weights FILE"
        ) from e
    if weights is not None:
        from .weights import load_weights

        load_weights(model, weights)
    return model.eval()


def num_classes_of(model: nn.Module) -> int:
    """The number of outputs of a classifier (timm's ``num_classes``)."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    raise ValueError(f"{type(model).__name__} has no classifier head (num_classes = {n!r})")


def open_dataset(data: str | os.PathLike | None, transform: Callable[[Any], Any], *,
                 dataset: str | None = None, split: str = "validation",
                 limit: int | None = None, download: bool = False) -> Dataset:
    """The images to evaluate.

    - ``dataset`` given: a timm dataset (``timm.data.create_dataset(dataset, root=data,
      split=split)``, e.g. ``hfds/imagenet-1k`` or ``torch/imagenet``), map-style only.
    - ``data`` holding a ``labels.csv``: :class:`~vlprune.eval.image_data.ImageFolderCSV`
      (listed files that are absent are kept, to be skipped and counted).
    - else ``data`` as an ImageFolder tree: :class:`~vlprune.eval.image_data.ImageFolderTree`.

    ``limit`` keeps the first ``limit`` images (the first rows of labels.csv; a round-robin
    over the classes of a tree; the first indices of a timm dataset).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if dataset:
        return _timm_dataset(dataset, data, split, transform, limit, download)
    if data is None:
        raise ValueError("no data: give a folder (ImageFolder tree or labels.csv) or a timm "
                         "dataset name")
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder not found: {root} (expected an ImageFolder tree <root>/<class>/<image>"
            ", or a folder with labels.csv; for a timm dataset pass its name with --dataset)"
        )
    if (root / "labels.csv").is_file():
        return ImageFolderCSV(root, transform, limit=limit, missing="keep")
    return ImageFolderTree(root, transform, limit=limit)


def _timm_dataset(name: str, root: str | os.PathLike | None, split: str,
                  transform: Callable[[Any], Any], limit: int | None, download: bool) -> Dataset:
    from timm.data import create_dataset

    try:
        ds = create_dataset(name, root=None if root is None else str(root), split=split,
                            is_training=False, download=download)
    except Exception as e:
        raise RuntimeError(
            f"could not open the timm dataset {name!r} (split {split!r}, root {root}): "
            f"{type(e).__name__}: {e}. Dataset names look like hfds/<hub name> (needs the "
            "`datasets` package and the hub or a local cache) or torch/<torchvision name> "
            "with a root folder; a local folder can be given with --data alone"
        ) from e
    if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        raise ValueError(
            f"timm dataset {name!r} is iterable (streaming); evaluation needs a map-style "
            "dataset (hfds/, torch/, or a local folder)"
        )
    ds.transform = transform
    if limit is not None and limit < len(ds):
        ds = torch.utils.data.Subset(ds, range(limit))
    return ds


class ImageNetEval:
    """The per-setting evaluation of one classifier on one dataset, in this process.

    Call :meth:`costs` once with all settings (validates them and counts their FLOPs and
    tokens), :meth:`prepare` (decodes this process's shard when preloading; gathers and
    reports unreadable images), then call the object with a
    :class:`~vlprune.eval.sweep.Setting` for its metrics, the unpatched setting first (it is
    the reference of ``agreement``). ``seconds`` in the metrics is the wall time of the
    setting's pass (slowest process), decoding included when the images are streamed.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, *, ctx: DistContext | None = None,
                 batch_size: int = 50, num_workers: int = 0, preload: str | bool = "auto",
                 measure_memory: bool = True, strict: bool = False, progress: bool = True,
                 input_size: tuple[int, ...] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if preload not in ("auto", True, False):
            raise ValueError(f"preload must be 'auto', True or False, got {preload!r}")
        self.model = model.eval()
        self.dataset = dataset
        self.ctx = ctx or DistContext()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.measure_memory = measure_memory
        self.strict = strict
        self.progress = progress and self.ctx.is_main
        param = next(model.parameters(), None)
        self.dtype = param.dtype if param is not None else torch.float32
        self.device = param.device if param is not None else self.ctx.device
        self.k = min(5, num_classes_of(model))
        self.total = len(dataset)
        self.indices = self.ctx.shard(self.total)
        self.input_size = input_size
        if preload == "auto":
            numel = math.prod(input_size) if input_size else 3 * 224 * 224
            preload = len(self.indices) * numel * 4 <= PRELOAD_MAX_BYTES
        self.preload = bool(preload)
        self.decoded: DecodedImages | None = None
        self.skipped: list[tuple[int, str, str]] | None = None
        self.reference: dict[str, torch.Tensor] | None = None
        self._costs: dict[str, tuple[float, int | None]] = {}

    # -- setup --------------------------------------------------------------------------

    def prepare(self) -> None:
        """Decode this process's images (``preload``) and report the unreadable ones."""
        if self.total == 0:
            raise ValueError("the dataset has no images")
        if not self.preload:
            return
        self.decoded = decode_images(self.dataset, self.indices, batch_size=self.batch_size,
                                     num_workers=self.num_workers, progress=self.progress)
        self._report_skipped(self.decoded.skipped)

    def _report_skipped(self, local: list[tuple[int, str, str]]) -> None:
        skipped = sorted(s for part in self.ctx.gather_object(local) for s in part)
        self.skipped = skipped
        if not skipped:
            return
        text = _skipped_text(skipped, self.total)
        if self.strict:
            raise UnreadableImagesError(f"{text} (without --strict they are skipped and counted)")
        if len(skipped) == self.total:
            raise UnreadableImagesError(f"no image could be read: {text}")
        if self.ctx.is_main:
            warnings.warn(f"{text}; they are skipped and counted in the 'skipped' column",
                          stacklevel=2)

    def example(self) -> torch.Tensor:
        """One image (the first readable one of the dataset, the same in every process)."""
        for i in range(min(self.total, 50)):
            try:
                x, _ = load_item(self.dataset, i)
            except Exception:
                continue
            return x.unsqueeze(0)
        shape = self.input_size or (3, 224, 224)
        return torch.randn(1, *shape)

    def costs(self, settings: Sequence[Setting]) -> dict[str, tuple[float, int | None]]:
        """GFLOPs per image and tokens at the last layer of the unpatched model and of every
        setting, from one batch-1 forward each. Patching every setting here also validates
        them all before the long evaluation starts. Leaves the model unpatched."""
        x1 = self.example().to(self.device, self.dtype)
        out: dict[str, tuple[float, int | None]] = {}
        try:
            with torch.inference_mode():
                apply_setting(self.model, Setting(BASELINE, None))
                base_flops = count_model_flops(self.model, x1)
                # The token count of the unpatched model: a patch that reduces nothing.
                patch(self.model, ReductionConfig())
                d0 = describe(self.model, x1, flops=False)
                out[BASELINE] = (base_flops / 1e9, d0.layers[-1].tokens_out if d0.layers else None)
                for s in settings:
                    if s.config is None:
                        continue
                    apply_setting(self.model, s)
                    d = describe(self.model, x1)
                    out[s.label] = (d.flops / 1e9, d.layers[-1].tokens_out if d.layers else None)
        finally:
            apply_setting(self.model, Setting(BASELINE, None))
        self._costs = out
        return out

    # -- one setting ----------------------------------------------------------------------

    def _batches(self):
        if self.decoded is not None:
            d = self.decoded
            for i in range(0, len(d), self.batch_size):
                sl = slice(i, i + self.batch_size)
                yield d.index[sl], d.images[sl], d.labels[sl], []
        else:
            yield from iter_images(self.dataset, self.indices, batch_size=self.batch_size,
                                   num_workers=self.num_workers)

    def _n_batches(self) -> int:
        n = len(self.decoded) if self.decoded is not None else len(self.indices)
        return -(-n // self.batch_size)

    def __call__(self, setting: Setting) -> dict[str, Any]:
        """Metrics of ``setting`` over the whole dataset (all processes)."""
        if setting.label not in self._costs:
            self.costs([setting])
        apply_setting(self.model, setting)
        model, device = self.model, self.device
        index, top5, labels, failures = [], [], [], []
        mem = None
        timed_s, timed_n, n_batches = 0.0, 0, self._n_batches()
        start = time.perf_counter()
        desc = f"eval {setting.label}"
        try:
            with torch.inference_mode(), progress_bar(n_batches, self.progress, desc) as bar:
                for b, (idx, x, y, fail) in enumerate(self._batches()):
                    failures += fail
                    if x is None:
                        bar.update(1)
                        continue
                    x = x.to(device, self.dtype, non_blocking=True)
                    if b == 0 and self.measure_memory:
                        mem = peak_memory(lambda x=x: model(x), device=device) / 2**20
                    sync(device)
                    t0 = time.perf_counter()
                    logits = model(x)
                    sync(device)
                    if b > 0 or n_batches == 1:
                        timed_s += time.perf_counter() - t0
                        timed_n += len(x)
                    if isinstance(logits, (tuple, list)):
                        logits = logits[0]
                    top5.append(logits.topk(self.k, dim=-1).indices.cpu())
                    labels.append(y)
                    index.append(idx)
                    bar.update(1)
        finally:
            apply_setting(model, Setting(BASELINE, None))
        seconds = time.perf_counter() - start
        if self.skipped is None:  # streamed: the unreadable images show up in the first pass
            self._report_skipped([(i, sample_name(self.dataset, i), e) for i, e in failures])
        local = torch.cat(index) if index else torch.empty(0, dtype=torch.long)
        preds = torch.cat(top5) if top5 else torch.empty(0, self.k, dtype=torch.long)
        got = self.ctx.gather_samples(local, {
            "top5": preds,
            "label": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
        })
        n = len(got["index"])
        if n == 0:
            raise UnreadableImagesError("no image was evaluated")
        hits = got["top5"] == got["label"][:, None]
        top1 = 100.0 * int(hits[:, 0].sum()) / n
        top5_acc = 100.0 * int(hits.any(dim=-1).sum()) / n
        pred1 = got["top5"][:, 0]
        if setting.config is None:
            self.reference = {"index": got["index"], "pred": pred1}
        agreement = None
        if self.reference is not None:
            same = torch.equal(self.reference["index"], got["index"])
            if same:
                agreement = 100.0 * int((pred1 == self.reference["pred"]).sum()) / n
            else:  # a streamed image that read once but not twice: compare the common ones
                ref = dict(zip(self.reference["index"].tolist(), self.reference["pred"].tolist()))
                pairs = [(p, ref[i]) for i, p in zip(got["index"].tolist(), pred1.tolist())
                         if i in ref]
                agreement = 100.0 * sum(a == b for a, b in pairs) / max(len(pairs), 1)
        slowest = self.ctx.max(timed_s)
        images_timed = self.ctx.sum(timed_n)
        gflops, tokens = self._costs[setting.label]
        return {
            "top1": top1,
            "top5": top5_acc,
            "agreement": agreement,
            "img_per_s": images_timed / slowest if slowest > 0 else None,
            "gflops_per_img": gflops,
            "tokens_final": tokens,
            "peak_mem_mb": None if mem is None else self.ctx.max(mem),
            "n": n,
            "skipped": len(self.skipped or []),
            "seconds": self.ctx.max(seconds),
        }


def eval_imagenet(model: nn.Module, dataset: Dataset, settings: Sequence[Setting], *,
                  ctx: DistContext | None = None, paths: OutputPaths | None = None,
                  meta: Mapping[str, Any] | None = None, methods: Mapping[str, str] | None = None,
                  batch_size: int = 50, num_workers: int = 0, preload: str | bool = "auto",
                  measure_memory: bool = True, strict: bool = False, progress: bool = True,
                  input_size: tuple[int, ...] | None = None, title: str = "",
                  on_row: Callable[[dict[str, Any]], None] | None = None) -> Sweep:
    """Evaluate the unpatched ``model`` and every setting on ``dataset``; returns the
    finished :class:`~vlprune.eval.sweep.Sweep` (``.rows``), written to ``paths`` after
    every row by the main process.

    ``model`` is a classifier on its device and dtype (unpatched); ``dataset`` yields
    ``(preprocessed image, class index)``. Every setting is patched once before the run
    (configuration errors surface before any evaluation). The model is left unpatched.
    """
    ctx = ctx or DistContext()
    runner = ImageNetEval(model, dataset, ctx=ctx, batch_size=batch_size,
                          num_workers=num_workers, preload=preload,
                          measure_memory=measure_memory, strict=strict, progress=progress,
                          input_size=input_size)
    runner.costs(settings)
    runner.prepare()
    full_meta = {**(meta or {}), "images": runner.total, "batch_size": batch_size,
                 "world_size": ctx.world_size, "device": str(runner.device),
                 "dtype": str(runner.dtype).replace("torch.", ""),
                 "threads": torch.get_num_threads(), "preload": runner.preload,
                 "timing": TIMING}
    sweep = Sweep(paths or OutputPaths(), meta=full_meta,
                  plot=PlotSpec(title=title or str(full_meta.get("model", ""))),
                  compare=COMPARE, columns=COLUMNS, write=ctx.is_main, kind="eval_imagenet")
    sweep.run(settings, runner, methods=methods, on_row=on_row)
    return sweep


def accuracy_sweep(
    model: nn.Module,
    data: Any,
    settings: Sequence[Setting],
    *,
    batch_size: int = 50,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Top-1/top-5 and GFLOPs per image of the unpatched model and of each setting, in
    memory (a :class:`~vlprune.eval.sweep.Sweep` that writes nothing).

    ``data`` is anything :func:`vlprune.eval.image_data.evaluate_top1` takes; for several
    settings pass the ``(images, labels)`` tensors so the images are decoded once. Each row
    holds ``setting``, ``method``, ``top1``, ``top5``, ``n``, ``gflops``, ``tokens_final``,
    ``delta_top1`` (vs unpatched), ``flops_ratio`` and ``config``. The model is left
    unpatched.
    """
    x1 = _first_image(data)

    def evaluate(s: Setting) -> dict[str, Any]:
        apply_setting(model, s)
        try:
            acc = evaluate_top1(model, data, batch_size=batch_size, progress=progress)
            if s.config is None:
                flops, tokens = count_model_flops(model, x1), None
            else:
                d = describe(model, x1)
                flops, tokens = d.flops, d.layers[-1].tokens_out
        finally:
            apply_setting(model, Setting(BASELINE, None))
        return {"top1": acc["top1"], "top5": acc["top5"], "n": acc["n"],
                "gflops": flops / 1e9, "tokens_final": tokens}

    sweep = Sweep(compare={"delta_top1": ("top1", "diff"), "flops_ratio": ("gflops", "inverse")},
                  write=False, kind="accuracy_sweep")
    return sweep.run(settings, evaluate)


def _first_image(data: Any) -> torch.Tensor:
    if isinstance(data, (tuple, list)):
        return data[0][:1]
    first = data[0] if hasattr(data, "__getitem__") else next(iter(data))
    images = first[0]
    return images[:1] if images.dim() == 4 else images.unsqueeze(0)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text (Markdown) table of :func:`accuracy_sweep` rows."""
    lines = [
        "| setting | tokens at last layer | GFLOPs/img | FLOPs ratio | top-1 | delta | top-5 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tok = "-" if r["tokens_final"] is None else str(r["tokens_final"])
        lines.append(
            f"| {r['setting']} | {tok} | {r['gflops']:.3f} | {r['flops_ratio']:.2f}x | "
            f"{r['top1']:.1f} | {r['delta_top1']:+.1f} | {r['top5']:.1f} |"
        )
    return "\n".join(lines)
