"""The original ToMe and EViT code beside vlprune, on the same images in one process.

    python benchmarks/fidelity/side_by_side.py --tome /tmp/tome --evit /tmp/evit \
        --assets ../shared/assets --json docs/results/fidelity_side_by_side.json

``--tome`` / ``--evit`` are checkouts (or ``git archive`` exports, then give ``--tome-commit``
/ ``--evit-commit``) of https://github.com/facebookresearch/ToMe and
https://github.com/youweiliang/evit; their code is imported from there, nothing of it is part
of vlprune. Real AugReg ViT-Ti/16 weights classify the first ``--images`` images of
``imagenet-sample/labels.csv`` (file names sorted, timm's eval transform), in batches, with:

* timm's model unchanged (the reference for the drops);
* ToMe: ``tome.patch.timm(model); model.r = r`` beside ``vlprune.patch(model, merge_r=r)``;
* EViT: the reference ``EViT`` model (keep 0.7 at layers 3, 6, 9, ``fuse_token=True``) with
  the same weights beside ``vlprune.patch(model, prune_keep=0.7, prune_layers=(3, 6, 9),
  prune_fuse=True)``.

For each method and setting it reports the top-1 of both implementations, their change from
the unpatched model, the share of images where both predict the same class (agreement), and
the largest absolute logit difference. The images, batches, weights and thread count are
identical for every row; the JSON records the commits, versions and the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from golden_assets import MODEL, git_commit, load_images, load_timm_model
from make_golden_evit import KEEP, LAYERS, import_evit, reference_vit_ti
from make_golden_tome import import_tome

import vlprune
from vlprune.eval.sweep import progress_bar

TOME_URL = "https://github.com/facebookresearch/ToMe"
EVIT_URL = "https://github.com/youweiliang/evit"


def logits_of(model, images: torch.Tensor, batch: int, desc: str) -> torch.Tensor:
    """Logits (images x classes, float32) of ``model`` on ``images``, ``batch`` at a time."""
    out = []
    with torch.no_grad(), progress_bar((len(images) + batch - 1) // batch, desc=desc) as bar:
        for i in range(0, len(images), batch):
            out.append(model(images[i:i + batch]).float())
            bar.update(1)
    return torch.cat(out)


def compare(name: str, setting: str, ref: torch.Tensor, ours: torch.Tensor, labels: torch.Tensor,
            base_top1: float) -> dict:
    ref_pred, our_pred = ref.argmax(-1), ours.argmax(-1)
    ref_top1 = 100.0 * float((ref_pred == labels).float().mean())
    our_top1 = 100.0 * float((our_pred == labels).float().mean())
    return {
        "method": name,
        "setting": setting,
        "reference_top1": ref_top1,
        "ours_top1": our_top1,
        "reference_delta": ref_top1 - base_top1,
        "ours_delta": our_top1 - base_top1,
        "agreement": 100.0 * float((ref_pred == our_pred).float().mean()),
        "disagreeing_images": int((ref_pred != our_pred).sum()),
        "max_abs_logit_diff": float((ref - ours).abs().max()),
        # an exact tie in a ranking, broken differently, changes a whole token: count them
        "images_logit_diff_over_1e-3": int(((ref - ours).abs().amax(-1) > 1e-3).sum()),
    }


def markdown(rows: list[dict], base_top1: float, n: int) -> str:
    lines = [
        f"{n} images; unpatched top-1 {base_top1:.1f}",
        "",
        "| method | setting | reference top-1 (delta) | vlprune top-1 (delta) | agreement "
        "| max logit diff | images with diff > 1e-3 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['reference_top1']:.1f} ({r['reference_delta']:+.1f}) "
            f"| {r['ours_top1']:.1f} ({r['ours_delta']:+.1f}) | {r['agreement']:.1f} % "
            f"| {r['max_abs_logit_diff']:.1e} | {r['images_logit_diff_over_1e-3']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tome", type=Path, required=True, help="checkout of facebookresearch/ToMe")
    ap.add_argument("--evit", type=Path, required=True, help="checkout of youweiliang/evit")
    ap.add_argument("--assets", type=Path, required=True, help="the shared assets folder")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--r", type=int, nargs="+", default=[8, 13, 16], help="ToMe's r values")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tome-commit", default=None, help="when --tome is not a git work tree")
    ap.add_argument("--evit-commit", default=None, help="when --evit is not a git work tree")
    ap.add_argument("--json", type=Path, default=None, help="write the rows and provenance here")
    args = ap.parse_args()
    if args.images < 1 or args.batch < 1:
        raise SystemExit("--images and --batch must be at least 1")
    if not (args.assets / "imagenet-sample" / "labels.csv").is_file():
        raise SystemExit(f"{args.assets} has no imagenet-sample/labels.csv (the shared assets)")

    tome = import_tome(args.tome)
    evit = import_evit(args.evit)
    commits = {
        "tome": args.tome_commit or git_commit(args.tome),
        "evit": args.evit_commit or git_commit(args.evit),
    }
    for name, c in commits.items():
        if c is None:
            raise SystemExit(f"--{name} is not a git work tree: pass --{name}-commit")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    base, sd = load_timm_model(args.assets)
    files, images, labels = load_images(args.assets, base, args.images)
    plain = logits_of(base, images, args.batch, "unpatched")
    base_top1 = 100.0 * float((plain.argmax(-1) == labels).float().mean())
    rows = []

    ref_tome = copy.deepcopy(base)
    tome.patch.timm(ref_tome)  # prop_attn=True, trace_source=False: ToMe's defaults
    ours = vlprune.patch(copy.deepcopy(base), merge_r=0)
    for r in args.r:
        ref_tome.r = r
        a = logits_of(ref_tome, images, args.batch, f"ToMe r={r}")
        vlprune.configure(ours, merge_r=r)
        b = logits_of(ours, images, args.batch, f"vlprune merge_r={r}")
        rows.append(compare("ToMe", f"r={r}", a, b, labels, base_top1))

    a = logits_of(reference_vit_ti(evit, sd), images, args.batch, "EViT")
    ours_evit = vlprune.patch(copy.deepcopy(base), prune_keep=KEEP, prune_layers=LAYERS,
                              prune_fuse=True)
    b = logits_of(ours_evit, images, args.batch, "vlprune prune_fuse")
    rows.append(compare("EViT", f"keep {KEEP} @ {'/'.join(map(str, LAYERS))}, fuse",
                        a, b, labels, base_top1))

    print(markdown(rows, base_top1, len(files)))
    if args.json is not None:
        import timm

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": MODEL,
            "images": len(files),
            "first_image": files[0],
            "last_image": files[-1],
            "unpatched_top1": base_top1,
            "rows": rows,
            "references": {
                "tome": {"repository": TOME_URL, "commit": commits["tome"]},
                "evit": {"repository": EVIT_URL, "commit": commits["evit"]},
            },
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "timm": timm.__version__, "numpy": np.__version__,
                         "vlprune": vlprune.__version__},
            "threads": args.threads,
            "batch": args.batch,
            "seconds": round(time.perf_counter() - t0, 1),
            "command": "python benchmarks/fidelity/side_by_side.py " + " ".join(sys.argv[1:]),
        }, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
