"""One tester for every adapter family, after PEFT's common tester.

A family registers by subclassing :class:`AdapterTester` in its test module, with one
:class:`Family` per tiny model: how to build it, feed it, which settings apply (and which of
them remove no token), how many tokens each tower protects and how to read its outputs::

    class TestTimmCommon(AdapterTester):
        families = {"test_vit": Family(build=..., inputs=..., settings=..., identity=...,
                                       towers=...)}

Every registered model then gets every check below, for each applicable setting and batch
size (``test_invariants``), the concurrency checks for its ``concurrency`` settings
(``test_concurrent_forwards``, ``test_concurrent_disabled``), and once per model the check that
``configure`` refuses what ``patch`` refuses (``test_refusals``: the refusals every family of
its kind has, :func:`default_refusals`, plus the family's own ``refusals``). The expected token counts are
computed here from the documented rules (README, ``vlprune/config.py`` and
``vlprune/core/select.py``), never with the library's own helpers:

- ``merge_r``: an int is the same r at every layer; ``(r, inflection)`` is ToMe's ramp
  (``lo = int(r * (1 - inflection))``, ``hi = 2 r - lo``, layer ``i`` gets
  ``int(lo + (hi - lo) / (L - 1) * i)``); a list is padded with zeros. Each layer merges at
  most half of its unprotected tokens: ``min(r, n // 2)``.
- ``prune_keep``: ``ceil(keep * n)`` of the ``n`` unprotected tokens stay, at least one and at
  most ``n``; a fused token (``prune_fuse``) is added when something was dropped. Pruning runs
  before merging in a layer that does both.
- Text towers apply both rules per row to each row's real tokens; the batch keeps the longest.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from helpers import vlprune_attrs
from torch import Tensor, nn

import vlprune

THREADS = 4
REPEATS = 3
JOIN_TIMEOUT = 120.0  # seconds a concurrency test may take before it counts as hung


# --- what a family registers ------------------------------------------------------------------


@dataclass(frozen=True)
class Tower:
    """One tower's token layout for a given input: ``protected`` tokens (class, distillation,
    register tokens; a text tower's BOS / EOT) come first, then each row's ``real`` unprotected
    tokens (one count per row: a text's own length, or every patch of an image), then padding.
    ``layers``: the tower's reducing layers. ``width``: the padded input's length; a text tower
    that reduces nothing runs upstream on all of it, one that reduces first cuts the columns
    that are padding in every row."""

    protected: int
    real: list[int]
    layers: int
    width: int | None = None  # tokens of the padded input; ``None``: no padding


def call_model(model: nn.Module, inputs: Any) -> Any:
    """The default forward: ``model(**inputs)`` for a dict, ``model(inputs)`` otherwise."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def tensors(out: Any, inputs: Any) -> list[Tensor]:
    """The default output reader: a tensor, or the non-scalar tensors of a tuple / list."""
    if isinstance(out, Tensor):
        return [out]
    return [o for o in out if isinstance(o, Tensor) and o.dim() > 0]


@dataclass(frozen=True)
class Family:
    """One tiny model and how the tester drives it.

    build: a fresh model in eval mode (seeded: two builds are equal).
    inputs: ``(batch, seed)`` -> the forward's inputs (a tensor or a dict of keywords); seeds
        give different inputs (different texts and lengths where the family has them).
    settings: setting name -> ``vlprune.patch`` keywords (``None``: does not apply here).
    identity: the settings that remove no token -> the largest difference allowed against the
        unpatched output (``0.0``: bit-exact).
    towers: ``(model, inputs)`` -> ``{"image" | "text": Tower}``: the expected tokens per layer
        are computed from it; ``None`` with ``expected_layers`` for families that record other
        reduction points.
    expected_layers: ``(keywords, inputs)`` -> ``[(tower, tokens in, tokens out)]`` that
        ``describe`` must report, instead of the per-layer rule (LLaVA's visual selection and
        FastV).
    run: the forward the checks call (default :func:`call_model`; LLaVA generates).
    outputs: ``(output, inputs)`` -> the tensors compared between runs.
    same_shape: reduced outputs keep the unpatched shapes (all of them, or the indices given).
    batches: batch sizes of the invariants.
    trace_source: the family traces sources: check sizes and protected tokens through
        ``vlprune.get_source``.
    changes_atol: a reducing setting must change some output by more than this (``None``:
        not checked).
    other: settings ``configure`` switches to and back from.
    concurrency: settings of the concurrency checks (reducing ones).
    check: an extra family check ``(model, inputs, output, description)`` on the patched model.
    refusals: ``(setting, keywords)`` pairs ``patch`` refuses on this model, besides
        :func:`default_refusals`; the error must name ``setting``.
    """

    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], Any]
    settings: Mapping[str, dict | None]
    identity: Mapping[str, float] = field(default_factory=dict)
    towers: Callable[[nn.Module, Any], dict[str, Tower]] | None = None
    expected_layers: Callable[[dict, Any], list[tuple[str, int, int]]] | None = None
    run: Callable[[nn.Module, Any], Any] = call_model
    outputs: Callable[[Any, Any], list[Tensor]] = tensors
    same_shape: bool | tuple[int, ...] = True
    batches: tuple[int, ...] = (1, 3)
    trace_source: bool = True
    other: dict = field(default_factory=lambda: {"merge_r": 1})
    changes_atol: float | None = 0.0
    concurrency: tuple[str, ...] = ()
    check: Callable[[nn.Module, Any, Any, Any], None] | None = None
    refusals: tuple[tuple[str, dict], ...] = ()


