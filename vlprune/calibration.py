"""Budgets, not knobs: find the reduction settings that keep a model's own predictions best
within a compute budget, on unlabeled images.

    cfg = vlprune.calibrate(model, images, flops=0.5)   # a ReductionConfig
    vlprune.patch(model, cfg)

:func:`search` does the work and returns a :class:`Calibration` (the chosen config, every
candidate's counted FLOPs and scores, the time it took); :func:`calibrate` returns only its
config. The search is label-free: each candidate is scored against the *unpatched* model's
outputs on the same images (KL of the class distribution and top-1 agreement for a
classifier; cosine distance and nearest-neighbour agreement for an image encoder), so it runs
on any images of the user's domain.

How it searches (:func:`candidates` lists the space): for each pruning structure (none, one
early layer, two or three layers, EViT's placement; keep rates 0.9..0.7; dropped tokens
recycled into their nearest kept token or fused into one; with and without the last-layer
trick, which keeps one patch token before the last MLP of a class-token model), the merge
schedule is fitted to the budget by *counting* FLOPs (:mod:`vlprune.eval.flops`) at batch 1:
the smallest ToMe ``r`` whose count is within the budget. Merging alone is a candidate too
(constant ``r`` and ramps). Every candidate is scored on a seeded subset of the images, the
The images are split in two seeded halves. Every candidate is scored on a subset of the first
(``screen`` images), the best ``finalists`` on all of it, and the lowest divergence there
(ties: higher agreement, then fewer FLOPs) is checked on the second half, which chose nothing:
it wins if it beats merging alone there by more than ``z`` standard errors of the paired
per-image difference, else merging alone stays (the best of many candidates on some images
looks better there than it is). The same images, seed and model give the same result.

Vision-language models take a visual-token budget instead (``tokens=``): the candidates are
the visual-token scores at that count, scored by the KL of the language model's next-token
distribution at the end of each prompt.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .api import disabled, get_config, is_patched, patch, unpatch
from .budget import (
    CAPPED_WARNING,
    SEARCH_FIELDS,
    TWO_TOWER_FAMILIES,
    Runner,
    budget_ratio,
    context_of,
    depth_and_r_max,
    fill_merge,
    fit_merge,
    image_output,
    output_kind,
    tensor_of,
)
from .config import ADAPTIVE_VISUAL_SCORES, CONTEXTUAL_VISUAL_SCORES, VISUAL_SCORES, ReductionConfig

#: the objectives :func:`search` can rank by
OBJECTIVES = ("divergence", "agreement")
#: keep rates of the pruning structures in the default space
KEEP_RATES = (0.9, 0.8, 0.7)
#: the keep rate of the last-layer trick (``ceil(0.01 * n)``: one patch token stays)
LAST_LAYER_KEEP = 0.01


# ---------------------------------------------------------------------------------- outputs


@dataclass
class Score:
    """How close a patched model's outputs stay to the unpatched model's on some images.

    ``divergence``: the mean KL(unpatched || patched) of the class distributions (logits) or
    the mean cosine distance ``1 - cos`` (embeddings); lower is better. ``agreement``: the
    fraction of images with the same top-1 class (logits), or whose patched embedding's
    nearest unpatched embedding among the scored images is its own (embeddings)."""

    divergence: float
    agreement: float
    n: int
    #: per image: the divergence and the agreement (0/1), for paired comparisons
    per_image: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    def key(self, objective: str) -> tuple[float, float]:
        """Sort key, best first."""
        if objective == "agreement":
            return (-self.agreement, self.divergence)
        return (self.divergence, -self.agreement)


def compare(ref: Tensor, out: Tensor, kind: str) -> Score:
    """:class:`Score` of outputs ``out`` against reference outputs ``ref`` (same images)."""
    ref, out = ref.double(), out.double()
    if kind == "logits":
        logp, logq = ref.log_softmax(-1), out.log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        agree = (ref.argmax(-1) == out.argmax(-1)).double()
        return Score(float(kl.mean()), float(agree.mean()), len(ref), (kl, agree))
    a = torch.nn.functional.normalize(ref.flatten(1), dim=-1)
    b = torch.nn.functional.normalize(out.flatten(1), dim=-1)
    cos = (a * b).sum(-1)
    nearest = (b @ a.T).argmax(-1) == torch.arange(len(a))
    agree = nearest.double()
    return Score(float((1 - cos).mean()), float(agree.mean()), len(ref), (1 - cos, agree))


def better_beyond_noise(a: Score, b: Score, objective: str, z: float = 2.0) -> bool:
    """Is ``a`` better than ``b`` on the same images by more than ``z`` standard errors of
    the paired per-image difference (divergence, or agreement for that objective)?"""
    if a.per_image is None or b.per_image is None or a.n != b.n or a.n < 2:
        return a.key(objective) < b.key(objective)
    i = 1 if objective == "agreement" else 0
    gain = (a.per_image[i] - b.per_image[i]) * (1 if i else -1)  # > 0: a is better
    se = float(gain.std()) / math.sqrt(a.n)
    return float(gain.mean()) > z * se


# ------------------------------------------------------------------------------ candidates


@dataclass
class Candidate:
    """One setting of the search and what was measured for it."""

    label: str
    settings: dict[str, Any]
    flops: int | None = None
    flops_ratio: float | None = None
    screen: Score | None = None
    full: Score | None = None  # on the selection images
    confirm: Score | None = None  # on the confirmation images (the winner and merging alone)
    error: str | None = None
    fixed: bool = False  # merge_r given by the caller's space, not fitted

    def to_dict(self) -> dict[str, Any]:
        try:
            config: Any = ReductionConfig(**self.settings).to_dict()
        except (TypeError, ValueError):  # a refused candidate: its raw settings
            config = {k: repr(v) for k, v in self.settings.items()}
        d: dict[str, Any] = {"label": self.label, "config": config,
                             "flops": self.flops, "flops_ratio": self.flops_ratio}
        for name in ("screen", "full", "confirm"):
            s = getattr(self, name)
            d[name] = None if s is None else {"divergence": s.divergence,
                                              "agreement": s.agreement, "n": s.n}
        if self.error:
            d["error"] = self.error
        return d


def _scaled(layer: int, num_layers: int) -> int:
    """A layer index of the 12-layer reference placement scaled to ``num_layers``."""
    return min(num_layers - 1, max(0, round(layer * num_layers / 12)))


def prune_structures(num_layers: int) -> list[dict[str, Any]]:
    """The pruning structures of the default space (before the merge fit): none, one early
    layer, two or three layers and EViT's placement at :data:`KEEP_RATES`, each with and
    without the last-layer trick and (when pruning) recycling or fusing the dropped tokens."""
    base: list[tuple[tuple[int, ...], tuple[float, ...]]] = [((), ())]
    one = (_scaled(3, num_layers),)
    two = (_scaled(2, num_layers), _scaled(5, num_layers))
    three = (_scaled(2, num_layers), _scaled(5, num_layers), _scaled(8, num_layers))
    evit = (_scaled(3, num_layers), _scaled(6, num_layers), _scaled(9, num_layers))
    base += [(one, (k,)) for k in KEEP_RATES]
    base += [(two, (k, k)) for k in KEEP_RATES[:2]]
    base += [(three, (k,) * 3) for k in KEEP_RATES[:1]]
    base += [(evit, (k,) * 3) for k in KEEP_RATES[:2]]
    last = num_layers - 1
    out: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    for layers, keeps in base:
        if len(set(layers)) != len(layers) or last in layers:
            continue  # too shallow a model for this placement
        for trick in (False, True):
            ls, ks = layers + ((last,) if trick else ()), keeps + ((LAST_LAYER_KEEP,) if trick else ())
            if not ls:
                out.append({})
                continue
            for mode in ("recycle", "fuse"):
                key = (ls, ks, mode)
                if key in seen:
                    continue
                seen.add(key)
                out.append({"prune_keep": list(ks), "prune_layers": ls,
                            "prune_recycle": mode == "recycle", "prune_fuse": mode == "fuse"})
    return out


def candidates(num_layers: int) -> list[dict[str, Any]]:
    """The default search space as partial settings: merge ramps (``merge_r`` fitted later
    with inflection -0.5 / +0.5) and :func:`prune_structures` (constant ``merge_r`` fitted
    later)."""
    ramps = [{"_inflection": x} for x in (-0.5, 0.5)]
    return ramps + prune_structures(num_layers)


# -------------------------------------------------------------------------------- results


@dataclass
class Calibration:
    """The result of :func:`search`: the chosen :attr:`config` and how it was chosen."""

    config: ReductionConfig
    budget: dict[str, float]
    flops_ratio: float | None
    score: Score
    kind: str
    objective: str
    n_images: int
    n_screen: int
    seed: int
    seconds: float
    flops_baseline: int | None
    candidates: list[Candidate] = field(default_factory=list)
    merge_only: Candidate | None = None
    #: indices of the images the finalists were ranked on / the winner was confirmed on
    select_images: list[int] = field(default_factory=list)
    confirm_images: list[int] = field(default_factory=list)
    note: str = ""  # why the chosen setting won (e.g. merging alone kept: no hybrid beyond noise)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "calibration": {
                "budget": self.budget, "flops_ratio": self.flops_ratio,
                "divergence": self.score.divergence, "agreement": self.score.agreement,
                "output": self.kind, "objective": self.objective, "images": self.n_images,
                "screen_images": self.n_screen, "select_images": len(self.select_images),
                "confirm_images": len(self.confirm_images), "seed": self.seed,
                "seconds": round(self.seconds, 2), "flops_baseline": self.flops_baseline,
                "merge_only": None if self.merge_only is None else self.merge_only.to_dict(),
                "note": self.note,
                "candidates": [c.to_dict() for c in self.candidates],
            },
        }

    def save(self, path: str | os.PathLike) -> None:
        """JSON with ``"config"`` (what :meth:`ReductionConfig.load` and every CLI's
        ``--config`` read) and ``"calibration"`` (the search)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self, top: int = 10) -> str:
        """The best candidates scored on all images, as a Markdown table."""
        rows = sorted((c for c in self.candidates if c.full is not None),
                      key=lambda c: c.full.key(self.objective))[:top]
        div = "KL" if self.kind == "logits" else "1-cos"
        lines = [f"| setting | FLOPs ratio | {div} | agreement |", "|---|---:|---:|---:|"]
        for c in rows:
            ratio = "" if c.flops_ratio is None else f"{c.flops_ratio:.3f}"
            lines.append(f"| {c.label} | {ratio} | {c.full.divergence:.4f} | "
                         f"{100 * c.full.agreement:.1f}% |")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- search


