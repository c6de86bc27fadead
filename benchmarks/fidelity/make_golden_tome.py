"""Golden logits of the original ToMe implementation on real ViT-Ti/16 weights.

    python benchmarks/fidelity/make_golden_tome.py --tome /tmp/tome \
        --assets $VLPRUNE_ASSETS --out tests/golden/

``--tome`` is a checkout of https://github.com/facebookresearch/ToMe; its ``tome`` package is
imported from there (nothing of it is copied into this project). The script loads the
AugReg ViT-Ti/16 weights into timm, applies ToMe's own ``tome.patch.timm(model)``, sets
``model.r`` and classifies the first ``--images`` images of ``imagenet-sample/labels.csv``
(file names sorted) with timm's eval transform for the model. It writes

* ``tome_vit_ti.npz``: ``files`` (image file names), ``labels``, ``logits_unpatched`` and per
  r ``logits_r{r}`` (float32, images x 1000, one batch) and ``tokens_r{r}`` (tokens leaving
  the last block);
* ``tome_vit_ti.json``: where the numbers come from (reference repository and commit, timm
  and torch versions, the command, the adaptations to the reference).

It uses only timm, torch, numpy, PIL and the ToMe checkout: not vlprune.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from golden_assets import MODEL, git_commit, load_images, load_timm_model

REPO_URL = "https://github.com/facebookresearch/ToMe"


def import_tome(checkout: Path):
    """The reference ``tome`` package, imported from ``checkout``."""
    sys.path.insert(0, str(checkout.resolve()))
    import tome

    path = Path(tome.__file__).resolve()
    if checkout.resolve() not in path.parents:
        raise SystemExit(f"imported tome from {path}, not from {checkout}")
    return tome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tome", type=Path, required=True, help="checkout of facebookresearch/ToMe")
    ap.add_argument("--assets", type=Path, required=True, help="the shared assets folder")
    ap.add_argument("--out", type=Path, required=True, help="folder for the golden files")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--r", type=int, nargs="+", default=[0, 8, 16])
    ap.add_argument("--commit", default=None,
                    help="commit of the checkout when it is not a git work tree (e.g. an archive)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import timm

    tome = import_tome(args.tome)  # the reference implementation, from the checkout
    commit = args.commit or git_commit(args.tome)
    if commit is None:
        raise SystemExit(f"{args.tome} is not a git work tree: pass --commit")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, _ = load_timm_model(args.assets)
    files, images, labels = load_images(args.assets, model, args.images)

    with torch.no_grad():
        plain = model(images)
    tome.patch.timm(model)  # prop_attn=True, trace_source=False: the defaults
    out: dict[str, np.ndarray] = {
        "files": np.array(files),
        "labels": labels.numpy().astype(np.int64),
        "logits_unpatched": plain.float().numpy(),
    }
    summary = {}
    for r in args.r:
        model.r = r
        with torch.no_grad():
            logits = model(images).float()
        size = model._tome_info["size"]  # None when nothing merged
        tokens = int(size.shape[1]) if size is not None else model.patch_embed.num_patches + 1
        out[f"logits_r{r}"] = logits.numpy()
        out[f"tokens_r{r}"] = np.array(tokens, dtype=np.int64)
        top1 = logits.argmax(-1)
        summary[f"r{r}"] = {
            "tokens_out": tokens,
            "top1_correct": int((top1 == labels).sum()),
            "max_abs_diff_vs_unpatched": float((logits - plain).abs().max()),
        }
        print(f"r={r}: {tokens} tokens out, top-1 {summary[f'r{r}']['top1_correct']}/{len(files)}")

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "tome_vit_ti.npz", **out)
    meta = {
        "reference": {
            "repository": REPO_URL,
            "commit": commit,
            "imported_from": str(Path(tome.__file__).resolve().parent),
            "api": "tome.patch.timm(model) (prop_attn=True, trace_source=False), then model.r = r",
            "adaptations": [],
        },
        "model": MODEL,
        "weights": f"$VLPRUNE_ASSETS/{MODEL}/{MODEL}.npz, loaded with load_state_dict(strict=True)",
        "images": {
            "folder": "$VLPRUNE_ASSETS/imagenet-sample",
            "selection": f"first {len(files)} file names of labels.csv, sorted",
            "transform": "timm create_transform(**resolve_data_config({}, model=model)), eval",
        },
        "r": args.r,
        "logits": "logits_r{r}: model(images), all images in one batch, float32, CPU; "
                  "tokens_r{r}: tokens leaving the last block",
        "summary": summary,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
        },
        "command": "python benchmarks/fidelity/make_golden_tome.py --tome <ToMe checkout> "
                   "--assets $VLPRUNE_ASSETS --out tests/golden/"
                   + (f" --commit {args.commit}" if args.commit else ""),
        "argv": sys.argv[1:],
    }
    (args.out / "tome_vit_ti.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out / 'tome_vit_ti.npz'} and {args.out / 'tome_vit_ti.json'}")


if __name__ == "__main__":
    main()
