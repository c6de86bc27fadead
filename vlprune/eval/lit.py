"""A real cross-modal test bed: ViT-Ti aligned to MiniLM, zero-shot on unseen classes, and
text-guided patch dropping against class-token attention and random dropping.

No CLIP weights exist offline, but two real encoders do: ViT-Ti/16 (ImageNet-1k, the shared
assets) and all-MiniLM-L6-v2 (extra ``test-weights``). The test bed aligns them LiT-style:
the text encoder stays locked, and a linear map ``W`` from the ViT's pooled feature to the
text space is fitted by ridge regression (centred, unit-norm image features; closed form)
to the MiniLM embeddings of the prompts ``"a photo of a {class name}"``.

The classes of the shared images are split into ``folds`` class-disjoint groups. For each
group the map is fitted without it (training pairs: the images of the other classes, and the
ViT classifier-head rows of every class outside the group, which live in the same feature
space), the ridge weight is chosen by class-disjoint cross-validation inside the training
classes, and the group's images are classified zero-shot among the group's prompts only.
Every image is thus scored once as an unseen class. The ViT backbone itself was trained on
all ImageNet-1k classes: "unseen" means unseen by the alignment, as in LiT.

Then the ViT is patched with pruning at equal budgets and the zero-shot evaluation is rerun:

* ``guided``: ``guide="text"``: tokens are ranked by the cosine of their feature, mapped by
  ``W``, with the best-matching candidate prompt (:func:`vlprune.set_guide` with
  ``project=``);
* ``cls_attn``: class-token attention (EViT);
* ``random``: random patches (mean over seeds).

Per setting: zero-shot top-1 / top-5, agreement with the unreduced predictions, the mean
cosine of the reduced image embedding with the unreduced one, and GFLOPs per image::

    python -m vlprune.eval.lit --json docs/results/lit_vit_ti_minilm.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..api import describe, patch, set_guide, unpatch
from . import text_embed
from .flops import count_model_flops

VIT = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
TEMPLATE = "a photo of a {}"
BUDGETS = (0.7, 0.5, 0.35)  # keep rate at each of LAYERS: 197 -> 137 / 99 / 69 / ... tokens
LAYERS = (3, 6, 9)
FOLDS = 2
LAMBDAS = (0.01, 0.1, 1.0, 10.0)
CV_FOLDS = 4
SEEDS = (0, 1, 2)
METHODS = ("guided", "cls_attn", "random")


@dataclass
class Alignment:
    """A linear map of a ViT's pooled features into a text embedding space:
    ``embed(f) = normalize((normalize(f) - mean) @ weight)``. Callable on ``(..., C)``
    features, so it is the ``project`` of :func:`vlprune.set_guide`."""

    weight: Tensor  # (C, E)
    mean: Tensor  # (C,)
    ridge: float

    def __call__(self, features: Tensor) -> Tensor:
        f = F.normalize(features.float(), dim=-1) - self.mean.to(features.device)
        return F.normalize(f @ self.weight.to(features.device), dim=-1)


def fit_alignment(features: Tensor, targets: Tensor, ridge: float) -> Alignment:
    """Ridge regression of ``targets`` (n, E) on the centred unit-norm ``features`` (n, C)."""
    if features.shape[0] != targets.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {targets.shape[0]} targets")
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    x = F.normalize(features.double(), dim=-1)
    mean = x.mean(0)
    x = x - mean
    a = x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(a, x.T @ targets.double())
    return Alignment(weight=w.float(), mean=mean.float(), ridge=ridge)


def classify(embeddings: Tensor, prompts: Tensor, classes: Tensor, k: int = 5) -> Tensor:
    """Top-``k`` classes ``(n, k)`` of unit-norm image ``embeddings`` among the ``prompts``
    (one row per entry of ``classes``) by cosine."""
    sim = embeddings @ F.normalize(prompts, dim=-1).T
    return classes[sim.topk(min(k, len(classes)), dim=1).indices]


def class_folds(classes: Tensor, folds: int, seed: int = 0) -> list[Tensor]:
    """``folds`` disjoint groups of ``classes`` (a seeded permutation, split evenly)."""
    if not 2 <= folds <= len(classes):
        raise ValueError(f"folds must be in [2, {len(classes)}] (the number of classes), got {folds}")
    g = torch.Generator().manual_seed(seed)
    perm = classes[torch.randperm(len(classes), generator=g)]
    return [c.sort().values for c in perm.tensor_split(folds)]


def training_pairs(features: Tensor, labels: Tensor, head: Tensor, text: Tensor,
                   held_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs (image-space vector, text target, class) of every class outside ``held_out``:
    the images' pooled features and the classifier-head rows."""
    img = ~torch.isin(labels, held_out)
    cls = torch.ones(head.shape[0], dtype=torch.bool)
    cls[held_out] = False
    idx = torch.arange(head.shape[0])[cls]
    x = torch.cat([features[img], head[cls]])
    c = torch.cat([labels[img], idx])
    return x, text[c], c