def _as_images(images: Any, limit: int | None = None) -> Tensor:
    """Calibration images as one float tensor ``(N, C, H, W)``: a tensor, an ``(images,
    labels)`` pair, or a dataset of ``(image, label)`` items (labels are not used)."""
    if isinstance(images, (tuple, list)) and len(images) == 2 and isinstance(images[0], Tensor):
        images = images[0]
    if isinstance(images, Tensor):
        x = images
    elif isinstance(images, torch.utils.data.Dataset):
        n = len(images) if limit is None else min(limit, len(images))
        x = torch.stack([images[i][0] for i in range(n)])
    else:
        raise TypeError(f"images must be a (N, C, H, W) tensor, an (images, labels) pair or a "
                        f"Dataset of (image, label) items, got {type(images).__name__}")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"images must be a float (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    if len(x) < 2:
        raise ValueError(f"calibration needs at least 2 images, got {len(x)}")
    return x if limit is None else x[:limit]


def _label(config: ReductionConfig) -> str:
    from .eval.sweep import config_label

    return config_label(config)


def search(model: nn.Module, images: Any, *, flops: float | None = None,
           speedup: float | None = None, tokens: int | None = None,
           space: Sequence[Mapping[str, Any]] | None = None, objective: str = "divergence",
           screen: int = 64, finalists: int = 6, batch_size: int = 32, seed: int = 0,
           z: float = 2.0,
           output_fn: Callable[[nn.Module, Any], Tensor] | None = None,
           progress: bool = True, log: Callable[[str], None] | None = None) -> Calibration:
    """Search reduction settings for the one that keeps ``model``'s own outputs best within
    a budget; see the module docstring for the method.

    Args:
        model: a supported model, patched or not (it is left as it was: unpatched, or with
            its own settings).
        images: unlabeled calibration images, preprocessed for the model: a float ``(N, C,
            H, W)`` tensor, an ``(images, labels)`` pair or a dataset of ``(image, label)``
            items (labels are ignored). For ``tokens=``: a list of keyword-input dicts of the
            vision-language model (one batch each, e.g. a processor's outputs).
        flops: the budget as a fraction of the unpatched model's FLOPs, in (0, 1).
        speedup: the budget as a speedup in FLOPs (``speedup=2.0`` is ``flops=0.5``).
        tokens: for a vision-language model, the visual tokens per image that reach the
            language model; the search picks the visual-token score.
        space: candidate settings to search instead of :func:`candidates` (dicts of
            :class:`ReductionConfig` fields; ``merge_r`` left out is fitted to the budget).
        objective: ``"divergence"`` (KL or cosine distance, the default) or ``"agreement"``.
        z: the best candidate replaces merging alone (ToMe's constant ``r`` at the budget)
            only when it is better by more than ``z`` standard errors of the paired per-image
            difference on the confirmation half of the images (which it was not chosen on);
            ``z=0``: whenever it is better there at all.
        screen: images of the selection half every candidate is scored on (a seeded subset);
            ``finalists``: the candidates then scored on the whole selection half.
        output_fn: ``fn(model, batch) -> Tensor`` reading the model's answer (default
            :func:`image_output`).
        progress: a progress bar over the candidates; ``log``: where the steps are told.

    The search changes the model's settings as it goes (as :func:`vlprune.configure` does):
    do not run other forwards of the same model while it runs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vlprune.calibrate() takes the model (a torch.nn.Module) first, got "
                        f"{type(model).__name__}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed: {list(OBJECTIVES)}")
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not z >= 0:
        raise ValueError(f"z must be a number >= 0 (standard errors), got {z!r}")
    for name, v in (("screen", screen), ("finalists", finalists), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if tokens is not None:
        if flops is not None or speedup is not None:
            raise ValueError("give tokens= (a visual-token budget) or flops= / speedup=, not both")
        return _search_tokens(model, images, tokens, objective=objective, seed=seed,
                              output_fn=output_fn, progress=progress, log=log)
    ratio = budget_ratio(flops, speedup)
    x = _as_images(images)
    say = log or (lambda s: None)
    start = time.perf_counter()
    with _patched_for_search(model) as fields, warnings.catch_warnings():
        # the merge fit tries schedules larger than some layers can merge; capping is expected
        warnings.filterwarnings("ignore", message=CAPPED_WARNING)
        out_fn = output_fn or image_output(model)
        run = Runner(model, out_fn, batch_size, fields)
        x1 = x[:1]
        with disabled(model):
            base_flops = run.flops({}, x1)
            ref = run.outputs(x)
        kind = output_kind(model, ref)
        num_layers, r_max = depth_and_r_max(run, x1)
        budget = int(math.floor(ratio * base_flops))
        say(f"calibrating for {ratio:.3f} of {base_flops / 1e9:.3f} GFLOPs per image "
            f"({num_layers} layers, {len(x)} images, output: {kind})")

        structures = list(space) if space is not None else candidates(num_layers)
        pool: list[Candidate] = []
        merge_only = None
        hint = None  # neighbours in the space differ a little: the last r starts the fit
        for s in [{}] + [dict(s) for s in structures]:  # {}: merging alone, constant r
            try:
                fitted = s if "merge_r" in s else fit_merge(run, dict(s), budget, x1, r_max, hint)
                if fitted is None:
                    continue
                r = fitted["merge_r"]
                hint = r[0] if isinstance(r, tuple) else r if isinstance(r, int) else hint
                n = run.flops(fitted, x1)
            except (ValueError, TypeError, RuntimeError) as e:  # a setting this model refuses
                pool.append(Candidate(str(s), dict(s), error=f"{type(e).__name__}: {e}"))
                continue
            if n > budget:
                continue  # a given merge_r over the budget
            c = Candidate(_label(run.config(fitted)), fitted, n, n / base_flops,
                          fixed="merge_r" in s)
            if any(p.label == c.label for p in pool):
                continue
            pool.append(c)
            if s == {}:
                merge_only = c
        usable = [c for c in pool if c.error is None]
        if not usable:
            raise ValueError(f"no candidate setting fits {ratio:.3f} of the FLOPs on this model; "
                             "raise the budget")
        say(f"{len(usable)} candidates fit the budget; scoring each on {min(screen, len(x))} images")

        # selection and confirmation halves: the finalists are ranked on one, and the winner
        # is checked against merging alone on the other (no winner's curse)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g)
        n_confirm = len(x) // 2 if len(x) >= 4 else 0
        sel = perm[:len(x) - n_confirm]
        conf = perm[len(x) - n_confirm:].sort().values
        sub = sel[:min(screen, len(sel))].sort().values
        sel = sel.sort().values
        xs, refs = x[sub], ref[sub]
        from .eval.sweep import progress_bar

        with progress_bar(len(usable), progress, "calibrate", unit="setting") as bar:
            for c in usable:
                run.set(c.settings)
                c.screen = compare(refs, run.outputs(xs), kind)
                bar.update()
        ranked = sorted(usable, key=lambda c: c.screen.key(objective))
        finals = [_filled(run, c, budget, x1, num_layers, base_flops, pool)
                  for c in ranked[:finalists]]
        if merge_only is not None and merge_only not in finals:
            finals.append(merge_only)  # the reference: ToMe's constant r
        say(f"scoring the best {len(finals)} on {len(sel)} images")
        with progress_bar(len(finals), progress, "finalists", unit="setting") as bar:
            for c in finals:
                if len(sub) == len(sel) and c.screen is not None:
                    c.full = c.screen  # screened on these very images
                else:
                    run.set(c.settings)
                    c.full = compare(ref[sel], run.outputs(x[sel]), kind)
                bar.update()
        best = min(finals, key=lambda c: (*c.full.key(objective), c.flops))
        note = f"lowest {objective} of the finalists"
        reference = merge_only if merge_only is not None and merge_only.full else None
        if n_confirm and reference is not None and best is not reference:
            for c in (best, reference):
                run.set(c.settings)
                c.confirm = compare(ref[conf], run.outputs(x[conf]), kind)
            if better_beyond_noise(best.confirm, reference.confirm, objective, z):
                note += (f", better than merging alone by more than {z:g} standard errors on "
                         f"{n_confirm} other images")
            else:  # a hybrid that wins only by the noise of the images it was chosen on
                note = (f"{best.label} was not better than merging alone by more than {z:g} "
                        f"standard errors of the per-image difference on {n_confirm} images it "
                        "was not chosen on: merging alone kept")
                say(note)
                best = reference
        config = run.config(best.settings)
    return Calibration(
        config=config, budget={"flops": ratio}, flops_ratio=best.flops_ratio, score=best.full,
        kind=kind, objective=objective, n_images=len(x), n_screen=len(sub), seed=seed,
        select_images=sel.tolist(), confirm_images=conf.tolist(),
        seconds=time.perf_counter() - start, flops_baseline=base_flops, candidates=pool,
        merge_only=merge_only, note=note,
    )


def _filled(run: Runner, c: Candidate, budget: int, x1: Tensor, num_layers: int,
            base_flops: int, pool: list[Candidate]) -> Candidate:
    """A finalist with the rest of the budget spent (:func:`~vlprune.budget.fill_merge`),
    added to ``pool``; ``c`` itself when nothing is left to spend."""
    if c.fixed:  # a merge_r the caller gave
        return c
    settings = fill_merge(run, c.settings, budget, x1, num_layers)
    if settings is c.settings:
        return c
    n = run.flops(settings, x1)
    filled = Candidate(_label(run.config(settings)), settings, n, n / base_flops)
    pool.append(filled)
    return filled


def calibrate(model: nn.Module, images: Any, **kwargs: Any) -> ReductionConfig:
    """The :class:`ReductionConfig` that keeps ``model``'s predictions best within a budget
    (``flops=0.5``, ``speedup=2.0`` or, for a vision-language model, ``tokens=64``), found
    label-free on ``images``. Arguments as :func:`search`, whose :class:`Calibration` holds the
    whole search. ``vlprune.patch(model, config)`` applies it; ``config.save("cfg.json")``
    keeps it for any CLI's ``--config``."""
    return search(model, images, **kwargs).config


