"""What every adapter shares: the per-model settings, class swapping for undo, the registry.

A patched model holds one :class:`PatchContext`, its settings (attribute ``_vlprune`` on the
root module); every patched submodule holds a reference to the same object
(``_vlprune_ctx``). The state of a forward in flight is per call, not per model: see
:mod:`vlprune.adapters.call`. Patching
swaps an instance's class for a dynamic subclass of that very class (so ``isinstance`` keeps
working and no parameter changes) and remembers the original for :func:`restore`. The
subclass looks like the original from outside (name, module, method signatures, class-level
constructors; :func:`_patched_class`); it refuses pickling and TorchScript with a message
saying what to do instead.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import ReductionConfig, parse_prune_schedule, parse_schedule
from ..core.scores import step_key
from ..core.state import TokenState
from .call import CallState, Tape, current, lookup, new_key, scoped, start

ATTR = "_vlprune"
_ORIG_CLASS = "_vlprune_orig_class"


class UnsupportedModelError(TypeError):
    """The model (or a part of it) has a structure no adapter knows."""


@dataclass
class LayerRecord:
    """Tokens seen by one reduction point during a recorded forward."""

    index: int
    tokens_in: int
    tokens_out: int
    merge_r: int
    prune_keep: float | None
    tower: str = ""


@dataclass(eq=False)
class PatchContext:
    """The settings of one patched model (or of one of its towers).

    Set by ``patch`` and ``configure`` and shared by every caller of the model. The state of
    a forward in flight is not here: :attr:`call` reaches it (:mod:`vlprune.adapters.call`),
    in the calling thread / task only, so one patched model serves concurrent forwards.
    """

    config: ReductionConfig
    family: str
    num_layers: int
    schedule: list[int] = field(default_factory=list)  # merge r per layer
    prune_schedule: list[float | None] = field(default_factory=list)  # keep rate per layer
    # Two-tower models: the root context holds one child context per tower ("image",
    # "text"), each with its tower's config (ReductionConfig.for_tower); num_layers is 0.
    children: dict[str, PatchContext] = field(default_factory=dict)
    tower: str = ""
    # Cross-modal guidance: the modality guiding this tower's pruning ("text" or "image"),
    # the tower's own head that maps token features (B, N, C) to that embedding space, and
    # the guiding embeddings (T, E) set by set_guide for forwards with one modality (a
    # forward with both modalities guides with its own, for that call only: `guide_embeds`).
    guided_by: str | None = None
    project: Callable[[Tensor], Tensor] | None = None
    guide: Tensor | None = None
    # set_guide(..., project=...): a map from the tower's feature space to the guide's space,
    # applied after ``project`` (an image-only model aligned to a text encoder, LiT-style).
    guide_project: Callable[[Tensor], Tensor] | None = None
    # identifies this context's call state (a copy of the model gets a new key)
    key: int = field(default_factory=new_key, init=False, repr=False)
    # training forwards begun since patch / configure: each draws its own random scores (a
    # tensor: a compiled graph counts steps without recompiling)
    train_calls: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64),
                                init=False, repr=False, compare=False)
    # the call state of the latest forward traced by torch.compile (a compiled graph cannot
    # set a context variable; see `call`)
    traced_call: CallState | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.refresh()

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name != "key":
                new.__dict__[name] = copy.deepcopy(value, memo)
        new.key = new_key()
        return new

    def refresh(self) -> None:
        """Resolve the per-layer schedules from the config (after patch or configure)."""
        cfg = self.config
        # the random score's training sequence restarts from its seed
        self.train_calls = torch.zeros((), dtype=torch.int64)
        if self.children:
            for name, child in self.children.items():
                child.config = cfg.for_tower(name, two_towers=len(self.children) > 1)
                child.refresh()
            return
        schedule = parse_schedule(cfg.merge_r, self.num_layers)
        prune = parse_prune_schedule(cfg.prune_keep, cfg.prune_layers, self.num_layers)
        self.schedule, self.prune_schedule = schedule, prune

    def contexts(self) -> list[PatchContext]:
        """This context and its towers' contexts."""
        return [self, *self.children.values()]

    # -- the calling thread's view ---------------------------------------------------------

    @property
    def call(self) -> CallState:
        """The state of this context's current (or latest) forward in the calling thread.

        Under ``torch.compile`` the forward's call state is a plain attribute
        (:attr:`traced_call`): inside a compiled graph every read of it is resolved while
        tracing, so concurrent compiled forwards still never share a token state; only the
        state left after the forward (what :func:`vlprune.get_source` reads) is the latest
        compiled forward's of any thread."""
        if torch.compiler.is_compiling():
            if self.traced_call is None:
                self.traced_call = CallState()
            return self.traced_call
        return current(self.key)

    @property
    def latest(self) -> CallState:
        """The call state to read after a forward: a compiled forward's if one ran since the
        latest eager forward (of any thread) began, else this thread's latest."""
        traced = self.traced_call
        return traced if traced is not None else current(self.key)

    @property
    def state(self) -> TokenState | None:
        """The token state of the calling thread's current (or latest) forward."""
        return self.call.state

    @property
    def enabled(self) -> bool:
        """False inside ``vlprune.disabled(model)`` (in the thread that entered it)."""
        return not lookup(self.key, "disabled", False)

    @property
    def record(self) -> list[LayerRecord] | None:
        """The list ``describe`` collects this thread's layer records in, or ``None``."""
        return lookup(self.key, "record")

    @property
    def guide_embeds(self) -> Tensor | None:
        """The guiding embeddings of this call: a two-tower forward's own, else set_guide's."""
        return lookup(self.key, "guide", self.guide)

    def scoped(self, name: str, value) -> contextlib.AbstractContextManager:
        """Set ``name`` for this context and its towers, in the calling thread only, for a
        ``with`` block (``disabled``, ``record``)."""
        return scoped([c.key for c in self.contexts()], name, value)

    @property
    def reduces(self) -> bool:
        """Does a forward in the calling thread remove any token (at some layer of some tower)?
        ``False`` also for settings that reduce nothing (``merge_r=0``, ``prune_keep=1.0``):
        those run exactly as upstream, refusing nothing upstream accepts."""
        if self.children:
            return self.enabled and any(c.reduces for c in self.children.values())
        return self.enabled and any(self.needs_attn(i) for i in range(len(self.schedule)))

    @property
    def prunes(self) -> bool:
        """Does some layer's schedule prune (keep rate below 1)?"""
        return any(k is not None and k < 1.0 for k in self.prune_schedule)

    def needs_attn(self, layer: int) -> bool:
        """Does the block at ``layer`` reduce tokens (and so need the attention inputs)?"""
        keep = self.prune_schedule[layer]
        return self.schedule[layer] > 0 or (keep is not None and keep < 1.0)

    def begin(self, num_protected: int, training: bool = False) -> TokenState | None:
        """Start the call state of a new forward pass in the calling thread. The ``random``
        score draws the same positions at every eval forward (its key is the seed); in
        training (``training``: the root module's mode) the n-th forward since patch /
        configure draws with its own key (:func:`~vlprune.core.scores.step_key`), so steps
        differ but the sequence repeats for the same seed. With gradients on, a forward that
        reduces keeps a :class:`~vlprune.adapters.call.Tape` of its blocks' first runs, which
        a block recomputed by gradient checkpointing replays
        (:mod:`vlprune.adapters.recompute`)."""
        if torch.compiler.is_compiling():
            call = self.traced_call = CallState()
        else:
            self.traced_call = None
            call = start(self.key)
        if not self.enabled:
            return None
        call.state = TokenState(num_protected=num_protected, trace_source=self.config.trace_source)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and self.reduces:
            call.tape = Tape()  # gradient checkpointing replays the blocks' first runs
        if self.config.prune_score == "random" and self.prunes:
            call.random_key = self.config.prune_seed
            if training:
                call.random_key = step_key(self.config.prune_seed, self.train_calls)
                self.train_calls.add_(1)
        return call.state

    def log(self, layer: int, tokens_in: int, tokens_out: int) -> None:
        record = self.record
        if record is not None and self.enabled and self.call.replay is None:  # not a recompute
            record.append(
                LayerRecord(
                    layer, tokens_in, tokens_out, self.schedule[layer], self.prune_schedule[layer],
                    self.tower,
                )
            )