@dataclass(frozen=True)
class Case:
    model: str
    family: Family
    setting: str
    kw: dict
    batch: int = 0

    @property
    def id(self) -> str:
        return f"{self.model}-{self.setting}" + (f"-b{self.batch}" if self.batch else "")


# --- the expected schedule, from the documented rules ------------------------------------------


def tome_schedule(merge_r, layers: int) -> list[int]:
    """Requested r per layer, ToMe's rule (before the cap at half the tokens)."""
    if merge_r is None:
        return [0] * layers
    if isinstance(merge_r, list):
        return list(merge_r) + [0] * (layers - len(merge_r))
    r, inflection = merge_r if isinstance(merge_r, tuple) else (merge_r, 0.0)
    if layers == 1:
        return [r]
    lo = int(r * (1.0 - inflection))
    hi = 2 * r - lo
    return [int(lo + (hi - lo) / (layers - 1) * i) for i in range(layers)]


def tower_options(kw: dict, tower: str, two_towers: bool) -> dict:
    """The options one tower takes (README, "Options per tower"): the image tower the
    unprefixed ones; a text tower ``text_merge_r`` (else ``merge_r``) and the ``text_prune_*``
    ones (drop only); a text model alone the unprefixed ones where no ``text_*`` is given."""
    if tower != "text":
        return dict(merge_r=kw.get("merge_r", 0), keep=kw.get("prune_keep"),
                    layers=kw.get("prune_layers"), fuse=kw.get("prune_fuse", False),
                    recycle=kw.get("prune_recycle", False))
    r = kw.get("text_merge_r")
    r = kw.get("merge_r", 0) if r is None else r
    if kw.get("text_prune_keep") is not None or two_towers:
        return dict(merge_r=r, keep=kw.get("text_prune_keep"), layers=kw.get("text_prune_layers"),
                    fuse=False, recycle=False)
    return dict(merge_r=r, keep=kw.get("prune_keep"), layers=kw.get("prune_layers"),
                fuse=kw.get("prune_fuse", False), recycle=kw.get("prune_recycle", False))


def keep_schedule(keep, prune_layers, layers: int) -> list[float | None]:
    """Keep rate per layer: ``keep`` (one float, or one per pruning layer) at ``prune_layers``."""
    out: list[float | None] = [None] * layers
    if keep is None:
        return out
    assert prune_layers is not None, "tester settings name their prune_layers"
    keeps = keep if isinstance(keep, (list, tuple)) else [keep] * len(prune_layers)
    for layer, k in zip(prune_layers, keeps):
        out[layer] = k
    return out


