"""Budgets on real weights, scored on images nobody tuned on.

ViT-Ti (augreg_in21k_ft_in1k) and the 500-image ImageNet sample of the shared assets, split
by class: the images of classes 0, 4, 8, ... (250) calibrate and tune, those of classes 2,
6, 10, ... (250) are scored. For each FLOPs budget: top-1 on the scored half of merging alone
(ToMe ``merge_r`` fitted to the budget), of the calibrated setting, and (``--tune``) of the
calibrated setting after ``vlprune.tune`` with each parameter set; with the CPU time each
took. Labels are read only to score.

    python benchmarks/calibrate_report.py --budgets 0.75,0.6,0.5 \\
        --tune norms-biases,lora,all --tune-budget 0.5 --tune-steps 60 \\
        --json docs/results/calibrate_vit_tiny.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

import vlprune
from vlprune.calibration import search
from vlprune.eval.image_data import load_eval_tensors
from vlprune.eval.imagenet import build_classifier
from vlprune.eval.machine import environment

NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def assets() -> Path:
    root = os.environ.get("VLPRUNE_ASSETS") or Path(__file__).resolve().parents[2] / "shared" / "assets"
    root = Path(root)
    if not (root / "imagenet-sample").is_dir():
        sys.exit(f"shared assets not found at {root}; set VLPRUNE_ASSETS")
    return root


def scores(model, x, y, ref):
    """top-1 (percent), agreement with the unpatched model (percent), KL to it."""
    with torch.inference_mode():
        out = torch.cat([model(x[i:i + 50]) for i in range(0, len(x), 50)]).double()
    top1 = 100 * float((out.argmax(-1) == y).double().mean())
    if ref is None:
        return {"top1": top1}, out
    p = ref.log_softmax(-1)
    kl = float((p.exp() * (p - out.log_softmax(-1))).sum(-1).mean())
    agree = 100 * float((out.argmax(-1) == ref.argmax(-1)).double().mean())
    return {"top1": top1, "agreement": agree, "kl": kl}, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="0.75,0.6,0.5")
    ap.add_argument("--objective", default="divergence", choices=("divergence", "agreement"))
    ap.add_argument("--screen", type=int, default=64)
    ap.add_argument("--finalists", type=int, default=6)
    ap.add_argument("--tune", default="", help="parameter sets to tune, e.g. norms-biases,lora")
    ap.add_argument("--tune-budget", type=float, default=0.5)
    ap.add_argument("--tune-steps", type=int, default=60)
    ap.add_argument("--tune-lr", type=float, default=None)
    ap.add_argument("--tune-batch-size", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    root = assets()
    weights = root / NAME / f"{NAME}.npz"
    model = build_classifier(NAME, weights=weights)
    x, y = load_eval_tensors(root / "imagenet-sample", model)
    cal = (y % 4) == 0
    held = ~cal
    xc, xh, yh = x[cal], x[held], y[held]
    print(f"calibrate/tune on {int(cal.sum())} images (classes 0, 4, 8, ...), score on "
          f"{int(held.sum())} (classes 2, 6, 10, ...)", flush=True)
    base, ref = scores(model, xh, yh, None)
    print(f"unpatched: top-1 {base['top1']:.1f}", flush=True)
    rows = []

    def row(budget, method, cfg, seconds, flops_ratio, m=None):
        m = m or model
        vlprune.patch(m, cfg)
        s, _ = scores(m, xh, yh, ref)
        vlprune.unpatch(m)
        r = {"budget": budget, "method": method, "config": cfg.to_dict(),
             "flops_ratio": flops_ratio, "top1": s["top1"], "delta": s["top1"] - base["top1"],
             "agreement": s["agreement"], "kl": s["kl"], "cpu_seconds": seconds}
        rows.append(r)
        print(f"flops {budget:g}  {method:28s} top-1 {r['top1']:.1f} ({r['delta']:+.1f})  "
              f"agree {r['agreement']:.1f}%  KL {r['kl']:.4f}  FLOPs {flops_ratio:.3f}  "
              f"{seconds:.0f} s  {json.dumps(r['config'])}", flush=True)

    calibrated = {}
    for budget in [float(b) for b in args.budgets.split(",")]:
        t0 = time.process_time()
        result = search(model, xc, flops=budget, objective=args.objective, screen=args.screen,
                        finalists=args.finalists, progress=False)
        secs = time.process_time() - t0
        mo = result.merge_only
        row(budget, "merge_r alone", vlprune.ReductionConfig(**mo.settings), 0.0, mo.flops_ratio)
        row(budget, "calibrated", result.config, secs, result.flops_ratio)
        calibrated[budget] = result

    for params in [p for p in args.tune.split(",") if p]:
        result = calibrated.get(args.tune_budget)
        if result is None:
            sys.exit(f"--tune-budget {args.tune_budget} is not one of --budgets")
        student = copy.deepcopy(model)
        vlprune.patch(student, result.config)
        t0 = time.process_time()
        tuned = vlprune.tune(student, xc, steps=args.tune_steps, params=params,
                             lr=args.tune_lr, batch_size=args.tune_batch_size)
        secs = time.process_time() - t0
        vlprune.unpatch(student)
        student.load_state_dict(tuned.state_dict)
        row(args.tune_budget, f"calibrated + tune {params}", result.config, secs,
            result.flops_ratio, m=student)
        rows[-1]["tune"] = {"steps": args.tune_steps, "lr": args.tune_lr,
                            "batch_size": args.tune_batch_size,
                            "loss_first": tuned.losses[0], "loss_last": tuned.losses[-1]}

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "model": NAME, "unpatched_top1": base["top1"], "images_calibrate": int(cal.sum()),
            "images_scored": int(held.sum()), "split": "class index % 4 == 0 calibrates; == 2 scores",
            "objective": args.objective, "screen": args.screen, "finalists": args.finalists,
            "rows": rows, "env": environment(), "command": " ".join(sys.argv),
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