def choose_ridge(x: Tensor, t: Tensor, c: Tensor, text: Tensor, lambdas: Sequence[float] = LAMBDAS,
                 folds: int = CV_FOLDS, seed: int = 0) -> float:
    """The ridge weight with the best class-disjoint cross-validated zero-shot top-1 on the
    training pairs (ties: the larger weight)."""
    groups = class_folds(c.unique(), folds, seed + 1)
    best, best_acc = None, -1.0
    for lam in sorted(lambdas, reverse=True):
        hits = 0
        for group in groups:
            inside = torch.isin(c, group)
            a = fit_alignment(x[~inside], t[~inside], lam)
            pred = classify(a(x[inside]), text[group], group, k=1)[:, 0]
            hits += int((pred == c[inside]).sum())
        acc = hits / len(c)
        if acc > best_acc:
            best, best_acc = lam, acc
    return best


@dataclass
class TestBed:
    """The two real encoders' inputs: ViT-Ti, its preprocessed images and labels, the
    MiniLM prompt embeddings of all classes and the class names."""

    model: nn.Module
    images: Tensor
    labels: Tensor
    text: Tensor  # (num_classes, E), unit norm
    names: list[str]

    @property
    def head(self) -> Tensor:
        return self.model.head.weight.detach()


def assets_dir(path: str | os.PathLike | None = None) -> Path:
    """The shared assets folder: ``path``, else ``$VLPRUNE_ASSETS``, else ``../shared/assets``."""
    root = Path(path or os.environ.get("VLPRUNE_ASSETS") or "../shared/assets")
    if not (root / VIT).is_dir() or not (root / "imagenet-sample" / "classes.csv").is_file():
        raise FileNotFoundError(
            f"{root} does not hold {VIT}/ and imagenet-sample/classes.csv: pass --assets or set "
            "VLPRUNE_ASSETS to the shared assets folder"
        )
    return root


def class_names(classes_csv: str | os.PathLike) -> list[str]:
    """Class names in class-index order from a ``classes.csv`` (``class_index,...,class_name``),
    underscores read as spaces."""
    with open(classes_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"class_index", "class_name"} <= set(rows[0]):
        raise ValueError(f"{classes_csv} needs the columns class_index and class_name")
    rows.sort(key=lambda r: int(r["class_index"]))
    if [int(r["class_index"]) for r in rows] != list(range(len(rows))):
        raise ValueError(f"{classes_csv}: class_index must run 0..{len(rows) - 1} without gaps")
    return [r["class_name"].replace("_", " ") for r in rows]