def expected_tower_layers(opts: dict, tower: Tower) -> list[tuple[int, int, int, float | None]]:
    """``(tokens in, tokens out, merge r, keep)`` per layer of one tower."""
    P = tower.protected
    rs = tome_schedule(opts["merge_r"], tower.layers)
    keeps = keep_schedule(opts["keep"], opts["layers"], tower.layers)
    rows = list(tower.real)
    if not any(rs) and all(k in (None, 1.0) for k in keeps):  # runs as upstream, padding included
        n = tower.width or P + max(rows)
        return [(n, n, 0, k) for k in keeps]
    out = []
    for r, keep in zip(rs, keeps):
        n_in = P + max(rows)
        new = []
        for n in rows:
            if keep is not None and keep < 1.0:
                kept = min(n, max(1, math.ceil(keep * n)))
                if kept < n:
                    n = kept + (1 if opts["fuse"] else 0)
            n -= min(r, n // 2)
            new.append(n)
        rows = new
        out.append((n_in, P + max(rows), r, keep))
    return out


# --- checks -------------------------------------------------------------------------------


def assert_same(got: list[Tensor], want: list[Tensor], atol: float = 0.0, what: str = "") -> None:
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}: output {i} has shape {tuple(g.shape)}, want {tuple(w.shape)}"
        if atol == 0.0:
            assert torch.equal(g, w), f"{what}: output {i} differs by {(g - w).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(g, w, atol=atol, rtol=0, msg=lambda m, i=i: f"{what}: output {i}: {m}")


