"""``vlprune calibrate``: find the reduction settings that keep a model's own predictions best
within a FLOPs budget, on unlabeled images (:func:`vlprune.calibrate.search`), and save them
as JSON for ``patch`` and every command's ``--config``.

    vlprune calibrate --model vit_tiny_patch16_224.augreg_in21k_ft_in1k --weights vit_ti.npz \\
        --data my_images/ --flops 0.5 --out vit_ti_half.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from ..calibration import OBJECTIVES, search
from ..eval.sweep import slug
from .args import UsageError, image_model_from_args, parse_dtype


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``calibrate`` to the top-level subcommands."""
    c = sub.add_parser(
        "calibrate", help="find the best reduction settings for a FLOPs budget (label-free)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search merge schedules, pruning layers and keep rates, recycling / fusing "
        "and the last-layer trick for the setting that keeps the model's own predictions best "
        "(KL and top-1 agreement to the unpatched model, or cosine distance for an image "
        "encoder) within a budget. FLOPs are counted. No labels are read.",
        epilog="example:\n  vlprune calibrate --model vit_tiny_patch16_224.augreg_in21k_ft_in1k "
        "--weights vit_ti.npz \\\n      --data images/ --flops 0.5 --out vit_ti_half.json\n"
        "  vlprune eval imagenet ... --config vit_ti_half.json   # use it",
    )
    m = c.add_argument_group("model")
    m.add_argument("--model", "-m", required=True, metavar="NAME",
                   help="timm model name, optionally with its pretrained tag (sets the "
                   "preprocessing), or open_clip:NAME / hf_clip:SHAPE for an image tower")
    m.add_argument("--weights", "--checkpoint", metavar="PATH", default=None,
                   help="local weights file (.npz, .safetensors, .pth)")
    m.add_argument("--pretrained", action="store_true",
                   help="timm hub weights (downloads)")
    m.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    m.add_argument("--dtype", type=parse_dtype, default=torch.float32,
                   help="float32, float16, bfloat16 (default: float32)")
    m.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's)")
    d = c.add_argument_group("data (labels, if any, are not read)")
    d.add_argument("--data", required=True, metavar="DIR",
                   help="a folder of images (flat, an ImageFolder tree, or with labels.csv)")
    d.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use the first N images (default: all)")
    b = c.add_argument_group("budget (one of)")
    g = b.add_mutually_exclusive_group(required=True)
    g.add_argument("--flops", type=float, default=None, metavar="F",
                   help="fraction of the unpatched FLOPs, in (0, 1), e.g. 0.5")
    g.add_argument("--speedup", type=float, default=None, metavar="S",
                   help="speedup in FLOPs, > 1 (2.0 is --flops 0.5)")
    s = c.add_argument_group("search")
    s.add_argument("--objective", choices=OBJECTIVES, default="divergence",
                   help="rank by divergence (KL / cosine distance, default) or top-1 agreement")
    s.add_argument("--screen", type=int, default=64, metavar="N",
                   help="images every candidate is scored on (default: 64)")
    s.add_argument("--finalists", type=int, default=6, metavar="N",
                   help="best candidates then scored on all images (default: 6)")
    s.add_argument("--batch-size", "-b", type=int, default=32, metavar="N")
    s.add_argument("--seed", type=int, default=0, help="seed of the screening subset")
    s.add_argument("--z", type=float, default=2.0, metavar="Z",
                   help="a hybrid replaces merging alone only when better by more than Z "
                   "standard errors of the per-image difference (default: 2; 0: the best as is)")
    o = c.add_argument_group("output")
    o.add_argument("--out", "-o", metavar="PATH", default=None,
                   help="JSON: the config (for --config and ReductionConfig.load) and the "
                   "search (default: results/calibrate_<model>_<budget>.json)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd)


def _images(args: argparse.Namespace, model: torch.nn.Module) -> torch.Tensor:
    from ..eval.image_data import eval_transform, open_images, preload

    try:
        dataset = open_images(args.data, eval_transform(model), limit=args.limit)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    if len(dataset) < 2:
        raise UsageError(f"{args.data} has {len(dataset)} image(s); calibration needs at least 2")
    images, _ = preload(dataset)
    return images


def cmd(args: argparse.Namespace) -> int:
    for name in ("limit", "screen", "finalists", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.flops is not None and not 0 < args.flops < 1:
        raise UsageError(f"--flops must be in (0, 1), got {args.flops}")
    if args.z < 0:
        raise UsageError(f"--z must be >= 0, got {args.z}")
    if args.speedup is not None and not args.speedup > 1:
        raise UsageError(f"--speedup must be > 1, got {args.speedup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = image_model_from_args(args, "calibrate")
    if args.weights is None and not args.pretrained:
        warnings.warn(f"{args.model} has random weights (no --weights or --pretrained): the "
                      "settings found fit random weights, not a trained model", stacklevel=1)
    images = _images(args, model)
    model = model.to(args.device, args.dtype)
    budget = f"flops{args.flops:g}" if args.flops is not None else f"speedup{args.speedup:g}"
    out = Path(args.out or f"results/calibrate_{slug(args.model)}_{budget}.json")

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = search(model, images, flops=args.flops, speedup=args.speedup,
                    objective=args.objective, screen=args.screen, finalists=args.finalists,
                    batch_size=args.batch_size, seed=args.seed, z=args.z,
                    progress=not args.no_progress,
                    log=say)
    print(result.table())
    merge = result.merge_only
    if merge is not None and merge.full is not None:
        print(f"merging alone at this budget: {merge.label}: divergence "
              f"{merge.full.divergence:.4f}, agreement {100 * merge.full.agreement:.1f}%")
    print(f"chosen: {json.dumps(result.config.to_dict())}  ({result.flops_ratio:.3f} of the "
          f"FLOPs, {result.seconds:.0f} s; {result.note})")
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    print(f"wrote {out}", file=sys.stderr)
    return 0
