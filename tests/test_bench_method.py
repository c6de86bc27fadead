"""How benchmarks time and report (interleaving, spread, allocator, load), the merge hot path's
equivalence with its plain form, and the ToMe speed script's plumbing (never timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlprune.core.plan import Plan
from vlprune.core.scores import head_sum
from vlprune.eval import machine
from vlprune.eval.bench import run_bench, spread_pct, time_interleaved
from vlprune.eval.sweep import Setting
from vlprune.merging.bipartite import bipartite_soft_matching

ROOT = Path(__file__).resolve().parents[1]


def test_time_interleaved_order_warmup_and_rounds():
    events, rounds_seen = [], []
    steps = [
        (name, lambda n=name: events.append(("switch", n)), lambda n=name: events.append(("call", n)))
        for name in ("a", "b")
    ]
    times = time_interleaved(steps, rounds=2, iters=3, warmup=1,
                             on_round=lambda done, t: rounds_seen.append((done, len(t["a"]))))
    # every round: a's switch, one untimed call and 3 timed ones, then b's; 3 rounds in all
    one_round = [("switch", "a")] + [("call", "a")] * 4 + [("switch", "b")] + [("call", "b")] * 4
    assert events == one_round * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6}  # the warmup round is dropped
    assert rounds_seen == [(1, 3), (2, 6)]
    assert all(t >= 0 for v in times.values() for t in v)


def test_spread_pct_by_hand():
    # quartiles (inclusive) of 1..5 are 2 and 4, the median 3: IQR / median = 2 / 3
    assert spread_pct([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx(200 / 3)
    assert spread_pct([7.0, 7.0, 7.0]) == 0.0
    assert spread_pct([3.0]) == 0.0


@pytest.mark.parametrize("env, expected", [
    ({}, "glibc (default)"),
    (machine.TUNED_MALLOC, "glibc (tuned: "),
    ({"MALLOC_ARENA_MAX": "2"}, "glibc (MALLOC_ARENA_MAX=2)"),
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "jemalloc (LD_PRELOAD=/usr/lib/libjemalloc.so.2)"),
])
def test_allocator_names_what_the_environment_sets(monkeypatch, env, expected):
    for k in [k for k in machine.os.environ if k.startswith("MALLOC_") or k == "LD_PRELOAD"]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert machine.allocator().startswith(expected)
    assert machine.environment()["allocator"] == machine.allocator()


def test_other_load_counts_other_processes_only():
    if not Path("/proc/stat").is_file():
        pytest.skip("needs /proc/stat")
    # a child process spinning for 1 s beside this one idling: one core of the machine busy
    spin = "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass"
    with machine.OtherLoad(threshold=0.0) as load:
        subprocess.run([sys.executable, "-c", spin], check=True)
    assert load.share is not None and load.share > 0.5 / os.cpu_count()
    assert "other processes used" in load.warning
    # this process spinning: its own time is not counted (the share stays well below 1)
    with machine.OtherLoad(threshold=1.0) as own:
        x = torch.randn(256, 256)
        for _ in range(200):
            x = (x @ x).tanh()
    assert own.share is not None and 0.0 <= own.share <= 1.0 and own.warning is None


def test_run_bench_reports_spread_and_live_lines():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=64).eval()
    lines = []
    result = run_bench(model, [Setting.merge(2)], batch_size=2, rounds=3, iters=1, warmup=0,
                       measure_memory=False, progress=False, live=lines.append)
    row = result.row("r=2")
    assert row.spread_pct == pytest.approx(spread_pct(row.times_ms))
    assert result.other_cpu is None or 0.0 <= result.other_cpu <= 1.0
    # the title, the header, one FLOPs line per setting before any timing, then a line per round
    assert lines[0] == result.title() and " allocator " in lines[0]
    assert lines[2].split()[0] == "unpatched" and lines[3].split()[0] == "r=2"
    assert [ln.split(":")[0] for ln in lines[4:]] == ["round 1/3", "round 2/3", "round 3/3"]
    assert "spread" in result.table() and "interquartile" in result.table()


def test_head_sum_is_the_head_sum():
    torch.manual_seed(0)
    for heads in (1, 2, 3, 5, 12, 16):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            # keys as the fused qkv projection leaves them: a strided view
            qkv = torch.randn(3, 17, 3, heads, 8).to(dtype)
            k = qkv.permute(2, 0, 3, 1, 4)[1]
            ref = k.double().sum(dim=1)
            got = head_sum(k)
            assert got.dtype == dtype and got.shape == (3, 17, 8)
            if dtype in (torch.float32, torch.float64):
                tol = 1e-5 if dtype == torch.float32 else 1e-12
                assert torch.allclose(got.double(), ref, rtol=0, atol=tol * heads)
            else:  # low precision: the same as torch's sum (accumulated in float32)
                assert torch.equal(got, k.sum(dim=1))


def _reference_merge(x, size, plan):
    """Size-weighted means by a loop over merge groups, in float64."""
    B, N, C = x.shape
    size = torch.ones(B, N, 1) if size is None else size
    out = torch.zeros(B, plan.num_kept, C, dtype=torch.float64)
    for b in range(B):
        groups = {j: [int(plan.keep[b, j])] for j in range(plan.num_kept)}
        for s, d in zip(plan.src[b].tolist(), plan.dst[b].tolist()):
            groups[d].append(s)
        for j, members in groups.items():
            w = size[b, members].double()
            out[b, j] = (x[b, members].double() * w).sum(0) / w.sum()
    return out


@pytest.mark.parametrize("with_size", [False, True])
def test_plan_apply_is_the_size_weighted_mean(with_size):
    torch.manual_seed(1)
    x = torch.randn(3, 21, 6)
    plan = bipartite_soft_matching(torch.randn(3, 21, 4), 7, num_protected=1)
    size = torch.randint(1, 6, (3, 21, 1)).float() if with_size else None
    out, new_size = plan.apply(x, size)
    assert torch.allclose(out.double(), _reference_merge(x, size, plan), atol=1e-6)
    expected = (torch.ones(3, 21, 1) if size is None else size).sum(dim=1)
    assert torch.equal(new_size.sum(dim=1), expected)  # sizes are conserved
    # the unmerged rows of a first merge are the tokens themselves, bit for bit
    merged_into = torch.zeros(3, plan.num_kept, dtype=torch.bool).scatter_(1, plan.dst, True)
    if not with_size:
        kept = torch.stack([x[b, plan.keep[b]] for b in range(3)])
        assert torch.equal(out[~merged_into], kept[~merged_into])
    # the input is not modified in place
    assert isinstance(plan, Plan) and out.data_ptr() != x.data_ptr()


FAKE_TOME = textwrap.dedent("""
    import types

    def _timm(model):
        # stands in for ToMe's patch: records that it ran and accepts model.r
        model.patched_by_fake_tome = True
        model.r = 0

    patch = types.SimpleNamespace(timm=_timm)