class _patched_for_search:
    """Patch the model for the search (keeping the fields a candidate does not set: the
    user's ``attn_backend``, text-tower settings, ...), and leave it as it was afterwards."""

    def __init__(self, model: nn.Module, **identity: Any) -> None:
        self.model, self.identity = model, identity
        self.was_patched = is_patched(model)
        self.old = get_config(model) if self.was_patched else None
        self.training = model.training

    def __enter__(self) -> dict[str, Any]:
        if self.was_patched:
            fields = {k: v for k, v in vars(self.old).items()
                      if k in ReductionConfig.field_names() and k not in SEARCH_FIELDS}
        else:
            fields = {}
            patch(self.model, **self.identity)
        ctx = context_of(self.model)
        if ctx.family in TWO_TOWER_FAMILIES and fields.get("text_merge_r") is None:
            fields["text_merge_r"] = 0  # the image tower is calibrated; the text tower stays
        self.model.eval()
        return fields

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.training)
        if self.was_patched:
            patch(self.model, self.old)
        else:
            unpatch(self.model)


# ------------------------------------------------------------------ vision-language models


def visual_candidates() -> list[dict[str, Any]]:
    """Visual-token scores at a fixed count (the adaptive ones pick their own count and are
    left out); the contextual scores split the budget 3:1 between dominant and contextual."""
    out: list[dict[str, Any]] = []
    for score in VISUAL_SCORES:
        if score in ADAPTIVE_VISUAL_SCORES or score in ("text", "random", "pool"):
            continue  # text needs a guide; random and pool are baselines
        out.append({"visual_score": score})
    return out


