"""Budgets: the FLOPs a setting costs, counted (:mod:`vlprune.eval.flops`), the merge
``r`` that fits a budget, and the shipped calibrated presets that ``patch(model, flops=0.5)``
applies (``vlprune/presets.json``). :mod:`vlprune.calibration` searches with these pieces.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adapters.base import ATTR, PatchContext, find_adapter, reconfigure
from .config import ReductionConfig

#: families whose image tower is calibrated while the text tower stays unreduced
TWO_TOWER_FAMILIES = ("open_clip", "hf_clip")
#: the reduction fields a candidate sets; the others keep the user's (or default) values
SEARCH_FIELDS = ("merge_r", "prune_keep", "prune_layers", "prune_recycle", "prune_fuse",
                 "prune_score", "visual_keep", "visual_score", "visual_contextual")
_CLEAR = dict(merge_r=0, prune_keep=None, prune_layers=None, prune_recycle=False,
              prune_fuse=False, prune_score="cls_attn")
#: the warning a merge fit provokes on purpose (schedules larger than some layers can merge)
CAPPED_WARNING = ".*asks for more tokens than this input has"


def context_of(model: nn.Module) -> PatchContext:
    """The settings context of a patched model (``ValueError`` when it is not patched)."""
    ctx = model.__dict__.get(ATTR)
    if ctx is None:
        raise ValueError(f"{type(model).__name__} is not patched by vlprune; call "
                         "vlprune.patch(model, ...) first")
    return ctx


def image_output(model: nn.Module) -> Callable[[nn.Module, Tensor], Tensor]:
    """How a calibration forward reads a model's answer for a batch of images: the logits of
    a classifier (timm), the image embedding of a two-tower model (open_clip's
    ``encode_image``, Hugging Face's ``get_image_features``) or a vision tower's pooled
    output."""
    if hasattr(model, "encode_image"):
        return lambda m, x: m.encode_image(x)
    if hasattr(model, "get_image_features"):
        return lambda m, x: tensor_of(m.get_image_features(pixel_values=x))
    if "pixel_values" in _forward_args(model):
        return lambda m, x: tensor_of(m(pixel_values=x))
    return lambda m, x: tensor_of(m(x))


def _forward_args(model: nn.Module) -> tuple[str, ...]:
    import inspect

    try:
        return tuple(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return ()


def tensor_of(out: Any) -> Tensor:
    """The answer in a model output: the tensor itself, else ``logits``, ``image_embeds``,
    ``pooler_output`` (in that order), else the first tensor of a tuple."""
    if isinstance(out, Tensor):
        return out
    for name in ("logits", "image_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot read an answer from a {type(out).__name__}; pass output_fn=")


def output_kind(model: nn.Module, out: Tensor) -> str:
    """``"logits"`` when the output is one score per class of a classifier (its last
    dimension is the model's ``num_classes``, or the model has no image-embedding method),
    else ``"embedding"``."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0 and out.shape[-1] == n:
        return "logits"
    if hasattr(model, "encode_image") or hasattr(model, "get_image_features"):
        return "embedding"
    if out.shape[-1] == getattr(getattr(model, "config", None), "num_labels", -1):
        return "logits"
    return "embedding"


def budget_ratio(flops: float | None, speedup: float | None) -> float:
    given = [n for n, v in (("flops", flops), ("speedup", speedup)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one budget: flops= (a fraction in (0, 1)) or speedup= "
                         f"(> 1); got {given or 'none'}")
    if flops is not None:
        if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0 < flops < 1:
            raise ValueError(f"flops must be a fraction of the unpatched FLOPs in (0, 1), got {flops!r}")
        return float(flops)
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not speedup > 1:
        raise ValueError(f"speedup must be > 1 (counted as 1/speedup of the FLOPs), got {speedup!r}")
    return 1.0 / float(speedup)


class Runner:
    """Runs the model under candidate settings: outputs, FLOP counts (cached per setting)."""

    def __init__(self, model: nn.Module, output_fn: Callable, batch_size: int,
                 base: Mapping[str, Any]) -> None:
        self.model, self.output_fn, self.batch_size = model, output_fn, batch_size
        self.base = dict(base)  # the fields no candidate sets (the user's own)
        self._flops: dict[str, int] = {}
        p = next(model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32

    def outputs(self, x: Tensor) -> Tensor:
        outs = []
        with torch.inference_mode():
            for i in range(0, len(x), self.batch_size):
                xb = x[i:i + self.batch_size].to(self.device, self.dtype)
                outs.append(self.output_fn(self.model, xb).float().cpu())
        return torch.cat(outs)

    def full(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Every search field set: the candidate's, else the no-reduction default."""
        return {**self.base, **_CLEAR, **settings}

    def config(self, settings: Mapping[str, Any]) -> ReductionConfig:
        return ReductionConfig(**self.full(settings))

    def set(self, settings: Mapping[str, Any]) -> None:
        """Give the model the candidate's settings (as ``vlprune.configure`` does)."""
        ctx = context_of(self.model)
        reconfigure(self.model, find_adapter(self.model, ctx.family), self.config(settings))

    def unreduced(self):
        """A ``with`` block in which this thread's forwards run unreduced
        (``vlprune.disabled``)."""
        return context_of(self.model).scoped("disabled", True)

    def flops(self, settings: Mapping[str, Any], x1: Tensor) -> int:
        from .eval.flops import count_flops

        key = json.dumps(self.config(settings).to_dict(), sort_keys=True)
        if key not in self._flops:
            self.set(settings)
            x1 = x1.to(self.device, self.dtype)
            self._flops[key] = count_flops(lambda: self.output_fn(self.model, x1))
        return self._flops[key]


#: the reduction fields a candidate sets; the others keep the user's (or default) values
SEARCH_FIELDS = ("merge_r", "prune_keep", "prune_layers", "prune_recycle", "prune_fuse",
                 "prune_score", "visual_keep", "visual_score", "visual_contextual")
_CLEAR = dict(merge_r=0, prune_keep=None, prune_layers=None, prune_recycle=False,
              prune_fuse=False, prune_score="cls_attn")


def fit_merge(run: Runner, structure: dict[str, Any], budget: int, x1: Tensor,
              r_max: int, hint: int | None = None) -> dict[str, Any] | None:
    """``structure`` with the smallest merge ``r`` (constant, or a ramp when the structure
    holds ``_inflection``) whose counted FLOPs are within ``budget``; ``None`` when even
    ``r_max`` is over it. FLOPs fall as ``r`` grows, so a bisection finds it; ``hint`` (the
    ``r`` of a similar structure) starts a short walk first, which usually needs two
    counts."""
    inflection = structure.get("_inflection")
    rest = {k: v for k, v in structure.items() if k != "_inflection"}

    def at(r: int) -> dict[str, Any]:
        if inflection is None or r == 0:
            return {**rest, "merge_r": r}
        return {**rest, "merge_r": (r, inflection)}

    def fits(r: int) -> bool:
        return run.flops(at(r), x1) <= budget

    lo, hi = None, None  # fits(lo) is False, fits(hi) is True
    if hint is not None:
        r = min(max(int(hint), 0), r_max)
        if fits(r):
            hi = r
            for _ in range(3):
                if hi == 0 or not fits(hi - 1):
                    return at(hi)
                hi -= 1
        else:
            lo = r
            for _ in range(3):
                if lo == r_max:
                    return None
                if fits(lo + 1):
                    return at(lo + 1)
                lo += 1
    if hi is None:
        if not fits(r_max):
            return None
        hi = r_max
    if lo is None:
        if fits(0):
            return at(0)
        lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return at(hi)


def fill_merge(run: Runner, settings: dict[str, Any], budget: int, x1: Tensor,
               num_layers: int) -> dict[str, Any]:
    """Spend what the integer fit left of the budget: with a constant ``r`` (``r - 1`` is over
    the budget), merge ``r - 1`` in the last ``k`` layers for the largest ``k`` whose counted
    FLOPs still fit (a per-layer list); ``settings`` unchanged when ``k`` is 0 or ``r`` is not
    a constant >= 1."""
    r = settings.get("merge_r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or num_layers < 2:
        return settings

    def at(k: int) -> dict[str, Any]:
        return {**settings, "merge_r": [r] * (num_layers - k) + [r - 1] * k}

    lo, hi = 0, num_layers  # at(0) is ``r`` everywhere (fits); at(num_layers) is r - 1 (over)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run.flops(at(mid), x1) <= budget:
            lo = mid
        else:
            hi = mid
    return settings if lo == 0 else at(lo)


def depth_and_r_max(run: Runner, x1: Tensor) -> tuple[int, int]:
    """The image tower's layers (its reduction points, as one forward of the calibration
    output records them) and the largest useful constant ``r`` (half the tokens entering
    the first layer: ToMe's cap per layer)."""
    run.set({})
    ctx = context_of(run.model)
    records: list = []
    with torch.no_grad(), ctx.scoped("record", records), ctx.scoped("merged", {}):
        run.output_fn(run.model, x1.to(run.device, run.dtype))
    layers = [lr for lr in records if lr.tower != "text"]
    if not layers:
        raise ValueError("the model ran no reduction point on an image; is it an image model?")
    return len(layers), max(1, layers[0].tokens_in // 2)


# ----------------------------------------------------------------------------- presets


PRESETS_FILE = Path(__file__).with_name("presets.json")


def load_presets() -> dict[str, Any]:
    """The shipped table of calibrated settings (``vlprune/presets.json``): per model
    architecture, its status (``measured`` or ``not yet measured``), where the settings came
    from, and one config per FLOPs budget."""
    return json.loads(PRESETS_FILE.read_text())["models"]


def model_key(model: nn.Module) -> str | None:
    """The name presets are looked up by: a timm model's architecture
    (``vit_tiny_patch16_224``), else ``None``."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return None


@dataclass
class BudgetChoice:
    """What ``patch(model, flops=...)`` chose and why."""

    config: ReductionConfig
    ratio: float
    flops_ratio: float
    source: str  # "preset" or "merge fit"
    note: str


def preset_structure(model: nn.Module, ratio: float) -> tuple[dict[str, Any], str, str]:
    """The pruning structure of the measured preset nearest to ``ratio`` for ``model``, with
    its source (``"preset"``) and a note; merging alone (``"merge fit"``) when no measured
    preset exists."""
    key = model_key(model)
    entry = load_presets().get(key) if key else None
    if not entry or entry.get("status") != "measured":
        why = (f"no calibrated preset for {key}" if key else "no calibrated preset for "
               f"{type(model).__name__}") + (" (not yet measured)" if entry else "")
        return {}, "merge fit", why
    budgets = {float(b): cfg for b, cfg in entry["budgets"].items()}
    nearest = min(budgets, key=lambda b: (abs(b - ratio), b))
    cfg = ReductionConfig.from_dict(budgets[nearest]).to_dict()
    cfg.pop("merge_r", None)
    note = (f"preset of {key} for flops={nearest:g} (calibrated on {entry.get('weights', '?')} "
            f"weights; {entry.get('source', '')})")
    return cfg, "preset", note


def fit_budget(model: nn.Module, ratio: float, base: Mapping[str, Any] | None = None,
               inputs: Tensor | None = None) -> BudgetChoice:
    """The settings ``patch(model, flops=ratio)`` applies: the pruning structure of the
    model's measured preset (or merging alone without one) with the merge ``r`` fitted to
    ``ratio`` by counting FLOPs on ``inputs`` (default: one random image of the model's
    input size). ``model`` must be patched; it is left configured with the choice."""
    ctx = context_of(model)
    if inputs is None:
        inputs = find_adapter(model, ctx.family).example_input(model, 1)
    fields = dict(base or {})
    if ctx.family in TWO_TOWER_FAMILIES and fields.get("text_merge_r") is None:
        fields["text_merge_r"] = 0
    run = Runner(model, image_output(model), 1, fields)
    structure, source, note = preset_structure(model, ratio)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=CAPPED_WARNING)
            x1 = inputs[:1]
            with run.unreduced():
                base_flops = run.flops({}, x1)
            _, r_max = depth_and_r_max(run, x1)
            budget = int(math.floor(ratio * base_flops))
            fitted = fit_merge(run, structure, budget, x1, r_max)
            if fitted is None and structure:  # the preset's pruning alone is over: merge only
                structure, source = {}, "merge fit"
                note += "; its pruning does not fit this budget, so merging alone"
                fitted = fit_merge(run, structure, budget, x1, r_max)
            if fitted is None:
                raise ValueError(f"flops={ratio:g} cannot be reached on this model by merging "
                                 f"(at most r={r_max} per layer); raise the budget")
            n = run.flops(fitted, x1)
    finally:
        model.train(was_training)
    return BudgetChoice(run.config(fitted), ratio, n / base_flops, source, note)