""")


def test_tome_speed_script_plumbing(tmp_path):
    pytest.importorskip("timm")
    (tmp_path / "tome").mkdir()
    (tmp_path / "tome" / "__init__.py").write_text(FAKE_TOME)
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tome_speed.py"), "--tome", str(tmp_path),
         "--tome-commit", "0" * 40, "--model", "test_vit", "--r", "2", "4", "-b", "2",
         "--rounds", "2", "--warmup", "0", "--no-progress", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    labels = [r["setting"] for r in data["rows"]]
    assert labels == ["unpatched", "ToMe r=2", "vlprune r=2", "ToMe r=4", "vlprune r=4"]
    assert data["reference"]["commit"] == "0" * 40 and "allocator" in data["env"]
    rows = {r["setting"]: r for r in data["rows"]}
    assert rows["vlprune r=4"]["flops_ratio"] > rows["vlprune r=2"]["flops_ratio"] > 1.0
    assert rows["ToMe r=4"]["flops_ratio"] == pytest.approx(1.0)  # the fake merges nothing
    for r in data["rows"]:
        assert len(r["times_ms"]) == 2
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_ratio"])
    vs = rows["vlprune r=2"]
    assert vs["vs_tome"] == pytest.approx(rows["ToMe r=2"]["ms_per_batch"] / vs["ms_per_batch"])
    assert "| vlprune r=4 |" in proc.stdout


def test_tome_speed_script_refuses_a_folder_without_tome(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tome_speed.py"), "--tome", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode != 0 and "holds no tome/ package" in proc.stderr