def load_testbed(assets: str | os.PathLike | None = None, limit: int | None = None) -> TestBed:
    """ViT-Ti with its real weights, the shared images, and the MiniLM prompt embeddings."""
    import timm

    from .image_data import load_eval_tensors
    from .weights import load_weights

    root = assets_dir(assets)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    load_weights(model, root / VIT / f"{VIT}.npz")
    model.eval()
    images, labels = load_eval_tensors(root / "imagenet-sample", model, limit=limit)
    names = class_names(root / "imagenet-sample" / "classes.csv")
    tok, minilm = text_embed.load()
    text = text_embed.embed(tok, minilm, [TEMPLATE.format(n) for n in names])
    return TestBed(model=model, images=images, labels=labels, text=text, names=names)


@torch.no_grad()
def pooled_features(model: nn.Module, images: Tensor, batch_size: int = 50) -> Tensor:
    """The ViT's pooled pre-logits features ``(n, C)``."""
    out = [model.forward_head(model.forward_features(images[i : i + batch_size]), pre_logits=True)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).float()


@dataclass
class Fold:
    classes: Tensor  # the unseen classes of this fold
    index: Tensor  # the images of those classes
    align: Alignment


def fit_folds(bed: TestBed, features: Tensor, folds: int = FOLDS, seed: int = 0) -> list[Fold]:
    """One alignment per class fold, fitted without that fold's classes."""
    out = []
    for group in class_folds(bed.labels.unique(), folds, seed):
        x, t, c = training_pairs(features, bed.labels, bed.head, bed.text, group)
        lam = choose_ridge(x, t, c, bed.text, seed=seed)
        index = torch.isin(bed.labels, group).nonzero().squeeze(1)
        out.append(Fold(classes=group, index=index, align=fit_alignment(x, t, lam)))
    return out


def zero_shot(bed: TestBed, folds: list[Fold], batch_size: int = 50,
              guided: bool = False, features: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-5 predictions ``(n, 5)`` of every image among its fold's unseen prompts, and the
    image embeddings ``(n, E)``, in image order. ``guided``: each fold sets its prompts and
    alignment as the model's guide first. ``features``: the pooled features of all images,
    already computed (no forward pass)."""
    n = len(bed.labels)
    top5 = torch.empty(n, 5, dtype=torch.long)
    emb = torch.empty(n, folds[0].align.weight.shape[1])
    for fold in folds:
        if guided:
            set_guide(bed.model, bed.text[fold.classes], project=fold.align)
        f = (features[fold.index] if features is not None
             else pooled_features(bed.model, bed.images[fold.index], batch_size))
        e = fold.align(f)
        top5[fold.index] = classify(e, bed.text[fold.classes], fold.classes)
        emb[fold.index] = e
    if guided:
        set_guide(bed.model, None)
    return top5, emb


def _row(method: str, keep: float | None, top5: Tensor, emb: Tensor, labels: Tensor,
         ref_top1: Tensor, ref_emb: Tensor, gflops: float) -> dict:
    return {
        "method": method,
        "keep": keep,
        "top1": float((top5[:, 0] == labels).float().mean() * 100),
        "top5": float((top5 == labels[:, None]).any(1).float().mean() * 100),
        "agreement": float((top5[:, 0] == ref_top1).float().mean() * 100),
        "cosine": float((emb * ref_emb).sum(-1).mean()),
        "gflops": gflops,
    }


def run(assets: str | os.PathLike | None = None, budgets: Sequence[float] = BUDGETS,
        layers: Sequence[int] = LAYERS, methods: Sequence[str] = METHODS, folds: int = FOLDS,
        seeds: Sequence[int] = SEEDS, batch_size: int = 50, limit: int | None = None,
        bed: TestBed | None = None, progress: bool = True) -> dict:
    """The whole test bed: unreduced zero-shot accuracy, then each method at each budget."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; allowed: {list(METHODS)}")
    for keep in budgets:
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"budgets are keep rates in (0, 1], got {keep}")
    if not seeds:
        raise ValueError("give at least one seed for the random method")
    bed = bed or load_testbed(assets, limit)
    model = bed.model
    features = pooled_features(model, bed.images, batch_size)
    fold_fits = fit_folds(bed, features, folds)
    x1 = bed.images[:1]
    base_top5, base_emb = zero_shot(bed, fold_fits, batch_size, features=features)
    base_gflops = count_model_flops(model, x1) / 1e9
    rows = [_row("none", None, base_top5, base_emb, bed.labels, base_top5[:, 0], base_emb, base_gflops)]
    jobs = [(m, k, s) for k in budgets for m in methods for s in (seeds if m == "random" else (None,))]
    bar = _bar(len(jobs), progress)
    per_seed: dict[tuple[str, float], list[dict]] = {}
    try:
        for method, keep, seed in jobs:
            kw = dict(prune_keep=keep, prune_layers=tuple(layers))
            if method == "guided":
                kw["guide"] = "text"
            else:
                kw["prune_score"] = method
                if seed is not None:
                    kw["prune_seed"] = seed
            patch(model, **kw)
            try:
                top5, emb = zero_shot(bed, fold_fits, batch_size, guided=method == "guided")
                if method == "guided":
                    set_guide(model, bed.text[fold_fits[0].classes], project=fold_fits[0].align)
                gflops = describe(model, x1).flops / 1e9
            finally:
                unpatch(model)
            per_seed.setdefault((method, keep), []).append(
                _row(method, keep, top5, emb, bed.labels, base_top5[:, 0], base_emb, gflops))
            bar.update()
    finally:
        bar.close()
    for rs in per_seed.values():
        row = {k: (statistics.fmean(r[k] for r in rs) if isinstance(rs[0][k], float) else rs[0][k])
               for k in rs[0]}
        if len(rs) > 1:
            row["top1_seeds"] = [r["top1"] for r in rs]
        rows.append(row)
    return {
        "model": VIT,
        "text_model": "all-MiniLM-L6-v2",
        "template": TEMPLATE,
        "images": len(bed.labels),
        "classes": int(bed.labels.unique().numel()),
        "folds": folds,
        "ridge": [f.align.ridge for f in fold_fits],
        "chance_top1": float(statistics.fmean(100 / len(f.classes) for f in fold_fits)),
        "prune_layers": list(layers),
        "seeds": list(seeds),
        "rows": rows,
    }


