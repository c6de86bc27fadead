"""The public verbs: patch, unpatch, configure, is_patched, disabled, describe, get_source,
check."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import upstream
from .adapters.base import (
    ATTR,
    Adapter,
    LayerRecord,
    PatchContext,
    PatchSnapshot,
    UnsupportedModelError,
    find_adapter,
    input_shapes,
    reconfigure,
    restore,
    run_model,
)
from .config import ReductionConfig


def _context(model: nn.Module) -> PatchContext:
    ctx = model.__dict__.get(ATTR)
    if ctx is None:
        raise ValueError(
            f"{type(model).__name__} is not patched by vlprune; call vlprune.patch(model, ...) first"
        )
    return ctx


def _require_module(model: Any, verb: str) -> None:
    if not isinstance(model, nn.Module):
        got = "None" if model is None else f"{type(model).__name__} {model!r:.60}"
        raise TypeError(f"vlprune.{verb}() takes the model (a torch.nn.Module) first, got {got}")


def patch(model: nn.Module, config: ReductionConfig | None = None, /, **settings: Any) -> nn.Module:
    """Make ``model`` run on fewer tokens, in place; returns the same ``model``.

    Pass a :class:`ReductionConfig` or its fields as keywords, e.g. ``patch(vit, merge_r=16)``,
    or a budget: ``patch(vit, flops=0.5)`` (or ``speedup=2.0``) applies the model's calibrated
    preset (``vlprune/presets.json``) with ``merge_r`` fitted to the budget by counting FLOPs;
    a model without a measured preset gets merging alone, fitted the same way, and a warning
    (:func:`vlprune.calibrate` finds a schedule on your own images).
    Patching an already patched model first undoes the old patch (patching twice equals
    patching once). Unsupported models and invalid settings raise here, not at forward time.

    When the installed library changed an upstream function the patch overrides (its
    fingerprint is none of the tested versions', :mod:`vlprune.upstream`), :func:`check` runs
    on the model first: a pass warns once, a failure refuses the patch.
    """
    _require_module(model, "patch")
    if config is not None and settings:
        raise TypeError("pass either a ReductionConfig or keyword settings, not both")
    if BUDGET_KEYS & set(settings):
        return _patch_for_budget(model, settings)
    if config is None:
        unknown = sorted(set(settings) - set(ReductionConfig.field_names()))
        if unknown:
            raise TypeError(
                f"unknown setting(s) {unknown}; known settings: {list(ReductionConfig.field_names())}"
            )
        config = ReductionConfig(**settings)
    elif not isinstance(config, ReductionConfig):
        raise TypeError(f"config must be a ReductionConfig, got {type(config).__name__}")
    # a failed patch leaves the model as it was: unpatched, or exactly its old patch
    snapshot = PatchSnapshot(model)
    try:
        _apply(model, config)
        if upstream.unknown(model):
            _verify(model)
    except BaseException:
        snapshot.put_back()
        raise
    return model


BUDGET_KEYS = {"flops", "speedup"}


def _patch_for_budget(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """``patch(model, flops=0.5)``: the model's calibrated preset (or merging alone when it
    has none, with a warning) fitted to the budget by counting FLOPs."""
    from .budget import SEARCH_FIELDS, budget_ratio, fit_budget

    budget = {k: settings.pop(k) for k in list(settings) if k in BUDGET_KEYS}
    ratio = budget_ratio(budget.get("flops"), budget.get("speedup"))
    chosen = sorted(set(settings) & set(SEARCH_FIELDS))
    if chosen:
        raise TypeError(f"a budget ({', '.join(f'{k}=' for k in budget)}) chooses {chosen} "
                        "itself; give the budget or those settings, not both")
    snapshot = PatchSnapshot(model)
    try:
        patch(model, **settings)
        choice = fit_budget(model, ratio, settings)
        patch(model, choice.config)
    except BaseException:
        snapshot.put_back()
        raise
    if choice.source != "preset":
        r = choice.config.merge_r
        warnings.warn(
            f"{choice.note}: merge_r={r} fitted to flops={ratio:.3g} by counting FLOPs "
            f"({choice.flops_ratio:.3f} of the unpatched FLOPs). For a schedule found on your "
            "own images: vlprune.calibrate(model, images, flops=...)", stacklevel=3)
    return model


def _families() -> list[tuple[str, str]]:
    """``(name, what it supports)`` of every registered model family, in registration order."""
    out: dict[str, str] = {}
    todo = list(Adapter.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        name = getattr(cls, "name", "")
        if name and name not in out:
            try:
                adapter = find_adapter(nn.Module(), name)  # the registered instance
            except ValueError:  # a subclass that is not registered
                continue
            out[name] = adapter.supported
    return list(out.items())


def _find_adapter(model: nn.Module, family: str | None) -> Adapter:
    """:func:`find_adapter`, with the families listed one per line when none fits."""
    try:
        return find_adapter(model, family)
    except UnsupportedModelError:
        cls = type(model)
        lines = [f"no vlprune adapter supports {cls.__module__}.{cls.__qualname__}. Supported "
                 "families (family=NAME forces one):"]
        lines += [f"  {name}: {supported}" for name, supported in _families()]
        raise UnsupportedModelError("\n".join(lines)) from None


def _apply(model: nn.Module, config: ReductionConfig) -> None:
    if ATTR in model.__dict__:  # not a tower patched as part of a larger model: check refuses it
        restore(model)
    adapter = _find_adapter(model, config.family)
    adapter.check(model, config)
    ctx = adapter.make_context(model, config)
    adapter.apply(model, ctx)


def _verify(model: nn.Module) -> None:
    """The patch overrides upstream code of an untested version: self-check, then warn once
    per function, or raise."""
    bad = upstream.unknown(model)
    result = check(model)
    tested = "; ".join(f"{k}: {', '.join(upstream.tested_versions(k)) or 'none'}" for k in bad)
    if not result.ok:
        raise UnsupportedModelError(
            f"{result}\nvlprune overrides these upstream functions, and the installed versions "
            f"({upstream.versions()}) changed them in a way the self-check caught. Tested "
            f"versions: {tested}"
        )
    fresh = [k for k in bad if k not in _WARNED]
    if fresh:
        _WARNED.update(fresh)
        warnings.warn(
            f"vlprune overrides upstream code that differs from the tested versions ({tested}; "
            f"installed: {upstream.versions()}). The self-check on this model passed "
            f"(reducing nothing: max |diff| {result.max_diff_unreduced:.3g} from the unpatched "
            "model); paths it did not run may still differ.",
            stacklevel=3,
        )


_WARNED: set[str] = set()


def _size_problems(ctx) -> list[str]:
    """Token sizes left by the latest forward that are not whole counts >= 1 (padding aside)."""
    problems = []
    for c in ctx.contexts():
        state = c.latest.state
        if state is None or state.size is None:
            continue
        size = state.size.reshape(state.size.shape[0], -1)
        if state.valid is not None and state.valid.shape == size.shape:
            size = size[state.valid]
        if size.numel() and (not torch.equal(size, size.round()) or float(size.min()) < 1):
            problems.append(f"the reduced forward left {c.tower or 'token'} sizes that are not whole "
                            f"counts >= 1 (min {float(size.min()):.3g})")
    return problems


def check(model: nn.Module, atol: float = 1e-4, rtol: float = 1e-4) -> upstream.CheckResult:
    """Self-check a patched ``model`` on a small random input of its own default shape (batch 2).

    1. Patched but reducing nothing (:func:`disabled`), its outputs must equal the unpatched
       model's (within ``atol + rtol * |x|``): the patched classes still compute what upstream
       does when they pass through.
    2. Reducing with its own settings, its outputs must be finite and every token's size
       (the input tokens it holds) a whole number >= 1.

    The re-implemented reducing paths are not compared with upstream here (a reduced output
    has no upstream twin); their upstream originals are fingerprinted instead
    (:mod:`vlprune.upstream`), and an untested one makes :func:`patch` warn.

    The model ends patched with its settings, in its train/eval mode. Returns a
    :class:`~vlprune.upstream.CheckResult` (``ok`` is the verdict, ``str()`` the report);
    :func:`patch` runs this itself when upstream code changed."""
    config = _context(model).config
    inputs = find_adapter(model, config.family).example_input(model, 2, None)
    was_training = model.training
    problems: list[str] = []
    notes: list[str] = []
    diff, finite = float("inf"), False
    bad = upstream.unknown(model)
    try:
        model.eval()
        with torch.no_grad():
            restore(model)
            ref = _float_tensors(run_model(model, inputs))
            _apply(model, config)
            try:
                with disabled(model):
                    same = _float_tensors(run_model(model, inputs))
                # a guided tower alone needs the caller's guide (set_guide): not run then
                guided_alone = config.guide is not None and not _context(model).children
                out = ref if guided_alone else _float_tensors(run_model(model, inputs))
                if guided_alone:
                    notes.append("a guided tower alone reduces with the caller's guide "
                                 "(set_guide): the reduced forward was not run")
            except Exception as e:  # e.g. an upstream signature our classes no longer fit
                problems.append(f"the patched forward raised {type(e).__name__}: {e}")
                same, out = [], []
            if not problems and (len(ref) != len(same)
                                 or any(a.shape != b.shape for a, b in zip(ref, same))):
                problems.append("reducing nothing changed the outputs' number or shapes")
            elif not problems:
                diff = max((float((a.float() - b.float()).abs().max()) for a, b in zip(ref, same)),
                           default=0.0)
                if not all(torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol)
                           for a, b in zip(ref, same)):
                    problems.append(f"reducing nothing differs from the unpatched model by {diff:.3g}")
            finite = bool(out) and all(bool(torch.isfinite(t).all()) for t in out)
            if not finite and not problems:
                problems.append("the reduced forward gave non-finite values (or no tensor)")
            if not problems:
                problems += _size_problems(_context(model))
    finally:
        current = model.__dict__.get(ATTR)
        if current is None or current.config is not config:
            _apply(model, config)
        model.train(was_training)
    return upstream.CheckResult(ok=not problems, max_diff_unreduced=diff, reduced_finite=finite,
                                unknown=bad, problems=problems, notes=notes)


def _float_tensors(out: Any) -> list[Tensor]:
    """The floating-point tensors of a model output (tensor, tuple, list, dict, ModelOutput)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for v in out.values() for t in _float_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _float_tensors(v)]
    return []


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original classes and forwards; the ``state_dict`` is untouched."""
    _context(model)
    restore(model)
    return model


def is_patched(model: nn.Module) -> bool:
    return ATTR in model.__dict__


def configure(model: nn.Module, **changes: Any) -> nn.Module:
    """Change settings of a patched model (e.g. ``configure(m, merge_r=8)``).

    The new settings go through the checks ``patch`` runs (the family's structure checks and
    its context build), so ``configure`` refuses what ``patch`` refuses, with the same error.
    It is atomic: a refused change leaves the settings, the patch and the outputs exactly as
    they were. The result equals ``patch(model, get_config(model).replace(**changes))``,
    except that what can be kept is kept: a change the patched modules can follow (merge or
    prune schedules, scores, ``trace_source``, ...) is made in place, on the same patched
    classes and settings object (guidance too: ``guide=``); a change that needs other
    patched modules (turning on FastV's decoder layers or a LLaVA's vision tower, moving
    ``llm_layer``) re-patches internally, keeping the classes of the modules it patches.
    Embeddings given by :func:`set_guide` stay while the same tower is still guided by the
    same modality. ``family`` cannot change.

    Like ``patch``, call it between forwards: not while other threads (or tasks) run
    forwards of the same model, which may then see the model partly re-patched. Forwards
    after it, in any thread, use the new settings.
    """
    ctx = _context(model)
    if "family" in changes and changes["family"] not in (ctx.config.family, ctx.family):
        raise ValueError(
            f"family cannot be changed by configure() (the model is patched as {ctx.family!r}); "
            "call vlprune.patch() again"
        )
    config = ctx.config.replace(**changes)
    reconfigure(model, find_adapter(model, ctx.family), config)
    return model


def get_config(model: nn.Module) -> ReductionConfig:
    return _context(model).config


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the original computation inside the block (for A/B comparisons in one process).

    Only forwards of the calling thread (or asyncio task) run unreduced: other threads using
    the same model at the same time keep reducing."""
    ctx = _context(model)
    with ctx.scoped("disabled", True):
        yield model


