"""``vlprune eval imagenet``: its options, their checks, and the run around
:func:`vlprune.eval.imagenet.eval_imagenet` (model and data from the options, a line per
finished setting, the final table and the ``--result`` JSON)."""

from __future__ import annotations

import argparse
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..eval.distributed import DistContext, init_distributed
from ..eval.image_data import (
    check_labels,
    default_workers,
    eval_transform,
    resolve_eval_config,
)
from ..eval.imagenet import build_classifier, eval_imagenet, num_classes_of, open_dataset
from ..eval.sweep import Setting, output_paths, slug
from .args import (
    RunError,
    UsageError,
    add_reduction_args,
    eval_settings_from_args,
    load_weights_arg,
    parse_dtype,
    parse_named_setting,
    print_sweep_result,
)


def cmd(args: argparse.Namespace) -> int:
    """``vlprune eval imagenet``: check the options, then :func:`run`."""
    if args.data is None and not args.dataset:
        raise UsageError("give --data DIR (an ImageFolder tree or a "
                         "folder with labels.csv) or --dataset NAME (a timm dataset)")
    if args.pretrained and args.weights:
        raise UsageError("give --pretrained (hub weights) or --weights FILE, not both")
    for name in ("batch_size", "limit", "num_classes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    settings, methods = eval_settings_from_args(args, default_merge=EVAL_DEFAULT_MERGE)
    return run(args, settings, methods)


#: the merge rows of ``vlprune eval imagenet`` when no setting is given
EVAL_DEFAULT_MERGE = [8, 16]


def add_parser(esub: argparse._SubParsersAction) -> None:
    """Add ``imagenet`` to the ``eval`` subcommands."""
    i = esub.add_parser(
        "imagenet", help="top-1/top-5, agreement, img/s, GFLOPs and memory per setting",
        description=textwrap.fill(
            "ImageNet-style validation of a timm classifier, unpatched and with each "
            "reduction setting: top-1, top-5, agreement with the unpatched model's "
            "predictions, img/s, GFLOPs/img, peak memory and tokens at the last layer; CSV, "
            "JSON and a speed-accuracy plot, rewritten after every setting. Runs under "
            "`accelerate launch` (data split across processes, results identical to one "
            "process).", 88),
        epilog="examples:\n"
        "  vlprune eval imagenet --model vit_tiny_patch16_224 --weights vit_ti.npz "
        "--data imagenet-sample --merge-r 0,8,16\n"
        "  vlprune eval imagenet --model deit_small_patch16_224 --pretrained --data "
        "/data/imagenet/val --merge-r 8,16 --prune-keep 0.7,0.5 --prune-layers 3,6,9 "
        '--setting "name=hybrid prune_keep=0.7 prune_layers=3 merge_r=8"\n'
        "  accelerate launch --num_processes 4 -m vlprune.cli eval imagenet ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = i.add_argument_group("data")
    g.add_argument("--data", "--data-dir", metavar="DIR", default=None,
                   help="path to the images: an ImageFolder tree (class folders, in sorted order "
                   "= class index) or a folder with labels.csv (filename,class_index; images "
                   "next to it or in images/); the root of --dataset when given")
    g.add_argument("--dataset", "-d", metavar="NAME", default=None,
                   help='timm dataset type + name ("<type>/<name>", e.g. hfds/imagenet-1k, '
                   "torch/imagenet) (default: the --data folder)")
    g.add_argument("--split", metavar="NAME", default="validation",
                   help="dataset split of --dataset (default: validation)")
    g.add_argument("--dataset-download", action="store_true",
                   help="allow --dataset to download (torch/ datasets)")
    g.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate the first N images only (a tree: round-robin over classes)")
    g.add_argument("--strict", action="store_true",
                   help="fail on a missing or unreadable image (default: skip it and count it "
                   "in the 'skipped' column)")
    g.add_argument("--preload", choices=("auto", "yes", "no"), default="auto",
                   help="decode the images once into memory and reuse them for every setting; "
                   "auto: when a process's images take at most 4 GiB (default: auto)")
    g.add_argument("--workers", "-j", type=int, default=default_workers(), metavar="N",
                   help="data loading worker processes, 0: load in the main process "
                   f"(default: 4, at most the CPUs available: {default_workers()} here)")
    g.add_argument("--img-size", type=int, default=None, metavar="N",
                   help="input image dimension, uses model default if empty")
    g.add_argument("--crop-pct", type=float, default=None, metavar="PCT",
                   help="input image center crop pct (default: the model's)")
    g.add_argument("--interpolation", default=None, metavar="NAME",
                   help="image resize interpolation type (overrides model)")
    g.add_argument("--mean", type=float, nargs=3, default=None, metavar="MEAN",
                   help="override mean pixel value of dataset")
    g.add_argument("--std", type=float, nargs=3, default=None, metavar="STD",
                   help="override std deviation of dataset")

    m = i.add_argument_group("model")
    m.add_argument("--model", "-m", required=True, metavar="NAME",
                   help="timm model name, optionally with its pretrained tag (e.g. "
                   "vit_tiny_patch16_224.augreg_in21k_ft_in1k), which also sets the "
                   "preprocessing")
    m.add_argument("--pretrained", action="store_true",
                   help="use pre-trained model (downloads from the hub)")
    m.add_argument("--weights", "--checkpoint", metavar="PATH", default=None,
                   help="local weights file (.npz timm or big_vision, .safetensors, "
                   ".pth/.pt/.bin read with weights_only=True)")
    m.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="number classes in dataset (default: the model's)")
    m.add_argument("--batch-size", "-b", type=int, default=50, metavar="N",
                   help="mini-batch size (default: 50)")
    m.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda when available; under a "
                   "launcher each process takes its own GPU)")
    m.add_argument("--dtype", type=parse_dtype, default=torch.float32,
                   help="float32, float16, bfloat16 (default: float32)")
    m.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads per process (default: torch's)")

    r = i.add_argument_group("settings (the unpatched model is always evaluated first)")
    add_reduction_args(r, many=True, visual=False, setting=False)
    r.add_argument("--setting", action="append", type=parse_named_setting, default=[],
                   metavar='"[name=NAME] KEY=VALUE ..."',
                   help="one more row from ReductionConfig fields, e.g. "
                   '"name=hybrid prune_keep=0.7 prune_layers=3 merge_r=8"; rows with the '
                   "same name form one curve in the plot; repeatable (default when no "
                   f"setting is given: --merge-r {','.join(map(str, EVAL_DEFAULT_MERGE))})")

    o = i.add_argument_group("output")
    o.add_argument("--output", "-o", metavar="PREFIX", default=None,
                   help="write PREFIX.csv, PREFIX.json and PREFIX.png (default: "
                   "results/eval_imagenet_<model>)")
    o.add_argument("--csv", metavar="PATH", default=None, help="CSV path (overrides --output)")
    o.add_argument("--json", metavar="PATH", default=None, help="JSON path (overrides --output)")
    o.add_argument("--plot", metavar="PATH", default=None, help="PNG path (overrides --output)")
    o.add_argument("--no-plot", action="store_true", help="no PNG")
    o.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    i.set_defaults(func=cmd)


def _row_line(row: Mapping[str, Any]) -> str:
    def f(key: str, fmt: str, unit: str = "") -> str:
        v = row.get(key)
        return "-" if v is None else f"{format(v, fmt)}{unit}"

    return (f"{row['setting']}: top-1 {f('top1', '.2f')} ({f('delta_top1', '+.2f')})  "
            f"top-5 {f('top5', '.2f')}  agreement {f('agreement', '.1f', '%')}  "
            f"{f('gflops_per_img', '.3f')} GFLOPs/img  {f('img_per_s', '.1f')} img/s  "
            f"tokens {f('tokens_final', 'd')}  skipped {row.get('skipped', 0)}")


TABLE = (("setting", "setting", ""), ("top1", "top-1", ".2f"), ("delta_top1", "delta", "+.2f"),
         ("top5", "top-5", ".2f"), ("agreement", "agree %", ".1f"),
         ("gflops_per_img", "GFLOPs", ".3f"), ("flops_ratio", "FLOPs x", ".2f"),
         ("img_per_s", "img/s", ".1f"), ("speedup", "speedup", ".2f"),
         ("tokens_final", "tokens", "d"), ("peak_mem_mb", "peak MB", ".1f"),
         ("n", "n", "d"), ("skipped", "skipped", "d"))


def _title(model: str, weights: str, data: Any, images: int, ctx: DistContext,
           dtype: torch.dtype) -> str:
    where = f"{ctx.world_size} processes" if ctx.distributed else "1 process"
    n = torch.get_num_threads()
    threads = f", {n} thread{'s' if n > 1 else ''}" if ctx.device.type == "cpu" else ""
    return (f"{model} ({Path(weights).name}) on {Path(str(data)).name}: {images} images; "
            f"{ctx.device.type} {str(dtype).replace('torch.', '')}, {where}{threads}")


def run(args: Any, settings: Sequence[Setting], methods: Mapping[str, str]) -> int:
    """``vlprune eval imagenet`` after argument parsing and the checks of :func:`cmd`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    try:
        model = build_classifier(args.model, pretrained=args.pretrained,
                                 num_classes=args.num_classes, img_size=args.img_size)
    except RuntimeError as e:  # no hub, no timm
        raise RunError(str(e)) from e
    if args.weights is not None:
        load_weights_arg(model, args.weights)
    override: dict[str, Any] = {}
    if args.img_size:
        override["input_size"] = (3, args.img_size, args.img_size)
    for key in ("crop_pct", "interpolation", "mean", "std"):
        if getattr(args, key) is not None:
            override[key] = tuple(getattr(args, key)) if key in ("mean", "std") else getattr(args, key)
    data_cfg = resolve_eval_config(model, override)
    try:
        dataset = open_dataset(args.data, eval_transform(model, override), dataset=args.dataset,
                               split=args.split, limit=args.limit, download=args.dataset_download)
    except RuntimeError as e:  # a timm dataset that cannot be opened here
        raise RunError(str(e)) from e
    check_labels(dataset, num_classes_of(model), model_name=args.model)
    if not args.pretrained and args.weights is None and ctx.is_main:
        warnings.warn(f"{args.model} has random weights (no --weights or --pretrained): "
                      "accuracy will be at chance level", stacklevel=1)
    model = model.to(ctx.device, args.dtype)

    prefix = args.output or f"results/eval_imagenet_{slug(args.model)}"
    paths = output_paths(prefix, csv=args.csv, json=args.json, plot=args.plot)
    if args.no_plot:
        paths.plot = None
    meta = {
        "model": args.model,
        "weights": str(args.weights) if args.weights else ("hub" if args.pretrained else "random"),
        "num_classes": num_classes_of(model),
        "data": None if args.data is None else str(args.data),
        "dataset": args.dataset,
        "split": args.split if args.dataset else None,
        "limit": args.limit,
        "input_size": list(data_cfg["input_size"]),
        "interpolation": data_cfg["interpolation"],
        "crop_pct": data_cfg["crop_pct"],
        "mean": list(data_cfg["mean"]),
        "std": list(data_cfg["std"]),
    }

    def show(row: dict[str, Any]) -> None:
        if ctx.is_main:
            print(_row_line(row), flush=True)

    preload = {"auto": "auto", "yes": True, "no": False}[args.preload]
    sweep = eval_imagenet(
        model, dataset, settings, ctx=ctx, paths=paths, meta=meta, methods=methods,
        batch_size=args.batch_size, num_workers=args.workers, preload=preload,
        measure_memory=not args.no_memory, strict=args.strict, progress=not args.no_progress,
        input_size=tuple(data_cfg["input_size"]),
        title=_title(args.model, meta["weights"], args.dataset or args.data, len(dataset),
                     ctx, args.dtype),
        on_row=show,
    )
    if ctx.is_main:
        print_sweep_result(sweep, TABLE, paths, {"model": args.model, "images": len(dataset)},
                           ("top1", "top5", "agreement", "img_per_s", "gflops_per_img", "n",
                            "skipped"))
    ctx.close()
    return 0