def _search_tokens(model: nn.Module, batches: Any, tokens: int, *, objective: str, seed: int,
                   output_fn: Callable | None, progress: bool,
                   log: Callable[[str], None] | None) -> Calibration:
    """:func:`search` with a visual-token budget on a vision-language model."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be an int >= 1 (visual tokens per image), got {tokens!r}")
    if isinstance(batches, Mapping):
        batches = [batches]
    if not isinstance(batches, (list, tuple)) or not batches or not all(
        isinstance(b, Mapping) for b in batches
    ):
        raise TypeError("with tokens=, images must be a list of keyword-input dicts of the "
                        "model (e.g. a processor's outputs with input_ids and pixel_values)")
    say = log or (lambda s: None)
    start = time.perf_counter()
    read = output_fn or (lambda m, b: tensor_of(m(**b))[:, -1])
    from .adapters.base import find_adapter

    try:
        family = context_of(model).family if is_patched(model) else find_adapter(model, None).name
    except ValueError:
        family = None
    if family != "hf_llava":
        raise ValueError(f"tokens= budgets are for vision-language models (hf_llava); this "
                         f"model is {family or type(model).__name__!r}: use flops= or speedup=")
    with _patched_for_search(model, visual_keep=1.0) as fields:
        run = Runner(model, read, 1, fields)

        def outputs() -> Tensor:
            with torch.inference_mode():
                return torch.cat([read(model, dict(b)).float().cpu() for b in batches])

        with disabled(model):
            ref = outputs()
        pool: list[Candidate] = []
        space = visual_candidates()
        from .eval.sweep import progress_bar

        with progress_bar(len(space), progress, "calibrate", unit="setting") as bar:
            for s in space:
                settings = {**s, "visual_keep": tokens}
                if s["visual_score"] in CONTEXTUAL_VISUAL_SCORES:
                    settings["visual_contextual"] = max(1, tokens // 4) if tokens > 1 else None
                    if settings["visual_contextual"] is None:
                        continue
                try:
                    run.set(settings)
                    score = compare(ref, outputs(), "logits")
                except (ValueError, TypeError, RuntimeError) as e:
                    pool.append(Candidate(str(settings), settings, error=f"{type(e).__name__}: {e}"))
                else:
                    pool.append(Candidate(_label(run.config(settings)), settings, screen=score,
                                          full=score))
                bar.update()
        usable = [c for c in pool if c.error is None]
        if not usable:
            raise ValueError("no visual-token score runs on this model at "
                             f"tokens={tokens}: " + "; ".join(c.error or "" for c in pool))
        best = min(usable, key=lambda c: c.full.key(objective))
        say(f"best visual score at {tokens} tokens: {best.label}")
        config = run.config(best.settings)
    return Calibration(
        config=config, budget={"tokens": tokens}, flops_ratio=None, score=best.full,
        kind="logits", objective=objective, n_images=sum(len(_first(b)) for b in batches),
        n_screen=0, seed=seed, seconds=time.perf_counter() - start, flops_baseline=None,
        candidates=pool,
    )


def _first(batch: Mapping[str, Any]) -> Iterable:
    for v in batch.values():
        if isinstance(v, Tensor) and v.dim():
            return v
    return [None]


