"""The package's import graph and layering rules, read from the source with ``ast``.

Every module of ``vlprune/`` is parsed (nothing is imported); every import statement counts,
at module level and inside functions, relative ones resolved, and ``from pkg import x``
resolves to the submodule ``pkg.x`` when there is one. The rules:

* no import cycle between modules;
* ``vlprune.eval*`` never imports ``vlprune.cli*``;
* ``vlprune.core*`` imports nothing of ours outside ``core``;
* ``vlprune.merging*`` imports only ``core`` and ``merging``;
* ``vlprune.adapters*`` imports neither ``eval`` nor ``cli``;
* no module imports a private (``_name``) name of another module of ours, nor reads one as
  ``module._name`` through an imported module;
* only ``vlprune.cli*`` exits: ``raise SystemExit``, ``sys.exit``, ``os._exit``, ``exit()``
  and an argument parser's ``.error()`` / ``.exit()`` are refused elsewhere.

The checker itself is tested on small synthetic packages first, so a rule that silently
matches nothing fails too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vlprune"


# ---------------------------------------------------------------------------------------------
# reading the package
# ---------------------------------------------------------------------------------------------

@dataclass
class Edge:
    """One import: ``source`` imports ``target`` (a module of the package) at ``line``."""

    source: str
    target: str
    line: int
    names: tuple[str, ...] = ()  # the names taken from ``target`` by ``from target import``


@dataclass
class Module:
    name: str
    rel: str  # the file, relative to the folder holding the package
    is_package: bool
    tree: ast.Module
    edges: list[Edge] = field(default_factory=list)

    def here(self) -> str:
        """The package that relative imports start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def module_files(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is_package)}`` of every module under ``root/package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The longest module of ours that ``name`` is or lies in (``a.b.c`` -> ``a.b`` when
    ``c`` is a name inside module ``a.b``)."""
    mods = set(modules)
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in mods:
            return cand
    return None


def _absolute(m: Module, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <node.module> import ...`` inside ``m``."""
    if not node.level:
        return node.module or ""
    base = m.here().split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def read_package(root: Path, package: str = PACKAGE) -> dict[str, Module]:
    files = module_files(root, package)
    mods = {name: Module(name, path.relative_to(root).as_posix(), is_pkg,
                         ast.parse(path.read_text(), str(path)))
            for name, (path, is_pkg) in files.items()}
    for m in mods.values():
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _resolve(alias.name, mods)
                    if target is not None and target != m.name:
                        m.edges.append(Edge(m.name, target, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                full = _absolute(m, node)
                if full.split(".")[0] != package:
                    continue
                for alias in node.names:
                    sub = f"{full}.{alias.name}"
                    if sub in mods:  # ``from pkg import submodule``
                        target, names = sub, ()
                    else:
                        target, names = _resolve(full, mods), (alias.name,)
                    if target is not None and target != m.name:
                        m.edges.append(Edge(m.name, target, node.lineno, names))
    return mods


# ---------------------------------------------------------------------------------------------
# the rules
# ---------------------------------------------------------------------------------------------

def find_cycles(mods: dict[str, Module]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a cycle
    path through it."""
    graph = {name: sorted({e.target for e in m.edges}) for name, m in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth: at most the number of modules
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_path(graph, comp) for comp in comps]


def _cycle_path(graph: dict[str, list[str]], comp: list[str]) -> list[str]:
    """One cycle inside a strongly connected component, as ``[a, b, ..., a]``."""
    inside = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth-first back to start
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w not in inside:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def _in(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layering_violations(mods: dict[str, Module], package: str = PACKAGE) -> list[str]:
    p = package
    out: list[str] = []
    for m in mods.values():
        for e in m.edges:
            where = f"{m.rel}:{e.line}"
            t = e.target
            if _in(m.name, f"{p}.eval") and _in(t, f"{p}.cli"):
                out.append(f"{where}: {m.name} (eval) imports {t} (cli)")
            if _in(m.name, f"{p}.core") and not _in(t, f"{p}.core"):
                out.append(f"{where}: {m.name} (core) imports {t}, outside core")
            if _in(m.name, f"{p}.merging") and not _in(t, f"{p}.core", f"{p}.merging"):
                out.append(f"{where}: {m.name} (merging) imports {t}, outside core/merging")
            if _in(m.name, f"{p}.adapters") and _in(t, f"{p}.eval", f"{p}.cli"):
                out.append(f"{where}: {m.name} (adapters) imports {t}")
    return list(dict.fromkeys(out))  # one line per import statement


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(mods: dict[str, Module]) -> list[str]:
    """``from ours import _name``, and ``module._name`` read through an imported module."""
    out: list[str] = []
    for m in mods.values():
        rel = m.rel
        for e in m.edges:
            for n in e.names:
                if _private(n):
                    out.append(f"{rel}:{e.line}: {m.name} imports private {e.target}.{n}")
            if _private(e.target.rpartition(".")[2]):
                out.append(f"{rel}:{e.line}: {m.name} imports private module {e.target}")
        # local names bound to modules of ours: ``from . import bench``, ``import a.b as c``
        bound: dict[str, str] = {}
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ImportFrom):
                full = _absolute(m, node)
                for alias in node.names:
                    if f"{full}.{alias.name}" in mods:
                        bound[alias.asname or alias.name] = f"{full}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in mods:
                        bound[alias.asname] = alias.name
        for node in ast.walk(m.tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr)
                    and isinstance(node.value, ast.Name) and node.value.id in bound
                    and bound[node.value.id] != m.name):
                out.append(f"{rel}:{node.lineno}: {m.name} reads private "
                           f"{bound[node.value.id]}.{node.attr}")
    return out


def _parser_names(tree: ast.Module) -> set[str]:
    """Names bound to ``argparse.ArgumentParser(...)`` (or ``add_parser(...)``) anywhere."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            f = node.value.func
            called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if called in ("ArgumentParser", "add_parser"):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def exits_outside_cli(mods: dict[str, Module], package: str = PACKAGE) -> list[str]:
    out = []
    for m in mods.values():
        if _in(m.name, f"{package}.cli"):
            continue
        rel = m.rel
        parsers = _parser_names(m.tree) | {"parser"}
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                    out.append(f"{rel}:{node.lineno}: raise SystemExit in {m.name}")
            elif isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                    owner, attr = f.value.id, f.attr
                    if (owner, attr) in (("sys", "exit"), ("os", "_exit")):
                        out.append(f"{rel}:{node.lineno}: {owner}.{attr}() in {m.name}")
                    elif attr in ("error", "exit") and (owner in parsers
                                                         or owner.endswith("parser")):
                        out.append(f"{rel}:{node.lineno}: {owner}.{attr}() of an argument "
                                   f"parser in {m.name}")
                elif isinstance(f, ast.Name) and f.id in ("exit", "quit"):
                    out.append(f"{rel}:{node.lineno}: {f.id}() in {m.name}")
            elif isinstance(node, ast.ImportFrom) and node.module == "sys":
                if any(a.name == "exit" for a in node.names):
                    out.append(f"{rel}:{node.lineno}: from sys import exit in {m.name}")
    return out


# ---------------------------------------------------------------------------------------------
# the checker on synthetic packages
# ---------------------------------------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_cycles_through_function_level_and_relative_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/cli.py": "from .eval import vqa\n",
        "pkg/eval/__init__.py": "",
        "pkg/eval/vqa.py": "def f():\n    from ..cli import helper\n",
        "pkg/eval/ok.py": "from . import vqa\n",
    })
    mods = read_package(tmp_path, "pkg")
    assert {(e.source, e.target) for m in mods.values() for e in m.edges} == {
        ("pkg.cli", "pkg.eval.vqa"), ("pkg.eval.vqa", "pkg.cli"), ("pkg.eval.ok", "pkg.eval.vqa"),
    }
    assert find_cycles(mods) == [["pkg.cli", "pkg.eval.vqa", "pkg.cli"]]
    assert layering_violations(mods, "pkg") == [
        "pkg/eval/vqa.py:2: pkg.eval.vqa (eval) imports pkg.cli (cli)"]


def test_checker_finds_layering_private_names_and_exits(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/api.py": "X = 1\n",
        "pkg/core/__init__.py": "",
        "pkg/core/plan.py": "from ..api import X\n",
        "pkg/merging/__init__.py": "",
        "pkg/merging/tome.py": "from ..core import plan\nfrom pkg.adapters import base\n",
        "pkg/adapters/__init__.py": "",
        "pkg/adapters/base.py": "def f():\n    import pkg.eval.bench\n",
        "pkg/eval/__init__.py": "",
        "pkg/eval/bench.py": ("import sys\nfrom .. import api as a\nfrom ..api import _hidden\n"
                              "def g(parser):\n    a._secret()\n    parser.error('x')\n"
                              "    sys.exit(1)\n    raise SystemExit('no')\n"),
        "pkg/cli/__init__.py": "import sys\ndef main():\n    raise SystemExit(sys.exit(2))\n",
    })
    mods = read_package(tmp_path, "pkg")
    bad = layering_violations(mods, "pkg")
    assert any("core.plan (core) imports pkg.api" in b for b in bad)
    assert any("merging.tome (merging) imports pkg.adapters.base" in b for b in bad)
    assert not any("merging.tome (merging) imports pkg.core" in b for b in bad)
    assert any("adapters.base (adapters) imports pkg.eval.bench" in b for b in bad)
    private = private_imports(mods)
    assert any("imports private pkg.api._hidden" in p for p in private)
    assert any("reads private pkg.api._secret" in p for p in private)
    exits = exits_outside_cli(mods, "pkg")
    assert len(exits) == 3 and all("pkg.eval.bench" in x for x in exits), exits


# ---------------------------------------------------------------------------------------------
# the package itself
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def package() -> dict[str, Module]:
    return read_package(ROOT)


def test_package_is_read(package):
    assert {"vlprune", "vlprune.api", "vlprune.cli", "vlprune.eval.bench"} <= set(package)
    assert sum(len(m.edges) for m in package.values()) > 50


def test_no_import_cycles(package):
    cycles = find_cycles(package)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layering(package):
    bad = layering_violations(package)
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_no_private_names_across_modules(package):
    bad = private_imports(package)
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_only_the_cli_exits(package):
    bad = exits_outside_cli(package)
    assert not bad, "exits outside vlprune/cli:\n" + "\n".join(bad)