def get_source(model: nn.Module, tower: str | None = None) -> Tensor:
    """``(B, N, N0)`` map of which input tokens each output token of the last forward holds
    (the last forward of the calling thread).

    Needs ``trace_source=True``. Row sums are the token sizes; columns sum to 1. On a model
    with a text tower name the tower (``"image"`` or ``"text"``; a text model alone needs
    none). ``None`` means no token was merged: every token holds only itself.
    """
    ctx = _context(model)
    if not ctx.config.trace_source:
        raise ValueError("source tracking is off: patch or configure with trace_source=True")
    if ctx.children:
        if tower is None and len(ctx.children) == 1:
            tower = next(iter(ctx.children))
        if tower not in ctx.children:
            raise ValueError(f"name the tower: get_source(model, tower=...) with one of {list(ctx.children)}")
        ctx = ctx.children[tower]
    elif tower not in (None, "image"):
        raise ValueError(f"{type(model).__name__} has only an image tower; got tower={tower!r}")
    state = ctx.latest.state
    if state is None:
        raise RuntimeError("no forward pass has run since patching (or it ran disabled)")
    return state.source


def set_guide(
    model: nn.Module, embeddings: Tensor | None, project: Callable[[Tensor], Tensor] | None = None
) -> nn.Module:
    """Set the guiding embeddings of a model patched with ``guide=...`` for forwards that
    carry one modality only (``None`` clears them, and ``project``).

    Zero-shot classification with ``guide="text"``: encode the class prompts once, call
    ``set_guide(model, text_features)`` and every ``encode_image`` keeps the patches that
    align best with any class prompt (max over prompts). A forward with both modalities uses
    its own embeddings instead, for that forward only.

    An image-only model (timm ViT) patched with ``guide="text"`` scores each token by its
    feature in the model's pooled-feature space (the final norm applied per token: what the
    classifier head would read), mapped by ``project`` into the space of ``embeddings``:
    for a ViT aligned to a text encoder by a linear map ``W`` (LiT-style), pass
    ``project=lambda f: f @ W``. Without ``project`` the embeddings must live in the model's
    own feature space (e.g. rows of its classifier head). On two-tower models ``project``
    is applied after the tower's own projection.
    """
    ctx = _context(model)
    guided = [c for c in ctx.contexts() if c.guided_by]
    if not guided:
        raise ValueError("the model is not patched with guide='text' or guide='image'")
    if embeddings is not None:
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
            raise ValueError(
                "guide embeddings must be a float tensor of shape (num_embeddings, embed_dim), got "
                f"{getattr(embeddings, 'shape', type(embeddings).__name__)}"
            )
    if project is not None and not callable(project):
        raise TypeError(f"project must be a callable (features -> guide space), got {type(project).__name__}")
    guided[0].guide = None if embeddings is None else embeddings.detach()
    guided[0].guide_project = None if embeddings is None else project
    return model


