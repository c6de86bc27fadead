"""Upstream drift: fingerprints of the upstream code vlprune overrides, and a self-check.

A patched module's class is ``mixin + upstream class``: the mixin's methods replace the
upstream ones of the same name, and several of them re-implement the upstream body while
reducing (timm ``Attention.forward``, Hugging Face encoder layers, ...). If upstream changes
such a method (a new norm, RoPE, attention sinks), our copy would silently drop the change.

So every method a patch overrides is fingerprinted (a hash of its source's syntax tree,
docstrings left out, so formatting and comments do not count) and compared with the
fingerprints of the versions this release was tested with (``KNOWN``, in
``vlprune/upstream_known.py``). On an unknown fingerprint :func:`vlprune.patch` runs
:func:`vlprune.check` on the user's own model (no reduction must equal the unpatched model;
one reduced forward must be finite) and warns once, naming the tested versions; a failed
self-check refuses the patch.

``vlprune check --record`` adds the fingerprints of the installed versions to
``upstream_known.py`` (after the test suite passed with them).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

__all__ = ["CheckResult", "fingerprint", "overridden", "record", "unknown", "versions", "write_known"]

try:
    from .upstream_known import KNOWN  # {"module:qualname": {fingerprint: [version labels]}}
except ImportError:  # pragma: no cover - the file ships with the package
    KNOWN: dict[str, dict[str, list[str]]] = {}

# set on every swapped module by ``adapters.base.swap_class``: the module's upstream class
ORIG_CLASS = "_vlprune_orig_class"
# the libraries whose versions label a fingerprint
LIBRARIES = ("torch", "timm", "open_clip_torch", "transformers")


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module))
                and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def fingerprint(fn: Callable) -> str:
    """A short hash of ``fn``'s code: its syntax tree without docstrings (so comments,
    formatting and docstrings do not change it). Functions without Python source (C
    builtins) hash their qualified name."""
    fn = inspect.unwrap(fn)
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = _strip_docstrings(ast.parse(source))
        for node in tree.body[:1]:  # the function's own name is its key, not its code
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                node.name = "_"
        text = ast.dump(tree, include_attributes=False)
    except (OSError, TypeError, SyntaxError):
        text = f"<no source> {getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def key_of(fn: Callable) -> str:
    fn = inspect.unwrap(fn)
    return f"{fn.__module__}:{fn.__qualname__}"


def overridden(model: nn.Module) -> dict[str, Callable]:
    """The upstream functions a patch of ``model`` overrides, by ``module:qualname``: for
    every swapped module, each method its mixins define that its original class also has (as
    the original class resolves it, so a user's subclass counts as its own code)."""
    found: dict[str, Callable] = {}
    for module in model.modules():
        orig = module.__dict__.get(ORIG_CLASS)
        if orig is None:
            continue
        upstream_mro = set(orig.__mro__)
        for base in type(module).__mro__:
            if base in upstream_mro:
                break
            for name, value in vars(base).items():
                if not inspect.isfunction(value) or name.startswith("_vlprune") or name.startswith("__"):
                    continue  # our helpers and Python's protocol methods (pickling, copying)
                fn = getattr(orig, name, None)
                if not inspect.isfunction(fn):
                    continue
                if fn.__module__ == "torch.nn.modules.module":
                    continue  # nn.Module's own generic machinery
                found.setdefault(key_of(fn), fn)
    return found


_LIBRARY_OF = (("timm.", "timm"), ("open_clip.", "open_clip_torch"),
               ("transformers.", "transformers"), ("torch.", "torch"))


def library_of(key: str) -> str | None:
    """The distribution whose module holds the function ``module:qualname``."""
    return next((lib for prefix, lib in _LIBRARY_OF if key.startswith(prefix)), None)


def tested_library_versions() -> dict[str, set[str]]:
    """Every version of each library some recorded fingerprint was labelled with."""
    out: dict[str, set[str]] = {}
    for labels in (lab for d in KNOWN.values() for labs in d.values() for lab in labs):
        words = labels.split()
        for lib, ver in zip(words[::2], words[1::2]):
            out.setdefault(lib, set()).add(ver)
    return out


def unknown(model: nn.Module) -> dict[str, str]:
    """``{module:qualname: fingerprint}`` of the overridden functions whose code is not a
    tested version's: a recorded function with another fingerprint, or any unrecorded one
    from a library whose installed version was never tested. (An unrecorded function of a
    tested library version is a class the recording models do not use: a subclass from
    elsewhere, which the adapters' own checks accept or refuse by its methods.)"""
    installed = versions()
    tested = tested_library_versions()
    out = {}
    for key, fn in overridden(model).items():
        fp = fingerprint(fn)
        if fp in KNOWN.get(key, {}):
            continue
        lib = library_of(key)
        if key in KNOWN or lib is None or installed.get(lib) not in tested.get(lib, set()):
            out[key] = fp
    return out


def versions() -> dict[str, str]:
    """Installed versions of the libraries vlprune patches."""
    from importlib import metadata

    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return out


def tested_versions(key: str) -> list[str]:
    """The version labels recorded for the function ``key`` (all fingerprints)."""
    return sorted({v for labels in KNOWN.get(key, {}).values() for v in labels})


@dataclass
class CheckResult:
    """What :func:`check` found on one model."""

    ok: bool
    max_diff_unreduced: float  # largest |patched, reducing nothing - unpatched|
    reduced_finite: bool
    unknown: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why

    def __str__(self) -> str:
        state = "passed" if self.ok else "FAILED"
        lines = [f"vlprune self-check {state}: unreduced max |diff| = {self.max_diff_unreduced:.3g}, "
                 f"reduced output finite = {self.reduced_finite}"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  upstream code not among the tested versions: {k}" for k in self.unknown]
        return "\n".join(lines)


def _label() -> str:
    return " ".join(f"{k} {v}" for k, v in versions().items())


def record(models: list[nn.Module]) -> dict[str, dict[str, list[str]]]:
    """:data:`KNOWN` plus the fingerprints of the functions overridden on the patched
    ``models``, labelled with the installed versions."""
    table = {k: {fp: list(v) for fp, v in d.items()} for k, d in KNOWN.items()}
    label = _label()
    for model in models:
        for key, fn in overridden(model).items():
            labels = table.setdefault(key, {}).setdefault(fingerprint(fn), [])
            if label not in labels:
                labels.append(label)
    return table


def write_known(table: dict, path) -> None:
    lines = ['"""Fingerprints of the upstream functions vlprune overrides, by the versions tested',
             "(written by ``vlprune check --record``; see :mod:`vlprune.upstream`).", '"""',
             "", "KNOWN: dict[str, dict[str, list[str]]] = {"]
    for key in sorted(table):
        lines.append(f"    {key!r}: {{")
        for fp in sorted(table[key]):
            lines.append(f"        {fp!r}: {sorted(table[key][fp])!r},")
        lines.append("    },")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")
