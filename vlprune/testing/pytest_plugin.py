"""pytest plugin: run a test suite with every model it builds patched by vlprune, reducing nothing.

A patched model that removes no token must behave like the upstream model. The strongest check
of that claim is upstream's own test suite: run it once as usual and once with this plugin, and
every test that fails only the second time is a place where the patch changes behaviour.

Load the plugin explicitly (it is never loaded by itself, and installing vlprune does not
register it)::

    pytest -p vlprune.testing.pytest_plugin tests/test_models.py
    pytest -p vlprune.testing.pytest_plugin --vlprune-setting "merge_r=0" tests/models/clip
    pytest -p vlprune.testing.pytest_plugin \\
        --vlprune-setting "prune_keep=1.0 prune_layers=1" \\
        --vlprune-setting "hf_llava: visual_keep=1.0" tests/models/llava

``vlprune`` must be importable by the Python that runs pytest (installed, or its folder on
``PYTHONPATH``).

Where models are caught
-----------------------
* timm: at the end of ``__init__`` of ``timm.models.vision_transformer.VisionTransformer`` and
  of its subclasses (``VisionTransformerDistilled``), so ``timm.create_model`` and direct
  construction are both caught; whatever ``create_model`` does afterwards (pretrained weights,
  ``set_input_size``, the ``features_only`` wrapper) runs on the patched model. Other timm
  classes (Eva, relpos ViTs, CNNs) are not touched and not counted.
* transformers: at the end of ``PreTrainedModel.post_init`` (the last line of every model's
  ``__init__``), for the outermost model only: the towers a ``CLIPModel`` or a LLaVA model
  builds inside its own ``__init__`` are patched as part of it, not alone. Every
  ``PreTrainedModel`` is tried (``from_pretrained`` and ``from_config`` included); those no
  adapter supports are left alone and counted.

A model is patched with ``vlprune.patch(model, **settings)``; the torch random state is the same
after as before. A model that is already patched is left as it is. When ``patch`` refuses a
model (unsupported class, a setting that does not apply), the model stays as built, unpatched,
and the refusal is counted: the test still runs.

Settings
--------
``--vlprune-setting "NAME=VALUE NAME=VALUE ..."`` gives the :class:`vlprune.ReductionConfig`
fields, separated by spaces; values are Python literals (``merge_r=0``, ``prune_keep=1.0``,
``prune_layers=3,6,9``, ``merge_r=(0,0.5)``), anything else is a string (``prune_score=random``).
Prefix ``FAMILY:`` to give one adapter family its own settings (``hf_llava: visual_keep=1.0``;
families: ``timm_vit``, ``hf_clip``, ``hf_clip_vision``, ``hf_clip_text``, ``hf_llava``,
``hf_bert``, ``open_clip``, ...): a model of that family gets exactly those settings (they
replace the unprefixed ones, they do not add to them), every other model the unprefixed ones
(the last given; ``merge_r=0`` when none is). The option repeats.

The settings must reduce nothing (``ReductionConfig.is_identity``), else the run stops with a
usage error; ``--vlprune-allow-reducing`` lifts that (expect failures: outputs then differ).

Summary
-------
At the end of the session the terminal shows one ``vlprune: patched N models ...`` line (by
family and class) and the models left alone with their reason.
``--vlprune-report PATH`` also writes it as JSON, with the models each test patched.
Counts are those of one process: under ``pytest-xdist`` each worker counts its own.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

DEFAULT_SETTING = "merge_r=0"
_COLLECTING = "<collection>"


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------

def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_setting(text: str) -> tuple[str | None, dict[str, Any]]:
    """``"[FAMILY:] NAME=VALUE ..."`` -> ``(family or None, {name: value})``."""
    family = None
    head, sep, rest = text.partition(":")
    if sep and "=" not in head and head.strip() and not any(c.isspace() for c in head.strip()):
        family, text = head.strip(), rest
    settings: dict[str, Any] = {}
    for token in shlex.split(text):
        name, eq, raw = token.partition("=")
        if not eq or not name:
            raise ValueError(f"expected NAME=VALUE, got {token!r} in {text!r}")
        value = _value(raw)
        if name.endswith("_layers") and isinstance(value, int):
            value = (value,)
        if isinstance(value, list) and name.endswith("_layers"):
            value = tuple(value)
        settings[name] = value
    return family, settings


def _describe(settings: dict[str, Any]) -> str:
    return " ".join(f"{k}={v!r}" for k, v in settings.items()) or "(defaults)"


class Settings:
    """The unprefixed settings and each family's own."""

    def __init__(self, texts: list[str] | None, allow_reducing: bool = False) -> None:
        from torch import nn

        from ..adapters.base import find_adapter
        from ..config import ReductionConfig

        self.default: dict[str, Any] = parse_setting(DEFAULT_SETTING)[1]
        self.families: dict[str, dict[str, Any]] = {}
        for text in texts or []:
            try:
                family, settings = parse_setting(text)
                unknown = sorted(set(settings) - set(ReductionConfig.field_names()))
                if unknown:
                    raise ValueError(f"unknown setting(s) {unknown}; known settings: "
                                     f"{list(ReductionConfig.field_names())}")
                if family is not None:
                    find_adapter(nn.Module(), family)  # unknown family: ValueError
                config = ReductionConfig(**settings)
            except (TypeError, ValueError) as e:
                raise pytest.UsageError(f"--vlprune-setting {text!r}: {e}") from e
            if not config.is_identity and not allow_reducing:
                raise pytest.UsageError(
                    f"--vlprune-setting {text!r} reduces tokens; the plugin checks patched models "
                    "that reduce nothing (pass --vlprune-allow-reducing to run it anyway)")
            if family is None:  # the last unprefixed one counts
                self.default = settings
            else:
                self.families[family] = settings

    def for_family(self, family: str) -> dict[str, Any]:
        return self.families.get(family, self.default)

    def text(self) -> str:
        parts = [_describe(self.default)]
        parts += [f"[{f}: {_describe(s)}]" for f, s in sorted(self.families.items())]
        return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# counting
