"""Speed-accuracy sweep on real ViT-Ti/16 weights: top-1 on the 500 shared ImageNet images
against the FLOPs reduction, for every reduction method.

    python benchmarks/imagenet_sweep.py --preset pruning --out docs/results/pruning_vit_tiny
    python benchmarks/imagenet_sweep.py --preset tome --out docs/results/tome_vit_tiny
    python benchmarks/imagenet_sweep.py --setting "prune_keep=0.6 prune_recycle=True" --out /tmp/x

Writes ``<out>.json``, ``<out>.md`` (the table) and ``<out>.png`` (top-1 vs FLOPs ratio, one
marker per method).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from vlprune.cli.args import parse_setting
from vlprune.eval.image_data import load_eval_tensors
from vlprune.eval.imagenet import accuracy_sweep, format_rows
from vlprune.eval.machine import environment
from vlprune.eval.sweep import Setting
from vlprune.eval.weights import load_weights

MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
EVIT = (3, 6, 9)


def preset(name: str) -> list[Setting]:
    if name == "tome":
        return [Setting.of(merge_r=r) for r in (4, 8, 13, 16)]
    if name != "pruning":
        raise SystemExit(f"unknown preset {name!r}; allowed: tome, pruning")
    rows = [Setting.of(merge_r=r) for r in (8, 13, 16)]
    for keep in (0.7, 0.5):
        rows += [
            Setting.of(prune_keep=keep, prune_layers=EVIT),
            Setting.of(prune_keep=keep, prune_layers=EVIT, prune_fuse=True),
            Setting.of(prune_keep=keep, prune_layers=EVIT, prune_recycle=True),
            Setting.of(prune_keep=keep, prune_layers=EVIT, prune_score="diversity"),
        ]
        rows += [
            Setting.of(prune_keep=keep, prune_layers=EVIT, prune_score="random", prune_seed=s)
            for s in (0, 1, 2)
        ]
    rows += [
        Setting.of(prune_keep=0.7, prune_layers=EVIT, prune_score=s)
        for s in ("cls_attn_vnorm", "key_norm", "attn_entropy")
    ]
    rows += [
        Setting.of(prune_keep=0.7, prune_layers=(3,), merge_r=8),
        Setting.of(prune_keep=[0.7, 0.7, 0.7, 0.01], prune_layers=(3, 6, 9, 11),
                   prune_recycle=True, merge_r=2),
        Setting.of(prune_keep=[0.5, 0.01], prune_layers=(10, 11), merge_r=12),
    ]
    return rows


def method(row: dict) -> str:
    """The method family of a sweep row, for grouping in the plot."""
    cfg = row["config"]
    if cfg is None:
        return "unpatched"
    merges = cfg["merge_r"] not in (0, [], None)
    if cfg["prune_keep"] is None:
        return "ToMe merging"
    if merges:
        return "hybrid prune + merge"
    mode = "+fuse" if cfg["prune_fuse"] else "+recycle" if cfg["prune_recycle"] else ""
    return f"{cfg['prune_score']}{mode}"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(method(r), []).append(r)
    markers = "osD^v<>pP*Xh"
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for i, (name, members) in enumerate(groups.items()):
        if name.startswith("random") and len(members) > 1:  # mean over seeds per budget
            by_ratio: dict[float, list[float]] = {}
            for m in members:
                by_ratio.setdefault(round(m["flops_ratio"], 2), []).append(m["top1"])
            xs = sorted(by_ratio)
            ys = [statistics.mean(by_ratio[x]) for x in xs]
            name = f"{name} (mean of seeds)"
        else:
            members = sorted(members, key=lambda m: m["flops_ratio"])
            xs = [m["flops_ratio"] for m in members]
            ys = [m["top1"] for m in members]
        ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="-" if len(xs) > 1 else "",
                label=name)
    ax.set_xlabel("FLOPs reduction (x, higher is cheaper)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", default=os.environ.get("VLPRUNE_ASSETS", "../shared/assets"))
    p.add_argument("--preset", default=None, help="tome or pruning")
    p.add_argument("--setting", action="append", type=parse_setting, default=[],
                   help='extra row, e.g. "prune_keep=0.7 prune_layers=3 merge_r=8"')
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--out", default="results/imagenet_sweep")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()

    settings = (preset(args.preset) if args.preset else []) + [Setting.of(**kw) for kw in args.setting]
    if not settings:
        raise SystemExit("nothing to run: give --preset and/or --setting")
    assets = Path(args.assets)
    weights = assets / MODEL / f"{MODEL}.npz"
    images_root = assets / "imagenet-sample"
    for needed in (weights, images_root):
        if not needed.exists():
            raise SystemExit(f"missing {needed}; pass --assets (the folder with {MODEL}/ and imagenet-sample/)")
    import timm

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = timm.create_model(MODEL, pretrained=False)
    load_weights(model, weights)
    data = load_eval_tensors(images_root, model.eval(), limit=args.limit)
    rows = accuracy_sweep(model, data, settings, progress=not args.no_progress)
    table = format_rows(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"model": MODEL, "rows": rows, "env": environment()}, indent=2)
    )
    out.with_suffix(".md").write_text(table + "\n")
    plot(rows, out.with_suffix(".png"), f"{MODEL}, {rows[0]['n']} ImageNet images")
    print(f"wrote {out}.json, {out}.md, {out}.png")


if __name__ == "__main__":
    main()
