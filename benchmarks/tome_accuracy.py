"""ToMe merging on real ViT-Ti/16 weights: top-1 on the 500 shared ImageNet images vs FLOPs.

    python benchmarks/tome_accuracy.py --assets ../shared/assets --merge-r 4,8,13,16 \
        --out results/tome_vit_tiny

Writes ``<out>.json``, ``<out>.md`` (the table) and ``<out>.png`` (top-1 vs FLOPs ratio).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from vlprune.cli import parse_merge_list
from vlprune.eval.bench import Setting, environment
from vlprune.eval.imagenet import load_eval_tensors
from vlprune.eval.sweep import accuracy_sweep, format_rows
from vlprune.eval.weights import load_weights

MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def load_vit_tiny(assets: Path) -> torch.nn.Module:
    import timm

    weights = assets / MODEL / f"{MODEL}.npz"
    model = timm.create_model(MODEL, pretrained=False)
    load_weights(model, weights)
    return model.eval()


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = [r["flops_ratio"] for r in rows]
    ys = [r["top1"] for r in rows]
    ax.plot(xs, ys, "o-")
    for i, r in enumerate(rows):  # alternate above/below so neighbouring labels stay apart
        ax.annotate(r["setting"], (r["flops_ratio"], r["top1"]), textcoords="offset points",
                    xytext=(4, 6 if i % 2 == 0 else -12), fontsize=8)
    ax.set_xlabel("FLOPs reduction (x)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", default=os.environ.get("VLPRUNE_ASSETS", "../shared/assets"))
    p.add_argument("--merge-r", type=parse_merge_list, default=parse_merge_list("4,8,13,16"))
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--out", default="results/tome_vit_tiny")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()

    assets = Path(args.assets)
    images_root = assets / "imagenet-sample"
    if not images_root.is_dir():
        raise SystemExit(f"no imagenet-sample folder under {assets}; pass --assets")
    model = load_vit_tiny(assets)
    data = load_eval_tensors(images_root, model, limit=args.limit)
    rows = accuracy_sweep(model, data, [Setting.merge(r) for r in args.merge_r],
                          progress=not args.no_progress)
    table = format_rows(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"model": MODEL, "rows": rows,
                                                    "env": environment()}, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    plot(rows, out.with_suffix(".png"), f"ToMe on {MODEL}, {rows[0]['n']} images")
    print(f"wrote {out}.json, {out}.md, {out}.png")


if __name__ == "__main__":
    main()
