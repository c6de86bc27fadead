"""``vlprune tune``: label-free self-distillation of a patched model towards its unreduced
self (:func:`vlprune.tune`), from a folder of images, saved as a plain ``state_dict`` that
loads into the unpatched model.

    vlprune tune --model vit_tiny_patch16_224 --weights vit_ti.npz --data my_images \
        --merge-r 16 --params norms-biases --steps 300 --out vit_ti_r16.safetensors
    vlprune tune --model vit_tiny_patch16_224 --weights vit_ti.npz --data my_images \
        --config calibrated.json --params lora --steps 500 --out vit_ti_tuned.pth
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import torch

from ..api import patch
from ..config import ReductionConfig
from ..eval.image_data import open_images
from ..tune import LOSSES, PARAMS, SAVE_SUFFIXES, TEACHERS, TuneStep, tune
from .args import RunError, UsageError, add_reduction_args, image_model_from_args, prune_options

#: model name prefixes of the image towers built from configs (random weights + --weights)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``tune`` to the top-level subcommands."""
    t = sub.add_parser(
        "tune", help="win accuracy back: label-free self-distillation of a patched model",
        description=textwrap.fill(
            "Tune a patched model on unlabelled images so that it gives again the outputs of "
            "the same model without reduction (the teacher): KL of the logits for "
            "classifiers, cosine of the pooled features for image towers. Saves a plain "
            "state_dict (by suffix: .safetensors, or torch.save for .pt/.pth/.bin) that "
            "loads into the unpatched model; patch it again with the same settings.", 88),
        epilog="examples:\n"
        "  vlprune tune --model vit_tiny_patch16_224 --weights vit_ti.npz --data my_images "
        "--merge-r 16 --steps 300 --out vit_ti_r16.safetensors\n"
        "  vlprune tune --model deit_small_patch16_224 --pretrained --data /data/train "
        "--config calibrated.json --params lora --steps 500 --out deit_s_tuned.pth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = t.add_argument_group("model")
    m.add_argument("--model", "-m", required=True, metavar="NAME",
                   help="timm model name (optionally with its pretrained tag, which also sets "
                   "the preprocessing), or an image tower built from a config: "
                   "open_clip:<config>, hf_clip:<shape>, hf_siglip:<shape>")
    m.add_argument("--weights", "--checkpoint", metavar="PATH", default=None,
                   help="local weights file (.npz, .safetensors, .pth/.pt/.bin)")
    m.add_argument("--pretrained", action="store_true",
                   help="timm models: hub weights (downloads)")
    m.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="timm models: classes of the head (default: the model's)")
    m.add_argument("--img-size", type=int, default=None, metavar="N",
                   help="input resolution (default: the model's)")
    m.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    m.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's)")

    d = t.add_argument_group("data (labels, when present, are not used)")
    d.add_argument("--data", "--data-dir", required=True, metavar="DIR",
                   help="a folder of images: labels.csv with the images (next to it or in "
                   "images/), class sub-folders (ImageFolder), or the image files themselves")
    d.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use the first N images only")
    d.add_argument("--workers", "-j", type=int, default=0, metavar="N",
                   help="data loading worker processes (default: 0, the main process)")
    d.add_argument("--no-augment", action="store_true",
                   help="no random crops and flips: the evaluation preprocessing")

    r = t.add_argument_group("reduction (the student): --config FILE or the options")
    add_reduction_args(r, many=False, visual=False, setting=False)  # with --config FILE

    o = t.add_argument_group("tuning")
    o.add_argument("--params", choices=PARAMS, default="norms-biases",
                   help="what is trained: norm and bias parameters, LoRA adapters merged back "
                   "at the end (needs peft: pip install 'vlprune[tune]'), or all parameters "
                   "(default: norms-biases)")
    o.add_argument("--steps", type=int, default=300, metavar="N",
                   help="optimizer steps (default: 300)")
    o.add_argument("--batch-size", "-b", type=int, default=32, metavar="N",
                   help="images per step (default: 32)")
    o.add_argument("--lr", type=_positive_float, default=None,
                   help="AdamW learning rate (default: 1e-4; 1e-5 with --params all)")
    o.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay (default: 0)")
    o.add_argument("--temperature", "-T", type=_positive_float, default=1.0,
                   help="softmax temperature of the KL loss (default: 1)")
    o.add_argument("--loss", choices=LOSSES, default="auto",
                   help="auto: kl for classifiers, cosine for image towers (default: auto)")
    o.add_argument("--teacher", choices=TEACHERS, default="frozen-copy",
                   help="frozen-copy: the weights before tuning (a copy of what is trained; "
                   "none for lora); shared: the current weights, no copy, drifts as they "
                   "train (default: frozen-copy)")
    o.add_argument("--lora-rank", type=int, default=8, metavar="R",
                   help="rank of the LoRA adapters (default: 8)")
    o.add_argument("--lora-alpha", type=_positive_float, default=None,
                   help="LoRA scale alpha (default: 2 x rank)")
    o.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma-separated nn.Linear module names or name endings, e.g. "
                   "qkv,fc1,fc2 (default: every linear layer outside nn.MultiheadAttention)")
    o.add_argument("--seed", type=int, default=0, help="shuffling and augmentation (default: 0)")

    out = t.add_argument_group("output")
    out.add_argument("--out", "-o", required=True, metavar="CKPT",
                     help=f"the tuned state_dict ({', '.join(SAVE_SUFFIXES)})")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd)