def _bar(total: int, enabled: bool):
    from .sweep import progress_bar

    return progress_bar(total, enabled, "settings", "run")


def table(result: dict) -> str:
    """The result as a Markdown table."""
    lines = [
        "| method | keep at layers " + ",".join(map(str, result["prune_layers"]))
        + " | GFLOPs/img | zero-shot top-1 | top-5 | agreement | cosine |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        keep = "-" if r["keep"] is None else f"{r['keep']:g}"
        lines.append(
            f"| {r['method']} | {keep} | {r['gflops']:.3f} | {r['top1']:.1f} | {r['top5']:.1f} | "
            f"{r['agreement']:.1f} | {r['cosine']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m vlprune.eval.lit",
        description="ViT-Ti aligned to MiniLM (LiT-style): zero-shot accuracy on unseen classes, "
                    "and text-guided vs cls_attn vs random patch dropping at equal budgets",
    )
    p.add_argument("--assets", help="shared assets folder (default: $VLPRUNE_ASSETS or ../shared/assets)")
    p.add_argument("--budgets", type=lambda s: [float(v) for v in s.split(",")], default=list(BUDGETS),
                   help="keep rates applied at each of --layers (default: %(default)s)")
    p.add_argument("--layers", type=lambda s: tuple(int(v) for v in s.split(",")), default=LAYERS,
                   help="blocks that prune (default: 3,6,9)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS),
                   help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--folds", type=int, default=FOLDS, help="class-disjoint folds (default: %(default)s)")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=list(SEEDS),
                   help="seeds of the random method (default: 0,1,2)")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.assets, args.budgets, args.layers, args.methods, args.folds, args.seeds,
                 limit=args.limit, progress=not args.no_progress)
    print(f"{result['images']} images of {result['classes']} classes, {result['folds']} class folds; "
          f"chance {result['chance_top1']:.2f}%; ridge {result['ridge']}")
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