def config_prunes(config: ReductionConfig) -> bool:
    """Does ``config`` prune its tower (``prune_keep`` set and below 1 somewhere)? A keep
    rate of 1.0 everywhere removes nothing, so it needs nothing pruning needs (a class token
    for class-attention scores, ...)."""
    keep = config.prune_keep
    return keep is not None and any(k < 1.0 for k in (keep if isinstance(keep, list) else [keep]))


class RootMixin:
    """Behaviour every patched *root* model shares (adapters' model mixins derive from it)."""

    def _vlprune_start(self, num_protected: int) -> None:
        """Start a forward pass: a fresh token state (and, with gradients on, the tape that
        gradient checkpointing replays: :mod:`vlprune.adapters.recompute`)."""
        self._vlprune.begin(num_protected, training=self.training)

    def _vlprune_check_nlc(self, method, *args, **kwargs) -> None:
        """``forward_intermediates`` may only return token sequences while reducing."""
        if self._vlprune.reduces:
            fmt = inspect.signature(method).bind(*args, **kwargs).arguments.get("output_fmt", "NCHW")
            if fmt != "NLC":
                raise ValueError(
                    "forward_intermediates with output_fmt='NCHW' needs every patch token, but "
                    "token reduction is on: pass output_fmt='NLC' (sequences of merged tokens) "
                    "or run inside `with vlprune.disabled(model):`"
                )


