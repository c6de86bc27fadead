"""Speed-accuracy sweeps: accuracy and FLOPs of several reduction settings on one model."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..api import describe, patch, unpatch
from .bench import BASELINE, Setting
from .flops import count_model_flops
from .imagenet import evaluate_top1


def accuracy_sweep(
    model: nn.Module,
    data: Any,
    settings: Sequence[Setting],
    *,
    batch_size: int = 50,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Top-1/top-5 and GFLOPs per image of the unpatched model and of each setting.

    ``data`` is anything :func:`vlprune.eval.imagenet.evaluate_top1` takes; for several
    settings pass the ``(images, labels)`` tensors so the images are decoded once. Each row
    holds ``setting``, ``top1``, ``top5``, ``delta_top1`` (vs unpatched), ``gflops``,
    ``flops_ratio`` and ``tokens_final``. The model is left unpatched.
    """
    rows: list[dict[str, Any]] = []
    x1 = _first_image(data)
    for s in [Setting(BASELINE, None), *settings]:
        if s.config is None:
            if getattr(model, "_vlprune", None) is not None:
                unpatch(model)
        else:
            patch(model, s.config)
        acc = evaluate_top1(model, data, batch_size=batch_size, progress=progress)
        if s.config is None:
            flops, tokens = count_model_flops(model, x1), None
        else:
            d = describe(model, x1)
            flops, tokens = d.flops, d.layers[-1].tokens_out
        rows.append({
            "setting": s.label,
            "config": None if s.config is None else {
                k: v for k, v in dataclasses.asdict(s.config).items() if k != "version"
            },
            "top1": acc["top1"],
            "top5": acc["top5"],
            "n": acc["n"],
            "gflops": flops / 1e9,
            "tokens_final": tokens,
        })
    if getattr(model, "_vlprune", None) is not None:
        unpatch(model)
    base = rows[0]
    for r in rows:
        r["delta_top1"] = r["top1"] - base["top1"]
        r["flops_ratio"] = base["gflops"] / r["gflops"]
    return rows


def _first_image(data: Any):
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