def _classes(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


def _contexts(model: nn.Module) -> set[int]:
    return {id(m.__dict__[k]) for m in model.modules() for k in ("_vlprune", "_vlprune_ctx") if k in m.__dict__}


def _tree(ctx) -> set[int]:
    """The root context and its towers' contexts, recursively."""
    return {id(ctx)}.union(*(_tree(c) for c in getattr(ctx, "children", {}).values()))


def check_tokens(fam: Family, model: nn.Module, kw: dict, inputs: Any):
    """Tokens per layer follow the schedules (through ``describe``); returns the description
    and the towers."""
    desc = vlprune.describe(model, inputs, flops=False)
    got = desc.layers
    if fam.expected_layers is not None:
        want = fam.expected_layers(kw, inputs)
        assert [(lr.tower, lr.tokens_in, lr.tokens_out) for lr in got] == want, f"describe says {got}"
        return desc, {}
    towers = fam.towers(model, inputs)
    for name, tower in towers.items():
        layers = [lr for lr in got if lr.tower == name] if len(towers) > 1 else got
        opts = tower_options(kw, name, two_towers=len(towers) > 1)
        want = expected_tower_layers(opts, tower)
        assert [(lr.tokens_in, lr.tokens_out, lr.merge_r, lr.prune_keep) for lr in layers] == want, (
            f"{name} tower: describe says {[(lr.tokens_in, lr.tokens_out) for lr in layers]}"
        )
    return desc, towers


def token_sizes(model: nn.Module, tower: str | None) -> Tensor | None:
    """``(B, N, 1)`` sizes of the tokens of the calling thread's latest forward (``None``
    while nothing was merged), read from the patch context as the source map is."""
    ctx = model._vlprune
    if ctx.children:
        ctx = ctx.children[tower or next(iter(ctx.children))]
    state = ctx.state
    return None if state is None else state.size


def check_sources(model: nn.Module, kw: dict, towers: dict[str, Tower], batch: int) -> int:
    """Sizes and protected tokens, through ``get_source``: each protected token holds exactly
    itself and stays first, no other token holds a protected one, no input token is held
    twice, real tokens never merge with padding, and (without dropping) every real input token
    is held once. Returns the number of towers that had a source map."""
    checked = 0
    for name, tower in towers.items():
        opts = tower_options(kw, name, two_towers=len(towers) > 1)
        keeps = keep_schedule(opts["keep"], opts["layers"], tower.layers)
        if not any(tome_schedule(opts["merge_r"], tower.layers)) and all(k in (None, 1.0) for k in keeps):
            continue  # the tower removes no token: it runs as upstream (text towers: no token state)
        source = vlprune.get_source(model, name if len(towers) > 1 else None)
        if source is None:  # nothing merged or dropped: every token holds only itself
            continue
        checked += 1
        P = tower.protected
        B, N, N0 = source.shape
        assert B == batch and N0 == P + max(tower.real), (name, tuple(source.shape))
        assert torch.equal(source[:, :P, :], torch.eye(N0)[:P].expand(B, P, N0)), f"{name}: protected"
        assert not source[:, P:, :P].any(), f"{name}: a protected token was merged into another"
        held = source.sum(dim=1)  # (B, N0): how often each input token is held
        assert bool((held <= 1).all()), f"{name}: an input token is held twice"
        drops = any(k is not None and k < 1.0 for k in keeps)
        drops = drops and not (opts["fuse"] or opts["recycle"])
        for b, n in enumerate(tower.real):
            real = torch.zeros(N0, dtype=torch.bool)
            real[: P + n] = True  # canonical order: protected, real, padding
            rows = source[b]
            mixed = (rows[:, real].sum(-1) > 0) & (rows[:, ~real].sum(-1) > 0)
            assert not mixed.any(), f"{name}: a real token merged with padding (row {b})"
            size = token_sizes(model, name if len(towers) > 1 else None)
            if size is not None:  # the sizes the model weighs tokens by are the source counts
                assert torch.equal(rows.sum(-1), size[b].reshape(-1)), f"{name}: sizes differ from sources"
            if not drops:  # sizes sum to the input count
                assert torch.equal(held[b, real], torch.ones(P + n)), f"{name}: row {b} lost tokens"
                assert rows[:, real].sum() == P + n
    return checked


def check_invariants(case: Case) -> None:
    fam, kw, batch = case.family, case.kw, case.batch
    model = fam.build()
    inputs = fam.inputs(batch, 1)
    classes = _classes(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    read = lambda m: fam.outputs(fam.run(m, inputs), inputs)  # noqa: E731
    with torch.no_grad():
        ref = read(model)
        vlprune.patch(model, **kw, **({"trace_source": True} if fam.trace_source else {}))
        cfg = vlprune.get_config(model)
        out = read(model)
        assert len(out) == len(ref)
        keep_shape = range(len(ref)) if fam.same_shape is True else fam.same_shape or ()
        for i in keep_shape:
            assert out[i].shape == ref[i].shape, f"output {i}: {tuple(out[i].shape)} != {tuple(ref[i].shape)}"
        assert all(torch.isfinite(o.float()).all() for o in out)

        # r = 0 / keep = 1.0 give the unpatched output; reducing settings change it
        if case.setting in fam.identity:
            assert_same(out, ref, fam.identity[case.setting], "identity setting vs unpatched")
        elif fam.changes_atol is not None:
            assert any(o.shape != r.shape or (o.float() - r.float()).abs().max() > fam.changes_atol
                       for o, r in zip(out, ref)), "a reducing setting left the output unchanged"

        # disabled: the unpatched computation, exactly; the patch is back afterwards
        with vlprune.disabled(model):
            assert_same(read(model), ref, 0.0, "disabled vs unpatched")
        assert_same(read(model), out, 0.0, "after disabled")

        # tokens per layer follow the schedules; sizes and protected tokens
        desc, towers = check_tokens(fam, model, kw, inputs)
        if fam.trace_source and towers:
            read(model)  # the source map of this input
            reduced = {lr.tower for lr in desc.layers if lr.tokens_out < lr.tokens_in}
            checked = check_sources(model, kw, towers, batch)
            assert checked >= min(len(reduced), 1), "tokens were reduced but get_source says none merged"
        if fam.check is not None:
            fam.check(model, inputs, fam.run(model, inputs), desc)

        # patch twice == patch once: the same classes, not wrapped twice, the same output
        patched = _classes(model)
        vlprune.patch(model, **kw, **({"trace_source": True} if fam.trace_source else {}))
        assert _classes(model) == patched
        for name, m in model.named_modules():
            assert type(m) is classes[name] or type(m).__bases__[-1] is classes[name], name
        assert_same(read(model), out, 0.0, "patched twice vs once")

        # deepcopy: an independent patched model with the same outputs
        clone = copy.deepcopy(model)
        assert_same(read(clone), out, 0.0, "deepcopy vs original")
        assert not _contexts(clone) & _contexts(model), "the copy shares a context with the original"
        assert _contexts(clone) <= _tree(clone._vlprune), "a module of the copy holds a foreign context"
        vlprune.configure(clone, **fam.other)
        assert vlprune.get_config(model) == cfg, "configuring the copy changed the original"
        del clone

        # configure to other settings and back: get_config follows, the output comes back
        vlprune.configure(model, **fam.other)
        now = vlprune.get_config(model)
        assert all(getattr(now, k) == v for k, v in fam.other.items())
        read(model)
        vlprune.configure(model, **{k: getattr(cfg, k) for k in fam.other})
        assert vlprune.get_config(model) == cfg
        assert_same(read(model), out, 0.0, "configure round trip")

        # unpatch: classes, state_dict and outputs restored, nothing left behind
        vlprune.unpatch(model)
        assert _classes(model) == classes
        now_sd = model.state_dict()
        assert list(now_sd) == list(sd)
        assert all(torch.equal(now_sd[k], v) for k, v in sd.items())
        assert vlprune_attrs(model) == []
        assert not vlprune.is_patched(model)
        assert_same(read(model), ref, 0.0, "unpatched again vs never patched")


# --- refusals: configure refuses what patch refuses ----------------------------------------


def default_refusals(model: nn.Module) -> list[tuple[str, dict]]:
    """``(setting, keywords)`` that ``patch`` refuses on every model of ``model``'s kind (its
    adapter's towers; LLaVA-style and Qwen-VL models; BERT-style outputs), with an error naming ``setting``."""
    from vlprune.adapters.base import find_adapter

    adapter = find_adapter(model)
    llava = adapter.name in ("hf_llava", "hf_qwen_vl")  # visual tokens reach a language model
    towers = set(adapter.towers)
    out = [
        ("bogus_setting", dict(bogus_setting=1)),  # unknown names
        ("prune_keep", dict(prune_keep=0.0)),  # invalid values
        ("merge_r", dict(merge_r=[1] * 64)),  # more entries than layers
    ]
    if not llava:  # no visual tokens reach a language model
        out.append(("visual_keep", dict(visual_keep=4)))
    if not adapter.full_text_output:
        out.append(("text_output", dict(text_output="compact")))
    if "text" not in towers:
        out.append(("text_merge_r", dict(text_merge_r=1)))
    if towers == {"image"}:  # guidance by a text tower it does not have
        out.append(("guide", dict(guide="image", text_prune_keep=0.5, text_prune_layers=(1,))))
    if towers == {"text"}:
        out.append(("guide", dict(guide="text", prune_keep=0.5, prune_layers=(1,))))
    if llava:
        out += [("llm_layer", dict(llm_layer=99, llm_keep=4)), ("trace_source", dict(trace_source=True))]
    return out


def check_refusals(fam: Family) -> None:
    """Each refusal of ``patch`` (it raises on the unpatched model, naming the setting) is a
    refusal of ``configure`` on the model patched with ``fam.other``: the same error type, a
    message naming the same setting, and nothing changed -- the settings, the context, every
    patched module and the output (bit-exact)."""
    model = fam.build()
    refusals = [*default_refusals(model), *fam.refusals]
    by_patch = []
    for setting, bad in refusals:
        with pytest.raises((TypeError, ValueError)) as refused:
            vlprune.patch(model, **bad)
        assert setting in str(refused.value), f"patch({bad}) refused without naming {setting}: {refused.value}"
        assert not vlprune.is_patched(model), f"a refused patch({bad}) left the model patched"
        by_patch.append(refused.value)
    inputs = fam.inputs(fam.batches[0], 1)
    read = lambda m: fam.outputs(fam.run(m, inputs), inputs)  # noqa: E731
    with torch.no_grad():
        vlprune.patch(model, **fam.other)
        out = read(model)
        cfg, ctx, classes = vlprune.get_config(model), model._vlprune, _classes(model)
        attrs = {(n, k): id(v) for n, m in model.named_modules() for k, v in vars(m).items()
                 if k.startswith("_vlprune")}
        for (setting, bad), patch_error in zip(refusals, by_patch):
            with pytest.raises(Exception) as refused:  # noqa: PT011 - the type is compared below
                vlprune.configure(model, **bad)
            err = refused.value
            assert type(err) is type(patch_error), (
                f"configure({bad}) raised {type(err).__name__}, patch {type(patch_error).__name__}")
            assert setting in str(err), f"configure({bad}) refused without naming {setting}: {err}"
            assert vlprune.get_config(model) == cfg, f"a refused configure({bad}) changed the settings"
            assert model._vlprune is ctx and _classes(model) == classes
            assert attrs == {(n, k): id(v) for n, m in model.named_modules() for k, v in vars(m).items()
                             if k.startswith("_vlprune")}, f"a refused configure({bad}) changed the patch"
        assert_same(read(model), out, 0.0, "after refused configures")


# --- concurrency ----------------------------------------------------------------------------


@contextlib.contextmanager
def one_thread_each():
    """One intra-op thread per caller (so outputs are reproducible across threads) and
    frequent switches between Python threads; both restored afterwards."""
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        torch.set_num_threads(threads)


def run_in_threads(workers: list[Callable[[threading.Barrier], Any]], timeout: float = JOIN_TIMEOUT) -> list[Any]:
    """Run each worker in its own thread; they share a barrier (with a timeout) to line their
    calls up. A worker's exception is re-raised here (the first real one, not the broken
    barriers it causes in the others); a worker still running after ``timeout`` fails the test."""
    barrier = threading.Barrier(len(workers), timeout=timeout / 4)
    results: list[Any] = [None] * len(workers)
    errors: list[BaseException | None] = [None] * len(workers)

    def main(i: int) -> None:
        try:
            results[i] = workers[i](barrier)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors[i] = e
            barrier.abort()

    threads = [threading.Thread(target=main, args=(i,), daemon=True, name=f"vlprune-test-{i}")
               for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    hung = [t.name for t in threads if t.is_alive()]
    if hung:
        barrier.abort()
        pytest.fail(f"threads still running after {timeout:.0f} s: {hung}")
    real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if real or any(errors):
        raise (real or [e for e in errors if e is not None])[0]
    return results


def _worker(fam: Family, model: nn.Module, inputs: Any, disable: bool = False):
    def work(barrier: threading.Barrier) -> list[list[Tensor]]:
        outs = []
        with torch.no_grad():
            for _ in range(REPEATS):
                barrier.wait()
                if disable:
                    with vlprune.disabled(model):
                        outs.append(fam.outputs(fam.run(model, inputs), inputs))
                else:
                    outs.append(fam.outputs(fam.run(model, inputs), inputs))
        return outs

    return work


def _thread_inputs(fam: Family) -> list[Any]:
    """Different inputs per thread: other seeds and batch sizes."""
    sizes = [fam.batches[i % len(fam.batches)] for i in range(THREADS)]
    return [fam.inputs(b, 10 + i) for i, b in enumerate(sizes)]


def check_concurrent(case: Case, disable_first: bool) -> None:
    """``THREADS`` threads run one patched model at once, ``REPEATS`` times each, on their own
    inputs; each output equals the same input run alone. ``disable_first``: thread 0 runs
    inside ``vlprune.disabled`` meanwhile, and gets the unpatched output."""
    fam = case.family
    model = fam.build()
    vlprune.patch(model, **case.kw)
    xs = _thread_inputs(fam)
    with one_thread_each():
        _check_concurrent(fam, model, xs, disable_first)


def _check_concurrent(fam: Family, model: nn.Module, xs: list[Any], disable_first: bool) -> None:
    with torch.no_grad():
        refs = []
        for i, x in enumerate(xs):
            if disable_first and i == 0:
                with vlprune.disabled(model):
                    refs.append(fam.outputs(fam.run(model, x), x))
            else:
                refs.append(fam.outputs(fam.run(model, x), x))
    results = run_in_threads([_worker(fam, model, x, disable_first and i == 0) for i, x in enumerate(xs)])
    for i, (outs, ref) in enumerate(zip(results, refs)):
        for rep, out in enumerate(outs):
            assert_same(out, ref, 1e-6, f"thread {i}{' (disabled)' if disable_first and i == 0 else ''}, call {rep}")
    with torch.no_grad():  # the model is still patched and enabled
        assert_same(fam.outputs(fam.run(model, xs[1]), xs[1]), refs[1], 1e-6, "after the threads")


# --- the tester ---------------------------------------------------------------------------


class AdapterTester:
    """Mix-in: subclass it as ``Test...`` with ``families = {name: Family(...)}``."""

    families: Mapping[str, Family] = {}

    def pytest_generate_tests(self, metafunc) -> None:
        if "case" not in metafunc.fixturenames:
            return
        cases = list(self._cases(metafunc.function.__name__))
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])

    def _cases(self, test: str):
        for name, fam in self.families.items():
            if test == "test_refusals":
                yield Case(name, fam, "refusals", {})
            elif test == "test_invariants":
                for setting, kw in fam.settings.items():
                    if kw is not None:
                        for batch in fam.batches:
                            yield Case(name, fam, setting, kw, batch)
            else:
                for setting in fam.concurrency:
                    yield Case(name, fam, setting, fam.settings[setting])

    def test_invariants(self, case: Case) -> None:
        """Identity settings, disabled, tokens per layer, sources, patch twice, deepcopy,
        configure round trip, unpatch: one model, one setting, one batch size."""
        check_invariants(case)

    def test_refusals(self, case: Case) -> None:
        """configure refuses what patch refuses, with the same error, and changes nothing."""
        check_refusals(case.family)

    def test_concurrent_forwards(self, case: Case) -> None:
        check_concurrent(case, disable_first=False)

    def test_concurrent_disabled(self, case: Case) -> None:
        check_concurrent(case, disable_first=True)