# -- the patched classes ----------------------------------------------------------------------

_CLASS_CACHE: dict[tuple[type, type], type] = {}
_UPSTREAM: dict[type, type] = {}  # patched class -> the upstream class it extends


def upstream_class(cls: type) -> type:
    """The upstream class a class made by :func:`swap_class` extends (any other class: itself)."""
    return _UPSTREAM.get(cls, cls)


def _refuse_pickle(self, protocol):
    raise TypeError(
        f"a vlprune-patched {upstream_class(type(self)).__name__} cannot be pickled (its classes "
        "are made at patch time): save model.state_dict(), which patching leaves unchanged, "
        "or call vlprune.unpatch(model) before torch.save(model) and patch again after loading"
    )


def _refuse_script(self):
    # torch.jit.script calls this on every module before compiling anything
    raise RuntimeError(
        f"torch.jit.script cannot compile a vlprune-patched {upstream_class(type(self)).__name__}: "
        "token reduction keeps per-call state in Python that TorchScript cannot express. Script "
        "the unpatched model instead: call vlprune.unpatch(model) first (and patch again after "
        "scripting), or script a copy made before patching; torch.compile runs patched models"
    )


def _deepcopy(self, memo):
    # what deepcopy does by default, spelled out because __reduce_ex__ refuses
    new = type(self).__new__(type(self))
    memo[id(self)] = new
    for key, value in self.__dict__.items():
        new.__dict__[key] = copy.deepcopy(value, memo)
    return new


def _copy(self):
    # what copy.copy does by default for a module (a new object sharing the attributes)
    new = type(self).__new__(type(self))
    new.__dict__.update(self.__dict__)
    return new


