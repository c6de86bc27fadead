"""``vlprune bench``: throughput, FLOPs and memory of reduction settings on a named model
(:func:`vlprune.eval.bench.run_bench`; ``llava:``, ``qwen2.5-vl:``, ``qwen3-vl:`` and
``internvl:`` models: prefill and decode,
:func:`vlprune.eval.vlm_bench.run_vlm_bench`)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..eval.bench import run_bench
from ..eval.vlm_bench import run_vlm_bench
from ..models import is_llava, is_vlm, vlm_module
from .args import (
    RunError,
    UsageError,
    add_model_args,
    add_reduction_args,
    model_from_args,
    parse_batch_list,
    settings_from_args,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the top-level subcommands."""
    b = sub.add_parser("bench", help="throughput, FLOPs and memory of reduction settings",
                       description="Benchmark an unpatched model against reduction settings, "
                       "interleaved, with medians, speedup and efficiency (speedup / FLOPs ratio). "
                       "On vision-language models (llava:, qwen2.5-vl:, qwen3-vl:, internvl:): prefill latency and FLOPs, decode tokens/s and the "
                       "visual tokens reaching the language model (and its last layer) per "
                       "visual_keep / llm_keep setting, at one or several batch sizes.")
    add_model_args(b)
    add_reduction_args(b, many=True)
    b.add_argument("--batch-size", "-b", type=parse_batch_list, default=None,
                   help="default: 32; 1 for vision-language models, which also take a list (e.g. 1,8: "
                   "rows per batch size)")
    b.add_argument("--text-tokens", type=int, default=None,
                   help="VLMs: text tokens of the longest prompt (default 40); rows of a batch "
                   "are 3 tokens shorter each, left padded")
    b.add_argument("--new-tokens", type=int, default=None,
                   help="VLMs: tokens generated per timed call (default 8): the prefill gives the "
                   "first, the decode timing covers the others; 0 or 1: prefill only")
    b.add_argument("--rounds", type=int, default=5, help="timed rounds over all settings")
    b.add_argument("--iters", type=int, default=2, help="timed calls per setting and round")
    b.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    b.add_argument("--no-progress", action="store_true",
                   help="no progress bar, and no table lines while the run fills them in")
    b.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    b.add_argument("--csv", metavar="PATH", help="write one CSV row per setting (and batch size)")
    b.add_argument("--plot", metavar="PATH", help="write a PNG of speedup against FLOPs reduction "
                   "(VLMs: prefill, one series per batch size)")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda given but CUDA is not available here")
    if args.plot:  # before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise RunError("--plot needs matplotlib: pip install 'vlprune[eval]'") from e
    vlm = is_vlm(args.model)
    if not vlm and (args.text_tokens is not None or args.new_tokens is not None):
        raise UsageError("--text-tokens / --new-tokens need a llava: model (or another "
                         "vision-language model)")
    batch_sizes = args.batch_size or [1 if vlm else 32]
    if not vlm and len(batch_sizes) > 1:
        raise UsageError(f"--batch-size {','.join(map(str, batch_sizes))}: a list of batch "
                         "sizes needs a vision-language model (llava:, qwen2.5-vl:, ...); give one batch size")
    if not vlm:
        default_visual, default_score = None, "cls_attn"
    elif is_llava(args.model):  # LLaVA-1.5's 576 tokens: FastV / SparseVLM's budgets
        default_visual, default_score = [192, 128, 64], "cls_attn"
    else:  # dynamic token counts: ratios; Qwen's towers have no class token
        default_visual = [0.25, 0.11]
        default_score = "attn" if args.model.startswith("qwen") else "cls_attn"
    settings = settings_from_args(args, default_merge=[0, 8, 16], default_visual=default_visual,
                                  default_score=default_score)
    model = model_from_args(args)
    if vlm:
        text_tokens = 40 if args.text_tokens is None else args.text_tokens
        inputs = None
        if not is_llava(args.model):  # the family's own prompts (dynamic image sizes, tiles)
            make = vlm_module(args.model).dummy_inputs
            inputs = lambda b: make(model, b, text_tokens, image_size=args.img_size)  # noqa: E731
        result = run_vlm_bench(
            model, settings, model_name=args.model, batch_size=batch_sizes, inputs=inputs,
            text_tokens=text_tokens,
            new_tokens=8 if args.new_tokens is None else args.new_tokens,
            rounds=args.rounds, iters=args.iters, warmup=args.warmup,
            measure_memory=not args.no_memory, progress=not args.no_progress,
        )
        write_outputs(result, args)
        batches = {
            str(b): {
                r.setting: {
                    "visual_tokens": r.visual_tokens,
                    "visual_tokens_last": r.visual_tokens_last,
                    "llm_tokens": r.llm_tokens,
                    "gflops_prefill": round(r.gflops_prefill, 2),
                    "prefill_ms": round(r.prefill_ms, 1),
                    "flops_ratio": round(r.flops_ratio, 3),
                    "speedup": round(r.speedup, 3),
                    "efficiency": round(r.efficiency, 3),
                    "decode_tok_s": None if r.decode_tok_s is None else round(r.decode_tok_s, 2),
                }
                for r in result.rows if r.batch_size == b
            }
            for b in result.batch_sizes
        }
        # "rows": the first batch size (as with one batch size); "batches": all of them
        rows = batches[str(result.batch_size)]
        print("--result")
        print(json.dumps({"model": result.model, "batch_size": result.batch_size,
                          "batch_sizes": result.batch_sizes, "rows": rows, "batches": batches}))
        return 0
    result = run_bench(
        model,
        settings,
        model_name=args.model if args.tower == "image" else f"{args.model} ({args.tower})",
        batch_size=batch_sizes[0],
        rounds=args.rounds,
        iters=args.iters,
        warmup=args.warmup,
        measure_memory=not args.no_memory,
        progress=not args.no_progress,
        live=None if args.no_progress else _live,
    )
    if not args.no_progress:
        print()
    write_outputs(result, args)
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


def _live(line: str) -> None:
    print(line, flush=True)


def write_outputs(result, args: argparse.Namespace) -> None:
    print(result.table())
    if result.load_warning:
        print(f"WARNING: {result.load_warning}", file=sys.stderr)
    if args.json:
        result.write_json(args.json)
    if args.csv:
        result.write_csv(args.csv)
    if args.plot:
        result.plot(args.plot)
