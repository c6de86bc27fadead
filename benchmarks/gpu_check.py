"""Helper of benchmarks/gpu_check.sh: the machine facts, the CUDA check and one summary line
per step read back from what the step wrote (a bench JSON, pytest's JUnit XML).

    python benchmarks/gpu_check.py require-cuda
    python benchmarks/gpu_check.py env OUT/env.json
    python benchmarks/gpu_check.py pytest-summary OUT/pytest_gpu.xml
    python benchmarks/gpu_check.py bench-summary ID OUT/bench_ID.json

A summary exits 1 (after printing what it found) when the file is missing, unreadable or
holds no result, so a broken step cannot pass unnoticed.
"""

from __future__ import annotations

import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

BASELINE = "unpatched"


class SummaryError(Exception):
    """A step's output file is missing or does not hold what the step should have written."""


def require_cuda() -> int:
    import torch

    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.device_count()} x {torch.cuda.get_device_name()}, "
              f"torch {torch.__version__} (CUDA {torch.version.cuda})")
        return 0
    print("gpu_check: error: no CUDA device here (torch.cuda.is_available() is False, "
          f"torch {torch.__version__}, CUDA build {torch.version.cuda}); run on a GPU machine, "
          "or add --dry-run to try every step on the CPU at tiny sizes", file=sys.stderr)
    return 2


def write_env(path: str) -> int:
    """The versions and the machine, as JSON (also what every bench JSON records)."""
    from importlib import metadata

    import torch

    from vlprune.eval.machine import environment

    env = environment()
    for lib in ("timm", "open_clip_torch", "transformers", "accelerate"):
        try:
            env[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    env["cuda"] = torch.version.cuda
    Path(path).write_text(json.dumps(env, indent=2) + "\n")
    keys = ("vlprune", "torch", "cuda", "timm", "open_clip_torch", "transformers", "gpu")
    print(", ".join(f"{k} {env[k]}" for k in keys if env.get(k)))
    return 0


def pytest_summary(path: str) -> str:
    """``pytest -m gpu: 40 passed, 0 failed, 0 errors, 3 skipped`` from JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise SummaryError(f"pytest -m gpu: no readable report {path} ({e})") from None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    line = (f"pytest -m gpu: {passed} passed, {count['failures']} failed, {count['errors']} errors, "
            f"{count['skipped']} skipped")
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    if bad:
        line += " (" + ", ".join(bad[:8]) + (", ..." if len(bad) > 8 else "") + ")"
    if count["tests"] == 0:
        raise SummaryError(line + ": no test collected")
    return line


def _row_text(row: dict) -> str:
    return f"{row['setting']} {row['speedup']:.2f}x speedup, efficiency {row['efficiency']:.2f}"


def bench_summary(table: str, path: str) -> list[str]:
    """One line per batch size of a ``vlprune bench --json`` file: every reduced row's speedup
    and efficiency (VLMs: prefill, with the visual tokens reaching the language model)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SummaryError(f"{table}: no readable bench JSON {path} ({e})") from None
    rows = data.get("rows") or []
    if not rows or rows[0].get("setting") != BASELINE:
        raise SummaryError(f"{table}: {path} has no rows, or no {BASELINE!r} row first")
    for r in rows:
        for key in ("speedup", "efficiency", "flops_ratio"):
            v = r.get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise SummaryError(f"{table}: row {r.get('setting')!r} has {key}={v!r}")
    vlm = "visual_tokens" in rows[0]
    sizes = data.get("batch_sizes") or [data["batch_size"]]
    lines = []
    for b in sizes:
        mine = [r for r in rows if r.get("batch_size", b) == b]
        base = [r for r in mine if r["setting"] == BASELINE]
        if len(base) != 1 or len(mine) < 2:
            raise SummaryError(f"{table}: batch {b} lacks the unpatched row or a reduced one")
        if vlm:
            n = base[0]["visual_tokens"]
            parts = [f"{n}->{r['visual_tokens_last']}" + (
                f" ({r['setting']})" if r["visual_tokens"] != r["visual_tokens_last"] else ""
            ) + f" {r['speedup']:.2f}x speedup, efficiency {r['efficiency']:.2f}"
                for r in mine if r is not base[0]]
            what = f"prefill {base[0]['prefill_ms']:.0f} ms unpatched"
        else:
            parts = [_row_text(r) for r in mine if r is not base[0]]
            what = f"{base[0]['img_per_s']:.0f} img/s unpatched"
        lines.append(f"{table} {data['model']} b{b} {data['dtype']} on {data['device']} "
                     f"({what}): " + "; ".join(parts))
    return lines


def main(argv: list[str]) -> int:
    usage = ("usage: gpu_check.py require-cuda | env PATH | pytest-summary XML | "
             "bench-summary TABLE JSON")
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "require-cuda" and not args:
            return require_cuda()
        if cmd == "env" and len(args) == 1:
            return write_env(args[0])
        if cmd == "pytest-summary" and len(args) == 1:
            print(pytest_summary(args[0]))
            return 0
        if cmd == "bench-summary" and len(args) == 2:
            print("\n".join(bench_summary(*args)))
            return 0
    except SummaryError as e:
        print(f"{e} [FAILED]")
        return 1
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