# ---------------------------------------------------------------------------------------------

def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    line = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Patcher:
    """Patches the models handed to it and counts what happened."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.patched: Counter[tuple[str, str]] = Counter()  # (family, class)
        self.left_alone: Counter[tuple[str, str, str]] = Counter()  # (library, class, reason)
        self.tests: dict[str, dict[str, int]] = {}
        self.current = _COLLECTING
        self.hooked: list[str] = []

    def _count_test(self, key: str) -> None:
        counts = self.tests.setdefault(self.current, {"patched": 0, "left_alone": 0})
        counts[key] += 1

    def handle(self, model: Any, library: str) -> None:
        import torch

        from ..adapters.base import UnsupportedModelError, find_adapter
        from ..api import is_patched, patch

        if is_patched(model):
            return
        name = type(model).__name__
        try:
            family = find_adapter(model, self.settings.default.get("family")).name
        except Exception as e:  # UnsupportedModelError, or a detection that broke
            reason = ("no adapter (UnsupportedModelError)" if isinstance(e, UnsupportedModelError)
                      else _first_line(e))
            self.left_alone[(library, name, reason)] += 1
            self._count_test("left_alone")
            return
        rng = torch.get_rng_state()
        try:
            patch(model, **self.settings.for_family(family))
        except Exception as e:  # patch leaves the model as it was
            self.left_alone[(library, name, _first_line(e))] += 1
            self._count_test("left_alone")
            return
        finally:
            torch.set_rng_state(rng)
        self.patched[(family, name)] += 1
        self._count_test("patched")

    # the report ------------------------------------------------------------------------------

    def summary_lines(self) -> list[str]:
        n = sum(self.patched.values())
        by_family = Counter()
        for (family, _), c in self.patched.items():
            by_family[family] += c
        fams = ", ".join(f"{f}: {c}" for f, c in sorted(by_family.items()))
        alone = sum(self.left_alone.values())
        lines = [f"vlprune: patched {n} model{'s' * (n != 1)}"
                 f"{f' ({fams})' if fams else ''} at {self.settings.text()}; "
                 f"left alone {alone}"]
        for (family, name), c in sorted(self.patched.items()):
            lines.append(f"  patched      {family:<16} {name:<40} {c:>5}")
        for (library, name, reason), c in sorted(self.left_alone.items()):
            lines.append(f"  left alone   {library:<16} {name:<40} {c:>5}  {reason}")
        if not self.hooked:
            lines.append("  (neither timm nor transformers is importable: nothing was hooked)")
        return lines

    def report(self) -> dict[str, Any]:
        return {
            "settings": {"default": self.settings.default, "families": self.settings.families},
            "hooked": self.hooked,
            "patched": [{"family": f, "class": c, "count": n}
                        for (f, c), n in sorted(self.patched.items())],
            "left_alone": [{"library": lib, "class": c, "reason": r, "count": n}
                           for (lib, c, r), n in sorted(self.left_alone.items())],
            "tests": self.tests,
        }


# ---------------------------------------------------------------------------------------------
# hooks into the model libraries
# ---------------------------------------------------------------------------------------------

def _inside_init(frame: Any, kinds: tuple[type, ...], obj: Any, same_counts: bool) -> bool:
    """Whether some caller frame is an ``__init__`` whose ``self`` is an instance of ``kinds``
    (``obj`` itself only when ``same_counts``)."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__init__" and code.co_argcount:
            first = frame.f_locals.get(code.co_varnames[0])
            if isinstance(first, kinds) and (same_counts or first is not obj):
                return True
        frame = frame.f_back
    return False


