"""Run upstream's own test suites twice, without and with vlprune's pytest plugin (reducing nothing).

Gets the test sources of the INSTALLED timm and transformers (``git clone --depth 1 --branch
v<version>``, or a checkout given with ``--src``), runs timm's ``tests/test_models.py`` on ViT
models and transformers' CLIP, SigLIP and LLaVA ``test_modeling_*.py`` files once as upstream
ships them and once with ``-p vlprune.testing.pytest_plugin``, and writes the counts
(passed / failed / skipped / error per suite, without vs with) and every test that fails only
when patched to ``results.json`` and ``results.md``::

    python benchmarks/upstream_suites/run.py                       # clone, default subsets
    python benchmarks/upstream_suites/run.py --src timm=../pytorch-image-models \\
        --src transformers=../transformers --suites clip,siglip --out /tmp/upstream
    python benchmarks/upstream_suites/run.py --full                 # no -k subsets (hours)

One suite runs at a time. See README.md next to this file for the subsets and what to install.
Not run by CI: it needs the sources (downloads) and minutes per suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the vlprune checkout (for PYTHONPATH)
PLUGIN = "vlprune.testing.pytest_plugin"

REPOS = {
    "timm": "https://github.com/huggingface/pytorch-image-models",
    "transformers": "https://github.com/huggingface/transformers",
}

# timm: small VisionTransformer models that between them cover class token / none, registers,
# avg / map pooling, distillation token, hybrid (ResNet) stem, pre-norm (CLIP), dinov2 layer scale
TIMM_MODELS = (
    "test_vit", "test_vit2", "test_vit3", "test_vit4", "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224", "vit_wee_patch16_reg1_gap_256",
    "vit_medium_patch16_gap_256", "vit_xsmall_patch16_clip_224",
    "vit_small_patch14_reg4_dinov2", "vit_tiny_r_s16_p8_224",
)
# test_vit also matches test_vit_relpos and the test_vit_classifier_* functions (not
# VisionTransformer); test_model_inference and *pretrained* download weights;
# test_prune_intermediate_layers_contract (minutes per model) only on test_vit, test_vit2, test_vit3
TIMM_K = (f"({' or '.join(TIMM_MODELS)} or test_hybrid_vit) and not relpos and not classifier "
          "and not test_model_inference and not pretrained and not "
          "(prune_intermediate_layers_contract and not (contract[test_vit] or "
          "contract[test_vit2] or contract[test_vit3]))")
# transformers: the common tests but the slowest and the ones that need a GPU or extra
# packages: of the eager-vs-SDPA grid only three fp32 cases, no export / compile / pipeline /
# flash / flex / kernels tests, no bc_torch_dtype (a loop over dtypes)
HF_K = ("not (eager_matches_sdpa_inference and not (09_fp32 or 13_fp32 or 24_fp32)) "
        "and not export and not compile and not pipeline and not flash and not flex "
        "and not kernels and not bc_torch_dtype")


@dataclass
class Suite:
    name: str
    library: str
    files: tuple[str, ...]  # globs under the source checkout
    k: str
    settings: tuple[str, ...] = ("merge_r=0",)
    exclude: tuple[str, ...] = ()


SUITES = {
    "timm": Suite("timm", "timm", ("tests/test_models.py",), TIMM_K),
    "clip": Suite("clip", "transformers", ("tests/models/clip/test_modeling_*.py",), HF_K,
                  exclude=("_tf_", "_flax_")),
    "siglip": Suite("siglip", "transformers", ("tests/models/siglip/test_modeling_*.py",), HF_K,
                    exclude=("_tf_", "_flax_")),
    "llava": Suite("llava", "transformers", ("tests/models/llava/test_modeling_*.py",), HF_K,
                   settings=("merge_r=0", "hf_llava: visual_keep=1.0"),
                   exclude=("_tf_", "_flax_")),
}

OUTCOMES = ("passed", "failed", "skipped", "error")


# ---------------------------------------------------------------------------------------------
# versions and sources
# ---------------------------------------------------------------------------------------------

def installed_versions(python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {'python': sys.version.split()[0]}\n"
            "for k in ('torch', 'timm', 'transformers', 'pytest'):\n"
            "    try: out[k] = m.version(k)\n"
            "    except m.PackageNotFoundError: out[k] = None\n"
            "print(json.dumps(out))")
    return json.loads(subprocess.check_output([python, "-c", code], text=True))


def missing_modules(python: str, names: list[str]) -> list[str]:
    code = ("import importlib.util, sys\n"
            "print(' '.join(n for n in sys.argv[1:] if importlib.util.find_spec(n) is None))")
    return subprocess.check_output([python, "-c", code, *names], text=True).split()


def source_version(library: str, src: Path) -> str | None:
    """The version a checkout declares (None when the file is not where we look)."""
    path = src / ("timm/version.py" if library == "timm" else "src/transformers/__init__.py")
    if not path.exists():
        return None
    m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", path.read_text())
    return m.group(1) if m else None


def git_commit(path: Path) -> str | None:
    """``git describe`` of the checkout holding ``path`` (``-dirty`` when it has changes)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=path, text=True,
                              capture_output=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def get_source(library: str, version: str, given: str | None, work: Path) -> Path:
    if given:
        src = Path(given).resolve()
        if not src.is_dir():
            raise FileNotFoundError(f"--src {library}={given}: no such folder")
        return src
    dest = work / f"{library}-v{version}"
    if not dest.exists():
        work.mkdir(parents=True, exist_ok=True)
        cmd = ["git", "clone", "--depth", "1", "--branch", f"v{version}", REPOS[library], str(dest)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return dest


# ---------------------------------------------------------------------------------------------
# one pytest run
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (outcome, message)
    seconds: float = 0.0
    returncode: int = 0
    log: str = ""
    plugin: dict | None = None

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(OUTCOMES, 0)
        for outcome, _ in self.outcomes.values():
            out[outcome] += 1
        out["total"] = len(self.outcomes)
        return out


_RANK = {"skipped": 0, "passed": 1, "failed": 2, "error": 3}


def _node_id(classname: str, name: str, cwd: Path) -> str:
    """pytest's node id (``path.py::Class::test``) from a junit ``classname`` and ``name``."""
    parts = classname.split(".") if classname else []
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (cwd / path).exists():
            return "::".join([path, *parts[i:], name])
    return "::".join([*parts, name]) if parts else name


def _one_line(text: str | None, limit: int = 300) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    if line.endswith(":") and len(lines) > 1:  # "...: the following weights:" + the list
        line = f"{line} {lines[1]}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_junit(path: Path, cwd: Path) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        nid = _node_id(case.get("classname", ""), case.get("name", ""), cwd)
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = _one_line(child.get("message") or child.text)
                break
        old = out.get(nid)
        if old is None or _RANK[outcome] > _RANK[old[0]]:
            out[nid] = (outcome, message)
    return out


def run_pytest(python: str, cwd: Path, targets: list[str], suite: Suite, patched: bool,
               out: Path, settings: list[str] | None, env: dict, extra: list[str],
               timeout: float | None) -> Run:
    tag = f"{suite.name}-{'patched' if patched else 'upstream'}"
    junit = out / "junit" / f"{tag}.xml"
    log = out / "logs" / f"{tag}.log"
    report = out / "plugin" / f"{suite.name}.json"
    for p in (junit, log, report):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.unlink(missing_ok=True)
    cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rN",
           "-W", "ignore::pytest.PytestUnknownMarkWarning", f"--junitxml={junit}", *targets]
    if suite.k:
        cmd += ["-k", suite.k]
    if patched:
        cmd += ["-p", PLUGIN, f"--vlprune-report={report}"]
        for s in settings or suite.settings:
            cmd += ["--vlprune-setting", s]
    cmd += extra
    print(f"[{tag}] cd {cwd} && {' '.join(_quote(c) for c in cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -9
            fh.write(f"\n[run.py] killed after {timeout} s\n")
    run = Run(seconds=time.perf_counter() - start, returncode=rc, log=str(log))
    if junit.exists():
        run.outcomes = read_junit(junit, cwd)
    if patched and report.exists():
        run.plugin = json.loads(report.read_text())
    c = run.counts()
    print(f"[{tag}] {run.seconds:.0f} s, exit {rc}: "
          + ", ".join(f"{c[k]} {k}" for k in OUTCOMES), flush=True)
    return run


def reread(out: Path, cwd: Path, suite: str, mode: str, earlier: dict) -> Run:
    """The :class:`Run` an earlier ``run_pytest`` left in ``out`` (``--reuse``)."""
    junit = out / "junit" / f"{suite}-{mode}.xml"
    report = out / "plugin" / f"{suite}.json"
    if not junit.exists():
        raise FileNotFoundError(f"--reuse: {junit} is missing; run {suite} first")
    old = earlier.get(mode, {})
    run = Run(outcomes=read_junit(junit, cwd), seconds=old.get("seconds", 0.0),
              returncode=old.get("returncode", 0), log=str(out / "logs" / f"{suite}-{mode}.log"))
    if mode == "patched" and report.exists():
        run.plugin = json.loads(report.read_text())
    return run


def _quote(s: str) -> str:
    return s if re.fullmatch(r"[\w@%+=:,./-]+", s) else "'" + s.replace("'", "'\\''") + "'"


# ---------------------------------------------------------------------------------------------
# comparison and output
# ---------------------------------------------------------------------------------------------

BAD = ("failed", "error")


def compare(up: Run, pa: Run) -> dict:
    """Tests whose outcome differs: failing (failed / error) only patched or only upstream,
    passing upstream but skipped patched (or the other way), present in one run only."""
    patched_only, upstream_only, missing = [], [], []
    skipped_patched, skipped_upstream = [], []
    tests = (pa.plugin or {}).get("tests", {})
    for nid in sorted(set(up.outcomes) | set(pa.outcomes)):
        a, b = up.outcomes.get(nid), pa.outcomes.get(nid)
        if a is None or b is None:
            missing.append({"id": nid, "upstream": a and a[0], "patched": b and b[0]})
        elif b[0] in BAD and a[0] not in BAD:
            models = tests.get(nid, {})
            patched_only.append({"id": nid, "upstream": a[0], "patched": b[0], "error": b[1],
                                 "models_patched": models.get("patched", 0),
                                 "models_left_alone": models.get("left_alone", 0)})
        elif a[0] in BAD and b[0] not in BAD:
            upstream_only.append({"id": nid, "upstream": a[0], "patched": b[0], "error": a[1]})
        elif a[0] == "passed" and b[0] == "skipped":
            skipped_patched.append({"id": nid, "reason": b[1]})
        elif a[0] == "skipped" and b[0] == "passed":
            skipped_upstream.append({"id": nid, "reason": a[1]})
    return {"patched_only": patched_only, "upstream_only": upstream_only,
            "skipped_only_patched": skipped_patched, "skipped_only_upstream": skipped_upstream,
            "missing": missing}


def plugin_summary(report: dict | None) -> dict:
    if not report:
        return {}
    patched = sum(r["count"] for r in report.get("patched", []))
    alone = sum(r["count"] for r in report.get("left_alone", []))
    return {"models_patched": patched, "models_left_alone": alone,
            "patched": report.get("patched", []), "left_alone": report.get("left_alone", [])}


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# Upstream test suites with vlprune's plugin (reducing nothing)", ""]
    if result.get("note"):
        lines += [result["note"], ""]
    v = result["versions"]
    vl = result.get("vlprune", {})
    lines.append(f"vlprune from `{vl.get('path')}` (git: {vl.get('commit') or 'not a checkout'}).")
    lines.append(f"Installed: python {v.get('python')}, torch {v.get('torch')}, timm {v.get('timm')}, "
                 f"transformers {v.get('transformers')}, pytest {v.get('pytest')}.")
    for lib, s in result["sources"].items():
        lines.append(f"- {lib} tests from `{s['path']}` (declares {s['declares']}"
                     f"{'' if s['matches'] else ' — NOT the installed version'})")
    lines += ["", "| suite | run | passed | failed | skipped | error | total | seconds |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in result["suites"].items():
        for mode in ("upstream", "patched"):
            c = s[mode]
            lines.append(f"| {name} | {mode} | {c['passed']} | {c['failed']} | {c['skipped']} | "
                         f"{c['error']} | {c['total']} | {c['seconds']:.0f} |")
    lines += ["", "| suite | fail only patched | fail only upstream | skipped only patched | "
              "in one run only | models patched | models left alone |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in result["suites"].items():
        p = s.get("plugin", {})
        lines.append(f"| {name} | {len(s['patched_only'])} | {len(s['upstream_only'])} | "
                     f"{len(s['skipped_only_patched'])} | {len(s['missing'])} | "
                     f"{p.get('models_patched', '-')} | {p.get('models_left_alone', '-')} |")
    for name, s in result["suites"].items():
        lines += ["", f"## {name}", "", f"Files: {', '.join(f'`{f}`' for f in s['files'])}",
                  f"Subset: `-k {s['k']!r}`" if s["k"] else "Subset: all tests",
                  f"Plugin settings: {', '.join(f'`{x}`' for x in s['settings'])}", ""]
        for r in s.get("plugin", {}).get("left_alone", []):
            lines.append(f"- left alone: {r['library']} `{r['class']}` x{r['count']}: {r['reason']}")
        if s["patched_only"]:
            lines += ["", "Fail only when patched:", ""]
            for r in s["patched_only"]:
                lines.append(f"- `{r['id']}` ({r['patched']}): {r['error'] or '(no message)'}")
        else:
            lines += ["", "No test fails only when patched."]
        if s["skipped_only_patched"]:
            lines += ["", "Pass upstream, skipped when patched:", ""]
            lines += [f"- `{r['id']}`: {r['reason']}" for r in s["skipped_only_patched"]]
        if s["upstream_only"]:
            lines += ["", "Fail only upstream (unpatched):", ""]
            lines += [f"- `{r['id']}`: {r['error']}" for r in s["upstream_only"]]
        if s["missing"]:
            lines += ["", f"In one run only: {len(s['missing'])} (e.g. "
                      f"`{s['missing'][0]['id']}`; see results.json)"]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", default="timm,clip,siglip,llava",
                   help="comma-separated, of: " + ", ".join(SUITES))
    p.add_argument("--src", action="append", default=[], metavar="LIB=DIR",
                   help="use this checkout of LIB (timm or transformers) instead of cloning")
    p.add_argument("--work", default=str(ROOT / "results/upstream_suites/src"),
                   help="where clones go (default: results/upstream_suites/src, git-ignored)")
    p.add_argument("--out", default=str(ROOT / "results/upstream_suites"),
                   help="results.json, results.md, logs/, junit/, plugin/ go here "
                        "(default: results/upstream_suites, git-ignored)")
    p.add_argument("--python", default=sys.executable,
                   help="the Python that runs pytest (needs the libraries and their test deps)")
    p.add_argument("--vlprune-path", default=str(ROOT),
                   help="the folder holding the vlprune package to test, put first on "
                        "PYTHONPATH (default: this checkout)")
    p.add_argument("--setting", action="append", default=None, metavar="[FAMILY:] NAME=VALUE ...",
                   help="plugin settings for every suite (default: per suite, see SUITES)")
    p.add_argument("--full", action="store_true", help="no -k subsets: every test (hours)")
    p.add_argument("--online", action="store_true",
                   help="let tests reach the Hugging Face Hub (default: HF_HUB_OFFLINE=1)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per pytest run")
    p.add_argument("--note", default="", help="a line for the top of results.md (provenance)")
    p.add_argument("--fresh", action="store_true",
                   help="drop the suites an earlier results.json in --out holds (default: keep "
                        "those not run now, when the installed versions are the same)")
    p.add_argument("--reuse", action="store_true",
                   help="do not run pytest: re-read the junit / plugin files an earlier run left "
                        "in --out and rebuild results.json / results.md")
    p.add_argument("--only", choices=("both", "upstream", "patched"), default="both",
                   help=argparse.SUPPRESS)
    p.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = p.parse_args(argv)

    names = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        p.error(f"unknown suite(s) {unknown}; known: {list(SUITES)}")
    given = {}
    for item in args.src:
        lib, eq, path = item.partition("=")
        if not eq or lib not in REPOS:
            p.error(f"--src takes LIB=DIR with LIB one of {list(REPOS)}, got {item!r}")
        given[lib] = path

    versions = installed_versions(args.python)
    libs = sorted({SUITES[n].library for n in names})
    for lib in libs:
        if versions.get(lib) is None:
            p.error(f"{lib} is not installed in {args.python}")
    deps = ["pytest"]
    if "transformers" in libs:
        deps += ["parameterized", "xdist", "requests", "httpx"]
    missing = missing_modules(args.python, deps)
    if missing:
        print(f"warning: {args.python} lacks {missing}: upstream's tests may not collect "
              "(pip install parameterized pytest-xdist requests httpx)", file=sys.stderr)

    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sources, srcs = {}, {}
    for lib in libs:
        src = get_source(lib, versions[lib], given.get(lib), work)
        declared = source_version(lib, src)
        srcs[lib] = src
        sources[lib] = {"path": str(src), "declares": declared,
                        "matches": declared == versions[lib]}
        if declared != versions[lib]:
            print(f"warning: {src} declares {lib} {declared}, installed is {versions[lib]}",
                  file=sys.stderr)

    env = dict(os.environ)
    vlp = Path(args.vlprune_path).resolve()
    if not (vlp / "vlprune" / "testing" / "pytest_plugin.py").exists():
        p.error(f"--vlprune-path {vlp}: no vlprune/testing/pytest_plugin.py there")
    env["PYTHONPATH"] = os.pathsep.join([str(vlp), *filter(None, [env.get("PYTHONPATH")])])
    if not args.online:
        env["HF_HUB_OFFLINE"] = "1"

    result = {"versions": versions, "sources": sources, "full": args.full, "note": args.note,
              "vlprune": {"path": str(vlp), "commit": git_commit(vlp)}, "suites": {}}
    old = out / "results.json"
    earlier_suites = json.loads(old.read_text()).get("suites", {}) if old.exists() else {}
    if old.exists() and not args.fresh:
        earlier = json.loads(old.read_text())
        if earlier.get("versions") == versions and earlier.get("full") == args.full:
            result["suites"] = {k: v for k, v in earlier.get("suites", {}).items()
                                if k not in names}
            result["sources"] = {**earlier.get("sources", {}), **sources}
            result["note"] = args.note or earlier.get("note", "")
    for name in names:
        suite = SUITES[name]
        if args.full:
            suite = Suite(suite.name, suite.library, suite.files, "", suite.settings, suite.exclude)
        src = srcs[suite.library]
        files = sorted({str(f.relative_to(src)) for g in suite.files for f in src.glob(g)
                        if not any(x in f.name for x in suite.exclude)})
        if not files:
            print(f"[{name}] no test files match {suite.files} under {src}", file=sys.stderr)
            continue
        runs = {}
        for mode in ("upstream", "patched"):
            if args.only not in ("both", mode):
                runs[mode] = Run()
                continue
            if args.reuse:
                runs[mode] = reread(out, src, name, mode, earlier_suites.get(name, {}))
                continue
            runs[mode] = run_pytest(args.python, src, files, suite, mode == "patched", out,
                                    args.setting, env, args.pytest_args, args.timeout)
        diff = compare(runs["upstream"], runs["patched"])
        result["suites"][name] = {
            "files": files, "k": suite.k, "settings": list(args.setting or suite.settings),
            **{mode: {**r.counts(), "seconds": round(r.seconds, 1), "returncode": r.returncode,
                      "log": r.log} for mode, r in runs.items()},
            "plugin": plugin_summary(runs["patched"].plugin),
            **diff,
        }
        # written after every suite, so a long session leaves what it has
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        write_markdown(result, out / "results.md")
        print(f"[{name}] fail only patched: {len(diff['patched_only'])}, only upstream: "
              f"{len(diff['upstream_only'])}", flush=True)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
