"""benchmarks/gpu_check.sh: its dry run (every step on the CPU at tiny sizes) finishes, prints
one summary line per step and table, and writes the bench JSON files; options and the error
without CUDA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
TABLES = ("vit_base", "vit_large", "open_clip_l14_336", "llava_7b")


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The script with this interpreter's bin folder first on PATH (its python, pytest)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHON", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run("--dry-run", "--out", str(out))
    return proc, out


@pytest.mark.slow
def test_dry_run_runs_every_step(dry_run):
    proc, out = dry_run
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    # each step announced, then done with its duration
    for i, title in enumerate(["pytest -m gpu"] + [f"bench {t}" for t in TABLES], start=1):
        assert re.search(rf"^== \[{i}/5\] {re.escape(title)} \(started ", proc.stdout, re.M), title
        assert re.search(rf"^== \[{i}/5\] {re.escape(title)}: ok in \d+ s$", proc.stdout, re.M), title
    assert re.search(r"^total: \d+ s \(\d+ min \d+ s\), dry run$", proc.stdout, re.M)
    assert "gpu_check: all steps ok" in proc.stdout
    assert "[FAILED]" not in proc.stdout


@pytest.mark.slow
def test_dry_run_summary_lines(dry_run):
    proc, out = dry_run
    lines = [ln.removeprefix("summary: ") for ln in proc.stdout.splitlines()
             if ln.startswith("summary: ")]
    # the gpu tests are collected, and skip without CUDA
    m = re.fullmatch(r"pytest -m gpu: (\d+) passed, 0 failed, 0 errors, (\d+) skipped", lines[0])
    assert m, lines[0]
    if not torch.cuda.is_available():
        assert m[1] == "0" and int(m[2]) >= 20
    row = r"[^;]+ \d+\.\d\dx speedup, efficiency \d+\.\d\d"
    for table in TABLES[:3]:  # one line per image table: every reduced row
        [line] = [ln for ln in lines if ln.startswith(f"{table} ")]
        assert re.fullmatch(rf"{table} \S+ b2 float32 on cpu \(\d+ img/s unpatched\): "
                            rf"{row}(; {row}){{3}}", line), line
        for setting in ("r=0", "r=8", "r=16", "cls_attn 0.7"):
            assert f": {setting} " in line or f"; {setting} " in line, (setting, line)
    llava = [ln for ln in lines if ln.startswith("llava_7b ")]  # one line per batch size
    assert [re.search(r" b(\d+) ", ln)[1] for ln in llava] == ["1", "2"]
    for line in llava:
        assert "llava:tiny" in line and "bfloat16 on cpu" in line
        for n in (192, 128, 64):
            assert f"576->{n} " in line, line
        assert "576->64 (llm 64@1) " in line, line
    assert (out / "summary.txt").read_text().count("\n") >= len(lines) + 6


@pytest.mark.slow
def test_dry_run_writes_the_files(dry_run):
    proc, out = dry_run
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__
    assert (out / "pytest_gpu.xml").read_text().count("<testcase") >= 20
    for table in TABLES:
        data = json.loads((out / f"bench_{table}.json").read_text())
        assert data["device"] == "cpu"
        assert data["rows"][0]["setting"] == "unpatched"
        assert all(r["speedup"] > 0 and r["efficiency"] > 0 for r in data["rows"])
        assert (out / f"bench_{table}.log").is_file()
    vit = json.loads((out / "bench_vit_base.json").read_text())
    assert vit["batch_size"] == 2 and vit["dtype"] == "float32"
    assert [r["setting"] for r in vit["rows"]] == ["unpatched", "r=0", "r=8", "r=16", "cls_attn 0.7"]
    llava = json.loads((out / "bench_llava_7b.json").read_text())
    assert llava["model"] == "llava:tiny" and llava["dtype"] == "bfloat16"
    assert llava["batch_sizes"] == [1, 2]
    assert sorted({r["visual_tokens"] for r in llava["rows"]}) == [64, 128, 192, 576]


def test_bad_option_and_missing_cuda(tmp_path):
    proc = _run("--bogus", timeout=60)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    proc = _run("--out", str(tmp_path / "x"), timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device here" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "x").exists()  # nothing started


def _helper():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summaries_fail_on_broken_outputs(tmp_path, capsys):
    helper = _helper()
    assert helper.main(["bench-summary", "vit_base", str(tmp_path / "missing.json")]) == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "m", "batch_size": 2, "dtype": "float16", "device": "cuda",
                               "rows": [{"setting": "unpatched", "speedup": 1.0, "efficiency": 1.0,
                                         "flops_ratio": 1.0, "img_per_s": 10.0},
                                        {"setting": "r=8", "speedup": float("nan"),
                                         "efficiency": 1.0, "flops_ratio": 1.3}]}))
    assert helper.main(["bench-summary", "vit_base", str(bad)]) == 1
    assert helper.main(["pytest-summary", str(tmp_path / "missing.xml")]) == 1
    xml = tmp_path / "report.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.test_gpu" name="test_a"/>'
                   '<testcase classname="tests.test_gpu" name="test_b"><failure/></testcase>'
                   '<testcase classname="tests.test_gpu" name="test_c"><skipped/></testcase>'
                   '</testsuite></testsuites>')
    assert helper.main(["pytest-summary", str(xml)]) == 0
    out = capsys.readouterr().out
    assert out.count("[FAILED]") == 3
    assert "pytest -m gpu: 1 passed, 1 failed, 0 errors, 1 skipped (tests.test_gpu::test_b)" in out