def _with_signature(fn: Callable, upstream: Callable) -> Callable:
    """``fn`` (a mixin's method, shared by every class the mixin patches) as a method of one
    patched class: the same code, shown with the signature and docstring of ``upstream``, the
    method it overrides (``inspect.signature``, ``help``, transformers' argument routing)."""

    def method(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    method.__name__, method.__qualname__, method.__module__ = fn.__name__, fn.__qualname__, fn.__module__
    method.__doc__ = upstream.__doc__
    with contextlib.suppress(TypeError, ValueError):  # no signature (a builtin): keep ours
        method.__signature__ = inspect.signature(upstream)
    return method


def _upstream_classmethod(cls: type, name: str) -> classmethod:
    """``cls``'s classmethod ``name`` bound to ``cls``: called on the patched class
    (``from_pretrained``, ``_from_config``, ...) it builds and answers as upstream does."""
    func = getattr(cls, name).__func__

    def method(patched, *args, **kwargs):
        return func(cls, *args, **kwargs)

    method.__name__, method.__qualname__ = name, f"{cls.__qualname__}.{name}"
    method.__doc__ = func.__doc__
    with contextlib.suppress(TypeError, ValueError):
        method.__signature__ = inspect.signature(func)
    return classmethod(method)


def _patched_class(mixin: type, cls: type) -> type:
    """The class ``mixin + cls``, looking like ``cls`` from outside: the same name, qualified
    name and module (what transformers and others look classes up by: ``is_custom_code``,
    checkpoint conversion mappings, ``config.architectures``, output capture, loss type), the
    same method signatures, and class-level constructors that build upstream instances. It
    refuses pickling and TorchScript with a message saying what to do instead."""
    mixin_names = {n for base in mixin.__mro__ if base is not object for n in vars(base)}
    ns: dict = {
        "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
        "__reduce_ex__": _refuse_pickle, "__deepcopy__": _deepcopy, "__copy__": _copy,
        "__prepare_scriptable__": _refuse_script,
    }
    seen: set[str] = set()
    for base in mixin.__mro__:
        for name, fn in vars(base).items():
            if name in seen or name.startswith("_") or not inspect.isfunction(fn):
                continue
            seen.add(name)
            upstream = getattr(cls, name, None)
            if inspect.isfunction(upstream):
                ns[name] = _with_signature(fn, upstream)
    for base in cls.__mro__:
        for name, value in vars(base).items():
            if (isinstance(value, classmethod) and name not in ns and name not in mixin_names
                    and not (name.startswith("__") and name.endswith("__"))):
                ns[name] = _upstream_classmethod(cls, name)
    new_cls = type(cls.__name__, (mixin, cls), ns)
    _UPSTREAM[new_cls] = cls
    return new_cls


def upstream_arguments(module: nn.Module, method: str, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call of the upstream ``method`` of a patched ``module``, by name
    (extra keyword arguments merged in): what a patched method that takes ``*args,
    **kwargs`` was given, as upstream's signature assigns it."""
    sig = inspect.signature(getattr(upstream_class(type(module)), method))
    bound = sig.bind(module, *args, **kwargs).arguments
    named = {}
    for i, (name, value) in enumerate(bound.items()):
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif i > 0:  # self
            named[name] = value
    return named


def swap_class(module: nn.Module, mixin: type, ctx: PatchContext, **attrs) -> None:
    """Give ``module`` the class ``mixin + type(module)`` (:func:`_patched_class`) and a
    reference to ``ctx``."""
    if _ORIG_CLASS in module.__dict__:  # one mixin per module: restore() puts back one class
        raise RuntimeError(f"{type(module).__name__} is swapped already; combine the mixins")
    cls = upstream_class(type(module))  # an instance of a patched class made without a patch
    new_cls = _CLASS_CACHE.get((mixin, cls))
    if new_cls is None:
        new_cls = _CLASS_CACHE[(mixin, cls)] = _patched_class(mixin, cls)
    module.__dict__[_ORIG_CLASS] = cls
    module.__dict__["_vlprune_ctx"] = ctx
    for k, v in attrs.items():
        module.__dict__[f"_vlprune_{k}"] = v
    module.__class__ = new_cls


def add_pre_hook(module: nn.Module, hook: Callable, ctx: PatchContext) -> None:
    """Register a forward pre-hook (with kwargs) on ``module`` for the life of the patch:
    :func:`restore` removes it. The hook finds ``ctx`` in ``module._vlprune_hook_ctx`` (a
    deepcopy of the model then reaches the copy's settings)."""
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    module.__dict__.setdefault("_vlprune_hook_ids", []).append(handle.id)
    module.__dict__["_vlprune_hook_ctx"] = ctx


def restore(model: nn.Module) -> None:
    """Undo every :func:`swap_class` and :func:`add_pre_hook` below (and including)
    ``model``; drop our attributes."""
    for module in model.modules():
        orig = module.__dict__.get(_ORIG_CLASS)
        if orig is not None:
            module.__class__ = orig
        for hook_id in module.__dict__.get("_vlprune_hook_ids", ()):
            module._forward_pre_hooks.pop(hook_id, None)
            module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        for key in [k for k in module.__dict__ if k.startswith(ATTR)]:
            del module.__dict__[key]


# -- configure: new settings checked and built as at patch time, atomically -----------------


class PatchSnapshot:
    """Everything a patch put on ``model`` -- each module's class, its ``_vlprune*``
    attributes, its forward pre-hooks -- to put back exactly (:meth:`put_back`) after a failed
    or trial re-patch: the same objects, so every patched module keeps its context."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = []
        for m in model.modules():
            attrs = {k: v for k, v in m.__dict__.items() if k.startswith(ATTR)}
            hooks = None
            if m._forward_pre_hooks or m._forward_pre_hooks_with_kwargs:
                hooks = (dict(m._forward_pre_hooks), dict(m._forward_pre_hooks_with_kwargs))
            self.modules.append((m, m.__class__, attrs, hooks))

    def put_back(self) -> None:
        restore(self.model)  # whatever a trial left, then the snapshot
        for m, cls, attrs, hooks in self.modules:
            m.__class__ = cls
            m.__dict__.update(attrs)
            if hooks is not None:
                for now, saved in zip((m._forward_pre_hooks, m._forward_pre_hooks_with_kwargs), hooks):
                    now.clear()
                    now.update(saved)


def _context_paths(ctx: PatchContext, prefix: tuple[str, ...] = ()) -> dict[int, tuple[str, ...]]:
    """``id`` of each context of the tree -> its path of tower names (the root: ``()``)."""
    out = {id(ctx): prefix}
    for name, child in ctx.children.items():
        out.update(_context_paths(child, (*prefix, name)))
    return out


def _describe(value, paths: dict[int, tuple[str, ...]], depth: int = 0):
    """A patch attribute, comparable between two patches of the same model: a context by its
    place in its tree, plain values by value, vlprune's own helper objects (FastV's point) by
    their attributes, anything else (modules, functions) by identity."""
    if isinstance(value, PatchContext):
        return ("context", paths.get(id(value)))
    if value is None or isinstance(value, (bool, int, float, str, type)):
        return value
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_describe(v, paths, depth) for v in value))
    if (depth < 2 and not isinstance(value, nn.Module) and not callable(value)
            and type(value).__module__.startswith("vlprune.") and hasattr(value, "__dict__")):
        return (type(value), tuple(sorted((k, _describe(v, paths, depth + 1)) for k, v in vars(value).items())))
    return ("object", id(value))


def patch_footprint(model: nn.Module, ctx: PatchContext) -> list:
    """What the patch with root context ``ctx`` put on ``model``, comparable with another
    patch's: the context tree's shape and types; per module its class, its ``_vlprune*``
    attributes and our forward pre-hooks (:func:`_describe`)."""
    paths = _context_paths(ctx)
    tree = sorted((path, type(c).__qualname__) for c in _tree(ctx) for path in [paths[id(c)]])
    out: list = [tree]
    for name, m in model.named_modules():
        d = m.__dict__
        ids = d.get("_vlprune_hook_ids", ())
        attrs = sorted((k, _describe(v, paths)) for k, v in d.items()
                       if k.startswith(ATTR) and k != "_vlprune_hook_ids")
        hooks = [_describe(m._forward_pre_hooks.get(i), paths) for i in ids]
        if attrs or hooks:
            out.append((name, m.__class__, attrs, hooks))
    return out


def _tree(ctx: PatchContext) -> list[PatchContext]:
    return [ctx, *(c for child in ctx.children.values() for c in _tree(child))]


def _carry_guides(old: PatchContext, new: PatchContext) -> None:
    """``set_guide``'s embeddings (and map) stay where the same tower is still guided by the
    same modality; elsewhere they go with the guidance."""
    for name, child in new.children.items():
        if name in old.children:
            _carry_guides(old.children[name], child)
    if new.guided_by is not None and new.guided_by == old.guided_by:
        new.guide, new.guide_project = old.guide, old.guide_project


def _take_settings(old: PatchContext, new: PatchContext) -> None:
    """Make ``old`` (the context the patched modules hold) carry ``new``'s settings; the
    trees have the same shape. ``old`` keeps its key (the calling threads' call state)."""
    for k, v in new.__dict__.items():
        if k not in ("key", "children"):
            old.__dict__[k] = v
    for name, child in new.children.items():
        _take_settings(old.children[name], child)


def reconfigure(model: nn.Module, adapter: Adapter, config: ReductionConfig) -> bool:
    """Give the patched ``model`` the settings ``config`` as :func:`vlprune.patch` would:
    the adapter's checks and context build on the model's upstream classes, then its patch.

    When that patch puts on the model what the current one holds (the same classes,
    attributes and hooks per module, the same context tree), the current contexts take the
    new settings in place and the model keeps its patch (the same objects); otherwise the new
    patch replaces it (a re-patch; ``set_guide``'s embeddings carried over where still
    valid). Atomic: on any error the model is left exactly as it was. Returns whether it
    re-patched. Not safe while other threads run forwards of ``model`` (for the moment of
    the checks the model has its upstream classes)."""
    old: PatchContext = model.__dict__[ATTR]
    before = patch_footprint(model, old)
    snapshot = PatchSnapshot(model)
    try:
        restore(model)
        adapter.check(model, config)
        new = adapter.make_context(model, config)
        adapter.apply(model, new)
        _carry_guides(old, new)
        same = patch_footprint(model, new) == before
    except BaseException:
        snapshot.put_back()
        raise
    if same:
        snapshot.put_back()
        _take_settings(old, new)
    return not same


class Adapter(ABC):
    """Knows where the reduction points of one model family are.

    Subclasses set ``name`` and ``supported`` (shown in errors) and implement the methods.
    """

    name: str = ""
    supported: str = ""
    towers: tuple[str, ...] = ("image",)  # ("text",) for text models, both for CLIP-like
    full_text_output: bool = False  # takes text_output="compact" (BERT-style encoders)

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """True when this adapter handles ``model``."""

    @abstractmethod
    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        """Raise :class:`UnsupportedModelError` if the structure is not the one we know."""

    @abstractmethod
    def num_layers(self, model: nn.Module) -> int:
        """How many reduction points (layers) the schedule spans."""

    @abstractmethod
    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        """Swap the classes of the model's reduction points (see :func:`swap_class`)."""

    def tower_layers(self, model: nn.Module, tower: str) -> int:
        """Layers of one tower (models with a ``text`` tower override this)."""
        return self.num_layers(model)

    def make_context(self, model: nn.Module, config: ReductionConfig) -> PatchContext:
        """The context of a new patch: one plain context for an image model; for models with
        a text tower, a root context holding one child context per tower."""
        if config.has_visual_settings:
            raise ValueError(
                f"visual_keep/visual_score, llm_layer/llm_keep, text_keep and temporal_keep/"
                f"temporal_threshold reduce the visual, video and prompt tokens a vision-language "
                f"model (LLaVA) feeds its language model; "
                f"{type(model).__name__} has none: use merge_r or prune_keep"
            )
        if config.text_output != "full" and not self.full_text_output:
            raise ValueError(
                f"text_output={config.text_output!r} chooses between the full-length and the compact "
                f"output of BERT-style encoders (hf_bert); {type(model).__name__} ({self.name}) "
                "returns its reduced sequence as it is: leave text_output at 'full'"
            )
        head = None
        if config.guide is not None and set(self.towers) != {"image", "text"}:
            if config.guide == "text" and self.towers == ("image",):
                head = self.token_head(model)
            if head is None:
                raise ValueError(
                    f"guide={config.guide!r} needs a model with an image and a text tower (CLIP, "
                    f"SigLIP), or guide='text' on an image model whose tokens map to its pooled "
                    f"features (timm ViT with class-token or average pooling, guided through "
                    f"vlprune.set_guide); {type(model).__name__} ({self.name}) has only the "
                    f"{self.towers[0]} tower"
                )
        if self.towers == ("image",):
            set_text = [n for n in ReductionConfig.field_names() if n.startswith("text_") and n != "text_output"
                        and getattr(config, n) is not None]
            if set_text:
                raise ValueError(
                    f"{', '.join(set_text)} set but {type(model).__name__} has no text tower; "
                    "use the unprefixed options (merge_r, prune_keep, ...)"
                )
            ctx = PatchContext(config=config, family=self.name, num_layers=self.num_layers(model))
            if head is not None:
                ctx.guided_by, ctx.project = "text", head
            return ctx
        two = len(self.towers) > 1
        children = {
            t: PatchContext(
                config=config.for_tower(t, two_towers=two), family=self.name,
                num_layers=self.tower_layers(model, t), tower=t,
            )
            for t in self.towers
        }
        if config.guide == "text":
            children["image"].guided_by = "text"
        elif config.guide == "image":
            children["text"].guided_by = "image"
        return PatchContext(config=config, family=self.name, num_layers=0, children=children)

    def token_head(self, model: nn.Module) -> Callable[[Tensor], Tensor] | None:
        """For ``guide="text"`` on an image-only model: the map of the model's token features
        ``(B, N, C)`` to the space of its pooled features (what the classifier head reads), or
        ``None`` when the model has no such per-token map (then the guide is refused)."""
        return None

    @abstractmethod
    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        """The model's default input shape without the batch dimension, e.g. ``(3, 224, 224)``."""

    def example_input(
        self, model: nn.Module, batch_size: int = 1, input_size: tuple[int, ...] | None = None
    ) -> Tensor:
        """A random input the model accepts (for describe and bench), on its device and dtype.
        Adapters whose models take something other than one float tensor override this."""
        device, dtype = device_dtype(model)
        size = input_size or self.default_input_size(model)
        return torch.randn(batch_size, *size, device=device, dtype=dtype)


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(factory: Callable[[], Adapter]) -> Callable[[], Adapter]:
    """Class decorator: register one instance of an adapter (first match wins)."""
    adapter = factory()
    if adapter.name in _ADAPTERS:
        raise ValueError(f"adapter {adapter.name!r} is registered twice")
    _ADAPTERS[adapter.name] = adapter
    return factory


def supported_text() -> str:
    return "; ".join(f"{a.name} ({a.supported})" for a in _ADAPTERS.values())


def find_adapter(model: nn.Module, family: str | None = None) -> Adapter:
    """The adapter for ``model``: ``family`` by name, else the first whose ``matches`` is true."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if family is not None:
        if family not in _ADAPTERS:
            raise ValueError(f"unknown family {family!r}; known families: {sorted(_ADAPTERS)}")
        return _ADAPTERS[family]
    for adapter in _ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    raise UnsupportedModelError(
        f"no vlprune adapter supports {type(model).__module__}.{type(model).__qualname__}. "
        f"Supported: {supported_text()}"
    )


def class_path_in_mro(model: nn.Module) -> list[str]:
    """``module.qualname`` of every class in the model's MRO (detection by name, no imports)."""
    return [f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__]


def hf_image_input_size(vision_config) -> tuple[int, int, int]:
    """``(channels, height, width)`` of a Hugging Face vision config (``image_size`` is an int
    or a pair)."""
    size = vision_config.image_size
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    return (vision_config.num_channels, h, w)


def device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def run_model(model: nn.Module, inputs):
    """Call ``model`` on an example input: a tensor, a tuple of positional inputs or a dict of
    keyword inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def input_shapes(inputs) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
    """The shape of an example input, or the shape of each of its named parts."""
    if isinstance(inputs, dict):
        return {k: tuple(v.shape) for k, v in inputs.items() if isinstance(v, Tensor)}
    if isinstance(inputs, tuple):
        return {str(i): tuple(v.shape) for i, v in enumerate(inputs) if isinstance(v, Tensor)}
    return tuple(inputs.shape)
