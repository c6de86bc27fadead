"""Throughput of vlprune's ``merge_r`` beside the original ToMe at equal r, in one process.

    python benchmarks/tome_speed.py --tome /path/to/ToMe --model vit_tiny_patch16_224 \
        --malloc tuned --rounds 12 --json docs/results/tome_speed_vit_tiny.json

``--tome`` is a local checkout of https://github.com/facebookresearch/ToMe (or an export of
it, then give ``--tome-commit``); its ``tome`` package is imported from there, nothing of it is
part of vlprune. One timm model (random weights: speed does not depend on them) is copied
three times: unchanged, patched by ToMe (``tome.patch.timm(model); model.r = r``) and patched
by vlprune (``vlprune.patch(model, merge_r=r)``). Every setting runs on the same input batch,
interleaved round by round (unpatched, ToMe r=8, vlprune r=8, ToMe r=13, ...), one untimed
call after each switch, so machine noise hits both implementations alike.

Reported per row: median ms per batch and its spread (interquartile range / median), images
per second, speedup over the unpatched model, the FLOPs ratio (each implementation's own
count at batch 1) and efficiency = speedup / FLOPs ratio; for vlprune rows also its
throughput over ToMe's at the same r (ratio of medians) with the interquartile range of the
per-call ratios (call i of ToMe against call i of vlprune, same round). The allocator, the
thread count and the CPU share other processes took during the timed rounds are printed and
stored; ``--malloc tuned`` restarts the script with glibc told to keep freed memory
(``vlprune.eval.machine.TUNED_MALLOC``), which makes CPU timings steadier.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import vlprune
from vlprune.eval.bench import spread_pct, time_interleaved
from vlprune.eval.flops import count_flops
from vlprune.eval.machine import TUNED_MALLOC, OtherLoad, environment, load_warning
from vlprune.eval.sweep import progress_bar

TOME_URL = "https://github.com/facebookresearch/ToMe"


def import_tome(checkout: Path):
    """The reference ``tome`` package, imported from ``checkout`` (and only from there)."""
    if not (checkout / "tome" / "__init__.py").is_file():
        raise SystemExit(f"{checkout} holds no tome/ package: give a checkout of {TOME_URL}")
    sys.path.insert(0, str(checkout.resolve()))
    import tome

    if checkout.resolve() not in Path(tome.__file__).resolve().parents:
        raise SystemExit(f"imported tome from {tome.__file__}, not from {checkout}")
    return tome


def tome_commit(checkout: Path, given: str | None) -> str:
    if given:
        return given
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True,
                             capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"{checkout} is not a git work tree: pass --tome-commit") from None
    return out.stdout.strip()


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def measure(args: argparse.Namespace, tome) -> dict:
    import timm

    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    ref = copy.deepcopy(base)
    tome.patch.timm(ref)  # ToMe's defaults: prop_attn=True, trace_source=False
    ours = vlprune.patch(copy.deepcopy(base), merge_r=0)
    x = torch.randn(args.batch_size, *base.patch_embed.proj.weight.shape[1:2],
                    *base.patch_embed.img_size)
    x1 = x[:1]

    def set_tome(r: int) -> None:
        ref.r = r

    def set_ours(r: int) -> None:
        vlprune.configure(ours, merge_r=r)

    steps, flops = [("unpatched", lambda: None, lambda: base(x))], {}
    with torch.inference_mode():
        flops["unpatched"] = count_flops(lambda: base(x1))
        for r in args.r:
            set_tome(r)
            flops[f"ToMe r={r}"] = count_flops(lambda: ref(x1))
            set_ours(r)
            flops[f"vlprune r={r}"] = count_flops(lambda: ours(x1))
            steps.append((f"ToMe r={r}", lambda r=r: set_tome(r), lambda: ref(x)))
            steps.append((f"vlprune r={r}", lambda r=r: set_ours(r), lambda: ours(x)))

        warning = load_warning()
        if warning:
            print(f"WARNING: {warning}", file=sys.stderr)
        bar = progress_bar((args.warmup + args.rounds) * len(steps), not args.no_progress,
                           f"{args.model} b{args.batch_size}", "run")
        with OtherLoad() as load:
            times = time_interleaved(steps, rounds=args.rounds, iters=args.iters,
                                     warmup=args.warmup, bar=bar)
        bar.close()

    base_ms = statistics.median(times["unpatched"])
    rows = []
    for label, _, _ in steps:
        ms = statistics.median(times[label])
        ratio = flops["unpatched"] / flops[label]
        row = {
            "setting": label,
            "ms_per_batch": ms,
            "spread_pct": spread_pct(times[label]),
            "img_per_s": args.batch_size / ms * 1e3,
            "speedup": base_ms / ms,
            "gflops_per_img": flops[label] / 1e9,
            "flops_ratio": ratio,
            "efficiency": base_ms / ms / ratio,
            "times_ms": times[label],
        }
        if label.startswith("vlprune"):
            ref_times = times["ToMe" + label[len("vlprune"):]]
            pairs = [t_ref / t for t_ref, t in zip(ref_times, times[label])]
            row["vs_tome"] = statistics.median(ref_times) / ms
            row["vs_tome_iqr"] = quartiles(pairs)
        rows.append(row)
    return {
        "model": args.model,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "iters": args.iters,
        "threads": torch.get_num_threads(),
        "other_cpu": load.share,
        "warnings": [w for w in (warning, load.warning) if w],
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"{result['model']}  batch {result['batch_size']}  threads {result['threads']}  "
        f"allocator {result['env']['allocator']}  {result['rounds']} rounds x "
        f"{result['iters']} timed calls  other processes: "
        + ("?" if result["other_cpu"] is None else f"{result['other_cpu']:.0%} CPU"),
        "",
        "| setting | ms/batch (spread) | img/s | speedup | FLOPs ratio | efficiency "
        "| x ToMe (IQR) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        vs = "" if "vs_tome" not in r else (
            f"{r['vs_tome']:.3f} ({r['vs_tome_iqr'][0]:.3f}-{r['vs_tome_iqr'][1]:.3f})")
        lines.append(
            f"| {r['setting']} | {r['ms_per_batch']:.1f} ({r['spread_pct']:.1f}%) "
            f"| {r['img_per_s']:.1f} | {r['speedup']:.3f} | {r['flops_ratio']:.3f} "
            f"| {r['efficiency']:.3f} | {vs} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tome", type=Path, required=True, help="checkout of facebookresearch/ToMe")
    ap.add_argument("--tome-commit", default=None, help="when --tome is not a git work tree")
    ap.add_argument("--model", default="vit_tiny_patch16_224", help="a timm ViT name")
    ap.add_argument("--r", type=int, nargs="+", default=[8, 13, 16], help="ToMe's r values")
    ap.add_argument("--batch-size", "-b", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--iters", type=int, default=1, help="timed calls per setting and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--malloc", choices=("default", "tuned"), default="default",
                    help="tuned: rerun with glibc keeping freed memory (steadier timings)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    args = ap.parse_args()
    if min(args.batch_size, args.rounds, args.iters) < 1 or args.warmup < 0:
        raise SystemExit("--batch-size, --rounds and --iters must be >= 1, --warmup >= 0")
    if any(r < 0 for r in args.r):
        raise SystemExit(f"--r {args.r}: r is the tokens merged per layer, >= 0")
    if args.malloc == "tuned" and any(os.environ.get(k) != v for k, v in TUNED_MALLOC.items()):
        # glibc reads these once, at start: restart with them set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC})
    if args.threads:
        torch.set_num_threads(args.threads)
    tome = import_tome(args.tome)
    commit = tome_commit(args.tome, args.tome_commit)
    result = measure(args, tome)
    result["env"] = environment()
    result["reference"] = {"repository": TOME_URL, "commit": commit}
    result["command"] = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    print(table(result))
    for w in result["warnings"]:
        print(f"WARNING: {w}", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