def config_from_args(args: argparse.Namespace) -> ReductionConfig:
    """The student's settings: ``--config`` or the reduction options (one value each)."""
    prune = prune_options(args)
    flags = bool(args.merge_r or args.prune_keep)
    if args.config is not None:
        if flags:
            raise UsageError("give --config FILE or the reduction options (--merge-r, "
                             "--prune-keep ...), not both")
        return args.config
    if not flags:
        raise UsageError("give the reduction to tune for: --config FILE, --merge-r R and/or "
                         "--prune-keep K")
    if len(args.merge_r or []) > 1 or len(args.prune_keep or []) > 1:
        raise UsageError("tune takes one --merge-r and one --prune-keep value")
    kw: dict[str, Any] = dict(prune_keep=args.prune_keep[0], **prune) if args.prune_keep else {}
    if args.merge_r:
        kw["merge_r"] = args.merge_r[0]
    try:
        return ReductionConfig(**kw)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd(args: argparse.Namespace) -> int:
    """``vlprune tune``: check the options, build and patch the model, tune, save."""
    from ..eval.sweep import progress_bar
    from ..tune import training_transform

    for name in ("steps", "batch_size", "limit", "lora_rank", "threads", "num_classes",
                 "img_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.pretrained and args.weights:
        raise UsageError("give --pretrained (hub weights) or --weights FILE, not both")
    if Path(args.out).suffix.lower() not in SAVE_SUFFIXES:
        raise UsageError(f"--out {args.out}: unknown suffix; allowed: {', '.join(SAVE_SUFFIXES)}")
    if args.params != "lora" and (args.lora_targets or args.lora_alpha is not None
                                  or args.lora_rank != 8):
        raise UsageError("--lora-rank / --lora-alpha / --lora-targets need --params lora")
    if args.params == "lora":
        try:
            import peft  # noqa: F401
        except ImportError as e:
            raise RunError("--params lora needs peft: pip install 'vlprune[tune]'") from e
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} given but CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    if config.is_identity:
        raise UsageError(f"the settings reduce no tokens ({config.to_dict()}): nothing to tune")
    data_dir = Path(args.data)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data folder not found: {data_dir}")

    model = image_model_from_args(args, "tune")
    patch(model, config)
    if args.weights is None and not args.pretrained:
        warnings.warn(f"{args.model} has random weights (no --weights or --pretrained)",
                      stacklevel=1)
    images = open_images(data_dir, training_transform(model, augment=not args.no_augment),
                               limit=args.limit)
    targets = [s for s in args.lora_targets.split(",") if s.strip()] if args.lora_targets else None
    lora = dict(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=targets) \
        if args.params == "lora" else {}
    print(f"tuning {args.model} ({args.params}, teacher {args.teacher}) on {len(images)} "
          f"images of {data_dir}: {args.steps} steps of {args.batch_size} on {device}",
          file=sys.stderr)
    with progress_bar(args.steps, not args.no_progress, "tune", unit="step") as bar:
        def show(info: TuneStep) -> None:
            bar.update(1)
            postfix = getattr(bar, "set_postfix", None)
            if postfix is not None:
                postfix(loss=f"{info.loss:.4f}", refresh=False)

        result = tune(
            model, images, steps=args.steps, params=args.params, lr=args.lr,
            batch_size=args.batch_size, temperature=args.temperature, loss=args.loss,
            teacher=args.teacher, weight_decay=args.weight_decay, device=device,
            num_workers=args.workers, seed=args.seed, callback=show, **lora,
        )
    path = result.save(args.out)
    k = max(1, len(result.losses) // 10)
    first = sum(result.losses[:k]) / k
    last = sum(result.losses[-k:]) / k
    print(f"{result.loss} loss {first:.4f} -> {last:.4f} (mean of the first and last {k} "
          f"step{'s' if k > 1 else ''}); {len(result.tuned)} tensors tuned "
          f"({result.num_trained} values trained); skipped {len(result.skipped)} images")
    print(f"wrote {path} (load it into the unpatched model, then patch it with the same "
          "settings)", file=sys.stderr)
    print("--result")
    print(json.dumps({
        "model": args.model, "params": args.params, "teacher": args.teacher,
        "loss": result.loss, "steps": args.steps, "images": len(images),
        "loss_first": round(first, 6), "loss_last": round(last, 6),
        "tuned_tensors": len(result.tuned), "trained_values": result.num_trained,
        "skipped": len(result.skipped), "config": config.to_dict(), "out": str(path),
    }))
    return 0