@dataclass
class Description:
    """Effective tokens per layer and FLOPs of a patched model for one input shape.

    ``layers[i].merge_r`` is the r the schedule asks of that layer; ``merged[i]`` the tokens
    it merged away (fewer when the layer had fewer to merge: at most half of the mergeable
    ones). ``flops`` and ``flops_baseline`` count one forward of the whole input
    (``batch_size`` samples); ``config`` holds every setting, ``str()`` only those that
    differ from the defaults.
    """

    family: str
    config: dict
    input_shape: tuple[int, ...] | dict[str, tuple[int, ...]]
    layers: list[LayerRecord] = field(default_factory=list)
    flops: int | None = None
    flops_baseline: int | None = None
    merged: list[int] = field(default_factory=list)
    batch_size: int | None = None

    @property
    def flops_ratio(self) -> float | None:
        """Baseline FLOPs / reduced FLOPs (>= 1 when the patch saves compute)."""
        if not self.flops or not self.flops_baseline:
            return None
        return self.flops_baseline / self.flops

    @property
    def schedule(self) -> list[int]:
        """Tokens removed at each layer (pruned + merged, after capping)."""
        return [lr.tokens_in - lr.tokens_out for lr in self.layers]

    @property
    def settings(self) -> dict:
        """The settings that differ from :class:`ReductionConfig`'s defaults."""
        default = asdict(ReductionConfig())
        return {k: v for k, v in self.config.items() if k in default and v != default[k]}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flops_ratio"] = self.flops_ratio
        d["schedule"] = self.schedule
        return d

    def _flops_line(self) -> str:
        g = self.flops / 1e9
        if self.batch_size == 1:
            per = "per sample (batch 1)"
        elif self.batch_size:
            per = f"per forward of batch {self.batch_size} ({g / self.batch_size:.3f} per sample)"
        else:  # inputs of several batch sizes (e.g. texts and images)
            per = "per forward of the input above"
        line = f"GFLOPs {g:.3f} {per}"
        if self.flops_baseline:
            line += (f"; unpatched {self.flops_baseline / 1e9:.3f}, "
                     f"{self.flops_ratio:.2f}x fewer")
        return line

    def __str__(self) -> str:
        shape = self.input_shape
        if isinstance(shape, dict):
            shape = ", ".join(f"{k} {tuple(v)}" for k, v in shape.items())
        else:
            shape = tuple(shape)
        settings = ", ".join(f"{k}={v!r}" for k, v in self.settings.items()) or "defaults"
        lines = [f"vlprune {self.family}  input {shape}  settings: {settings}"]
        towers = any(lr.tower for lr in self.layers)
        head = f"{'tower':<6}" if towers else ""
        lines.append(f"{head}{'layer':>5} {'tokens in':>9} {'keep':>5} {'merged':>9} {'tokens out':>10}")
        merged = self.merged if len(self.merged) == len(self.layers) else [None] * len(self.layers)
        capped = False
        for lr, m in zip(self.layers, merged):
            keep = "-" if lr.prune_keep is None else f"{lr.prune_keep:g}"
            tower = f"{lr.tower:<6}" if towers else ""
            if m is None or m == lr.merge_r:
                done = str(lr.merge_r if m is None else m)
            else:
                done, capped = f"{m} of {lr.merge_r}", True
            lines.append(
                f"{tower}{lr.index:>5} {lr.tokens_in:>9} {keep:>5} {done:>9} {lr.tokens_out:>10}"
            )
        if capped:
            lines.append("('m of r': the layer had fewer than r tokens to merge; a layer merges "
                         "at most half of its mergeable tokens)")
        if self.flops is not None:
            lines.append(self._flops_line())
        return "\n".join(lines)