def _subclasses(cls: type) -> list[type]:
    out, todo = [], [cls]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


class Hooks:
    """The wrapped library functions, put back by :meth:`remove`."""

    def __init__(self, patcher: Patcher) -> None:
        self.patcher = patcher
        self.saved: list[tuple[type, str, Any]] = []

    def _replace(self, owner: type, name: str, new: Any) -> None:
        self.saved.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, new)

    def install(self) -> None:
        if importlib.util.find_spec("timm") is not None:
            self._timm()
        if importlib.util.find_spec("transformers") is not None:
            self._transformers()

    def _timm(self) -> None:
        from timm.models.vision_transformer import VisionTransformer

        patcher = self.patcher
        kinds = (VisionTransformer,)

        def wrap(original):
            @functools.wraps(original)
            def built_init(self, *args, **kwargs):
                original(self, *args, **kwargs)
                # a subclass __init__ still running, or a ViT inside a ViT: patch at its end
                if not _inside_init(sys._getframe(1), kinds, self, same_counts=True):
                    patcher.handle(self, "timm")
            return built_init

        for cls in _subclasses(VisionTransformer):
            if "__init__" in cls.__dict__:
                self._replace(cls, "__init__", wrap(cls.__dict__["__init__"]))
        patcher.hooked.append("timm: VisionTransformer.__init__ (and subclasses)")

    def _transformers(self) -> None:
        from transformers.modeling_utils import PreTrainedModel

        patcher = self.patcher
        original = PreTrainedModel.__dict__["post_init"]
        kinds = (PreTrainedModel,)

        @functools.wraps(original)
        def post_init(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            # a tower built inside another model's __init__ is patched as part of it
            if not _inside_init(sys._getframe(1), kinds, self, same_counts=False):
                patcher.handle(self, "transformers")
            return out

        self._replace(PreTrainedModel, "post_init", post_init)
        patcher.hooked.append("transformers: PreTrainedModel.post_init (outermost models)")

    def remove(self) -> None:
        while self.saved:
            owner, name, value = self.saved.pop()
            setattr(owner, name, value)


# ---------------------------------------------------------------------------------------------
# pytest hooks
# ---------------------------------------------------------------------------------------------

_KEY = pytest.StashKey["_State"]()


class _State:
    def __init__(self, patcher: Patcher, hooks: Hooks, report: str | None) -> None:
        self.patcher, self.hooks, self.report = patcher, hooks, report


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vlprune", "vlprune: patch every model built, reducing nothing")
    group.addoption(
        "--vlprune-setting", action="append", default=None, metavar="[FAMILY:] NAME=VALUE ...",
        help="ReductionConfig fields the models are patched with (repeatable; a FAMILY: prefix "
             f"gives one adapter family its own). Default: {DEFAULT_SETTING!r}.")
    group.addoption(
        "--vlprune-allow-reducing", action="store_true", default=False,
        help="accept settings that remove tokens (outputs then differ from upstream's)")
    group.addoption(
        "--vlprune-report", default=None, metavar="PATH",
        help="write the patched / left-alone counts (and each test's) as JSON to PATH")


def pytest_configure(config: pytest.Config) -> None:
    settings = Settings(config.getoption("vlprune_setting"),
                        config.getoption("vlprune_allow_reducing"))
    patcher = Patcher(settings)
    hooks = Hooks(patcher)
    hooks.install()
    config.stash[_KEY] = _State(patcher, hooks, config.getoption("vlprune_report"))
    config.add_cleanup(hooks.remove)


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash.get(_KEY, None)
    if state is None:
        return []
    hooked = "; ".join(state.patcher.hooked) or "nothing (neither timm nor transformers found)"
    return [f"vlprune: patching models at {state.patcher.settings.text()}; hooked: {hooked}"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    state = item.config.stash.get(_KEY, None)
    if state is not None:
        state.patcher.current = item.nodeid
    yield
    if state is not None:
        state.patcher.current = _COLLECTING


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_KEY, None)
    if state is None:
        return
    terminalreporter.write_sep("-", "vlprune")
    for line in state.patcher.summary_lines():
        terminalreporter.write_line(line)
    if state.report:
        path = Path(state.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state.patcher.report(), indent=1, default=repr) + "\n")
        terminalreporter.write_line(f"vlprune: report written to {path}")
