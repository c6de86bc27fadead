"""The ``vlprune`` command: ``bench`` and ``describe`` on timm models built without download.

    vlprune bench --model vit_base_patch16_224 --merge-r 0,8,16 --batch-size 32
    vlprune describe --model vit_tiny_patch16_224 --merge-r 16
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

DEFAULT_MODEL = "vit_base_patch16_224"


def parse_merge_list(text: str) -> list:
    """``"0,8,16"`` -> ``[0, 8, 16]``; an item ``R:INFLECT`` is ToMe's ``(r, inflection)``."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            if ":" in item:
                r, inflect = item.split(":", 1)
                out.append((int(r), float(inflect)))
            else:
                out.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad merge-r item {item!r}: use comma-separated ints, or R:INFLECTION (e.g. 16:0.5)"
            ) from None
    if not out:
        raise argparse.ArgumentTypeError("--merge-r needs at least one value")
    return out


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; allowed: {sorted(table)}")
    return table[name]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"timm model name, built with random weights (default: {DEFAULT_MODEL})")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--merge-r", type=parse_merge_list, default=None,
                   help="comma-separated ToMe r values, e.g. 0,8,16 or 16:0.5 for (r, inflection)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", type=_dtype, default=torch.float32, help="float32, float16, bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def build_model(name: str, img_size: int | None, device: str, dtype: torch.dtype):
    """A timm model with random weights (no download), in eval mode on ``device``/``dtype``."""
    try:
        import timm
    except ImportError as e:
        raise SystemExit("vlprune bench needs timm: pip install 'vlprune[timm]'") from e
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise SystemExit(f"unknown timm model {name!r}; similar names: {close}")
    kwargs = {"img_size": img_size} if img_size else {}
    model = timm.create_model(name, pretrained=False, **kwargs)
    return model.to(device=device, dtype=dtype).eval()


def cmd_bench(args: argparse.Namespace) -> int:
    from .eval.bench import Setting, run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available here")
    merge = args.merge_r if args.merge_r is not None else [0, 8, 16]
    settings = [Setting.merge(r) for r in merge]
    model = build_model(args.model, args.img_size, args.device, args.dtype)
    result = run_bench(
        model,
        settings,
        model_name=args.model,
        batch_size=args.batch_size,
        rounds=args.rounds,
        iters=args.iters,
        warmup=args.warmup,
        measure_memory=not args.no_memory,
        progress=not args.no_progress,
    )
    print(result.table())
    if result.load_warning:
        print(f"WARNING: {result.load_warning}", file=sys.stderr)
    if args.json:
        result.write_json(args.json)
    if args.csv:
        result.write_csv(args.csv)
    summary = {
        "model": result.model,
        "batch_size": result.batch_size,
        "rows": {
            r.setting: {
                "img_per_s": round(r.img_per_s, 2),
                "flops_ratio": round(r.flops_ratio, 3),
                "speedup": round(r.speedup, 3),
                "efficiency": round(r.efficiency, 3),
            }
            for r in result.rows
        },
    }
    print("--result")
    print(json.dumps(summary))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from .api import describe, patch

    model = build_model(args.model, args.img_size, args.device, args.dtype)
    merge = args.merge_r if args.merge_r is not None else [16]
    if len(merge) != 1:
        raise SystemExit("describe takes one --merge-r value")
    patch(model, merge_r=merge[0])
    d = describe(model)
    print(d)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(d.to_dict(), f, indent=2)
    return 0


def make_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vlprune", description="Training-free token reduction for vision transformers."
    )
    parser.add_argument("--version", action="version", version=f"vlprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="throughput, FLOPs and memory of reduction settings",
                       description="Benchmark an unpatched model against merge settings, "
                       "interleaved, with medians, speedup and efficiency (speedup / FLOPs ratio).")
    _add_model_args(b)
    b.add_argument("--batch-size", "-b", type=int, default=32)
    b.add_argument("--rounds", type=int, default=5, help="timed rounds over all settings")
    b.add_argument("--iters", type=int, default=2, help="timed calls per setting and round")
    b.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    b.add_argument("--csv", metavar="PATH", help="write one CSV row per setting")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("describe", help="tokens per layer and FLOPs of one setting")
    _add_model_args(d)
    d.add_argument("--json", metavar="PATH", help="write the description as JSON")
    d.set_defaults(func=cmd_describe)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "rounds", "iters"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:  # configuration errors: one line, no traceback
        from .adapters.base import UnsupportedModelError

        if isinstance(e, (ValueError, UnsupportedModelError)):
            print(f"vlprune: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