def _batch_size(inputs: Any) -> int | None:
    """The batch size of an example input: the first dimension its tensors share, else
    ``None``."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() else None
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    sizes = {int(v.shape[0]) for v in values if isinstance(v, Tensor) and v.dim()}
    return sizes.pop() if len(sizes) == 1 else None


def describe(
    model: nn.Module,
    inputs: Tensor | Mapping[str, Any] | tuple | None = None,
    *,
    input_size: tuple[int, ...] | None = None,
    batch_size: int = 1,
    flops: bool = True,
) -> Description:
    """Run one forward and report the tokens entering and leaving each layer, the tokens each
    layer merged, and the FLOPs (patched and unpatched, of one forward of the whole input).

    ``inputs`` defaults to a random input of the model's default size (or ``input_size``,
    without the batch dimension) and ``batch_size``: a tensor, or for models with a text
    tower the keyword inputs (token ids, and images for two-tower models) as any mapping,
    e.g. a tokenizer's ``BatchEncoding``.
    """
    from .eval.flops import count_flops

    _require_module(model, "describe")
    ctx = _context(model)
    adapter = find_adapter(model, ctx.family)
    if inputs is None:
        inputs = adapter.example_input(model, batch_size, input_size)
    elif isinstance(inputs, Mapping) and not isinstance(inputs, dict):
        inputs = dict(inputs)  # e.g. transformers' BatchEncoding, a UserDict
    was_training = model.training
    model.eval()
    layers: list[LayerRecord] = []
    merged: dict[tuple[str, int], int] = {}
    try:
        with torch.no_grad():
            # this thread's forward only
            with ctx.scoped("record", layers), ctx.scoped("merged", merged):
                if flops:
                    n = count_flops(lambda: run_model(model, inputs))
                else:
                    run_model(model, inputs)
                    n = n_base = None
            if flops:
                with disabled(model):
                    n_base = count_flops(lambda: run_model(model, inputs))
    finally:
        model.train(was_training)
    return Description(
        family=ctx.family,
        config={k: v for k, v in asdict(ctx.config).items() if k != "version"},
        input_shape=input_shapes(inputs),
        layers=layers,
        flops=n,
        flops_baseline=n_base,
        merged=[merged.get((lr.tower, lr.index), 0) for lr in layers],
        batch_size=_batch_size(inputs),
    )
