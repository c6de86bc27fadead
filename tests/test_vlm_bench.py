"""The LLaVA prefill/decode benchmark and `vlprune bench --model llava:...` (structure and
arithmetic, never timings)."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

import vlprune
from vlprune.cli import main
from vlprune.eval.sweep import BASELINE, Setting
from vlprune.eval.vlm_bench import llava_prompts, run_vlm_bench
from vlprune.models import build_llava

pytest.importorskip("transformers")

N_IMG = 576  # llava:tiny keeps LLaVA-1.5's 336 px / patch 14 grid


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_llava("tiny").eval()


def test_prompts_left_padded(model):
    x = llava_prompts(model, 3, text_tokens=12)
    image_id = model.config.image_token_id
    assert x["input_ids"].shape == (3, N_IMG + 12)
    assert x["pixel_values"].shape == (3, 3, 336, 336)
    assert x["attention_mask"].sum(1).tolist() == [N_IMG + 12, N_IMG + 9, N_IMG + 6]
    assert ((x["input_ids"] == image_id).sum(1) == N_IMG).all()
    assert (x["attention_mask"][:, -1] == 1).all()  # left padding


def test_run_vlm_bench_rows_and_arithmetic(model, tmp_path):
    settings = [Setting.of(visual_keep=k, visual_score="cls_attn") for k in (192, 64)]
    settings.append(Setting.of(visual_keep=144, visual_score="pool"))
    result = run_vlm_bench(model, settings, model_name="llava:tiny", batch_size=2,
                           text_tokens=20, new_tokens=3, rounds=2, warmup=0, progress=False)
    labels = [BASELINE, "visual 192 cls_attn", "visual 64 cls_attn", "visual 144 pool"]
    assert [r.setting for r in result.rows] == labels
    base = result.row(BASELINE)
    assert base.visual_tokens == N_IMG and base.llm_tokens == N_IMG + 20
    assert base.flops_ratio == 1.0 and base.speedup == 1.0 and base.decode_speedup == 1.0
    assert base.visual_tokens_last == N_IMG and base.batch_size == 2
    for label, keep in zip(labels[1:], (192, 64, 144)):
        row = result.row(label)
        assert row.visual_tokens == keep and row.llm_tokens == keep + 20
        assert row.visual_tokens_last == keep and row.llm_tokens_last == keep + 20
        assert row.flops_ratio > 1.0
        assert row.speedup == pytest.approx(base.prefill_ms / row.prefill_ms)
        assert row.efficiency == pytest.approx(row.speedup / row.flops_ratio)
        assert len(row.times_prefill_ms) == 2 and len(row.times_decode_ms) == 2
        assert row.decode_tok_s == pytest.approx(2 * (3 - 1) / row.decode_ms * 1e3)
        assert row.peak_mem_mb > 0
    ratios = [result.row(label).flops_ratio for label in labels[1:3]]
    assert ratios[0] < ratios[1]  # fewer visual tokens, fewer FLOPs
    assert not vlprune.is_patched(model)
    result.write_json(tmp_path / "r.json")
    result.write_csv(tmp_path / "r.csv")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["image_tokens"] == N_IMG and data["new_tokens"] == 3 and len(data["rows"]) == 4
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [r["setting"] for r in rows] == labels and "decode_tok_s" in rows[0]
    assert "prefill ms" in result.table()


def test_run_vlm_bench_without_decode(model):
    result = run_vlm_bench(model, [Setting.of(visual_keep=0.25)], batch_size=1, new_tokens=0,
                           rounds=1, warmup=0, measure_memory=False, progress=False)
    row = result.row("visual 0.25 cls_attn")
    assert row.visual_tokens == N_IMG // 4
    assert row.decode_tok_s is None and row.times_decode_ms == [] and row.peak_mem_mb is None
    assert len(row.times_prefill_ms) == 1


def test_run_vlm_bench_batch_list_and_fastv(model, tmp_path):
    """Rows per batch size; a FastV row keeps its visual tokens up to llm_layer only."""
    settings = [Setting.of(llm_layer=1, llm_keep=64),
                Setting.of(visual_keep=64, llm_layer=1, llm_keep=32), Setting.of(text_keep=0.5)]
    result = run_vlm_bench(model, settings, batch_size=[1, 2], text_tokens=20, new_tokens=2,
                           rounds=1, warmup=0, measure_memory=False, progress=False)
    labels = [BASELINE, "llm 64@1", "visual 64 cls_attn + llm 32@1", "text 0.5"]
    assert result.batch_sizes == [1, 2] and result.batch_size == 1
    assert [(r.batch_size, r.setting) for r in result.rows] == [(b, x) for b in (1, 2) for x in labels]
    with pytest.raises(KeyError, match="give batch_size"):
        result.row(BASELINE)
    for b in (1, 2):
        assert result.row(BASELINE, b).speedup == 1.0
        fastv = result.row("llm 64@1", b)
        assert (fastv.visual_tokens, fastv.visual_tokens_last) == (N_IMG, 64)
        assert (fastv.llm_tokens, fastv.llm_tokens_last) == (N_IMG + 20, 64 + 20)
        assert 1.0 < fastv.flops_ratio < result.row(labels[2], b).flops_ratio
        both = result.row(labels[2], b)
        assert (both.visual_tokens, both.visual_tokens_last) == (64, 32)
        assert both.decode_tok_s is not None
        text = result.row("text 0.5", b)  # prompt dropping: fewer text tokens, every visual one
        assert text.visual_tokens == text.visual_tokens_last == N_IMG
        assert text.llm_tokens < N_IMG + 20
    # FLOPs are counted at batch 1, once per setting
    assert result.row(labels[1], 1).gflops_prefill == result.row(labels[1], 2).gflops_prefill
    result.write_csv(tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [(r["batch_size"], r["setting"]) for r in rows] == [
        (str(b), x) for b in (1, 2) for x in labels]
    assert rows[1]["visual_tokens_last"] == "64"
    result.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    table = result.table()
    assert "batch 1,2" in table and "last" in table
    assert sum(line.split()[:2] == ["2", "llm"] for line in table.splitlines()) == 1


def test_run_vlm_bench_refuses_before_running(model):
    with pytest.raises(ValueError, match="setting 'visual 999 cls_attn': visual_keep=999"):
        run_vlm_bench(model, [Setting.of(visual_keep=999)], progress=False)
    with pytest.raises(ValueError, match="duplicate batch sizes"):
        run_vlm_bench(model, [], batch_size=[2, 2], progress=False)
    with pytest.raises(ValueError, match="batch sizes must be ints >= 1"):
        run_vlm_bench(model, [], batch_size=[1, 0], progress=False)
    assert not vlprune.is_patched(model)


def test_cli_llava_bench(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main([
        "bench", "--model", "llava:tiny", "--setting", "visual_keep=64 visual_score=cls_attn",
        "--visual-keep", "128", "--batch-size", "2", "--rounds", "1", "--warmup", "0",
        "--new-tokens", "2", "--no-progress", "--no-memory", "--json", str(out),
        "--plot", str(tmp_path / "b.png"),
    ])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(summary["rows"]) == [BASELINE, "visual 128 cls_attn", "visual 64 cls_attn"]
    assert summary["rows"]["visual 64 cls_attn"]["visual_tokens"] == 64
    assert json.loads(out.read_text())["batch_size"] == 2
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_llava_batch_list_fastv_and_plot(tmp_path, capsys):
    rc = main([
        "bench", "--model", "llava:tiny", "--llm-layers", "3", "--batch-size", "1,2",
        "--visual-keep", "64", "--setting", "llm_layer=2 llm_keep=64",
        "--setting", "visual_keep=64 llm_layer=2 llm_keep=32", "--rounds", "1", "--warmup", "0",
        "--new-tokens", "2", "--no-progress", "--no-memory", "--csv", str(tmp_path / "b.csv"),
        "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"),
    ])
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["batch_sizes"] == [1, 2] and list(summary["batches"]) == ["1", "2"]
    assert summary["rows"] == summary["batches"]["1"]
    for rows in summary["batches"].values():
        assert [(r["visual_tokens"], r["visual_tokens_last"]) for r in rows.values()] == [
            (N_IMG, N_IMG), (64, 64), (N_IMG, 64), (64, 32)]
        assert rows["llm 64@2"]["flops_ratio"] > 1.0
        assert all(r["decode_tok_s"] is not None for r in rows.values())
    table = out[:out.index("--result")]
    for col in ("visual", "LLM len", "GFLOPs", "FLOPs x", "prefill ms", "speedup", "effic.",
                "decode tok/s"):
        assert col in table
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["batch_sizes"] == [1, 2] and len(data["rows"]) == 8
    assert len(list(csv.DictReader(open(tmp_path / "b.csv")))) == 8
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_llava_default_settings_and_describe(capsys):
    rc = main(["bench", "--model", "llava:tiny", "--llm-layers", "1", "--vision-layers", "2",
               "--rounds", "1", "--warmup", "0", "--new-tokens", "0", "--no-progress",
               "--no-memory"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["visual_tokens"] for r in summary["rows"].values()] == [576, 192, 128, 64]
    assert main(["describe", "--model", "llava:tiny", "--visual-keep", "32"]) == 0
    text = capsys.readouterr().out
    assert "hf_llava" in text and "visual    0       576" in text


@pytest.mark.parametrize("argv, match", [
    (["describe", "--model", "llava:99b"], "unknown llava shape"),
    (["describe", "--model", "test_vit", "--llm-layers", "2"],
     "--llm-layers / --vision-layers need a vision-language model (llava:, qwen2.5-vl:"),
    (["bench", "--model", "test_vit", "--new-tokens", "2", "--no-progress"],
     "--text-tokens / --new-tokens need a llava"),
    (["describe", "--model", "llava:tiny", "--visual-score", "random"],
     "--visual-score given without --visual-keep"),
    (["bench", "--model", "test_vit", "--batch-size", "1,8", "--no-progress"],
     "a list of batch sizes needs a vision-language model (llava:, qwen2.5-vl:"),
])
def test_cli_llava_errors(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vlprune {argv[0]}: error: ") and match in err


@pytest.mark.parametrize("argv, match", [
    (["--batch-size", "1,x"], "bad batch size list '1,x'"),
    (["--batch-size", "0,8"], "every batch size must be >= 1"),
    (["--batch-size", "8,8"], "a batch size is repeated"),
    (["--setting", "llm_kep=4"], "unknown key 'llm_kep' \\(did you mean llm_keep"),
    (["--setting", "visual_keep"], "bad setting item 'visual_keep': not KEY=VALUE"),
])
def test_cli_llava_argument_errors(argv, match, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--model", "llava:tiny", "--no-progress", *argv])
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("argv, match", [
    (["--visual-keep", "999"],
     "setting 'visual 999 cls_attn': visual_keep=999 but an image gives only 576 visual tokens"),
    (["--setting", "llm_layer=1 llm_keep=700"], "llm_keep=700"),
    # llava:tiny's tower has no layer before the one LLaVA reads, so nothing can merge there
    (["--setting", "merge_r=8"], "nothing to merge or prune in the vision tower"),
    (["--setting", "text_merge_r=8"], "text_merge_r not supported on LlavaForConditionalGeneration"),
])
def test_cli_llava_setting_errors(argv, match, capsys):
    """Refused before anything runs: one line, exit status 2."""
    rc = main(["bench", "--model", "llava:tiny", "--llm-layers", "2", "--vision-layers", "2",
               "--no-progress", "--no-memory", *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("vlprune bench: error: ") and match in err


def test_llava_1_5_7b_shape():
    """The real shape's config (not built: the config alone carries the shapes)."""
    from vlprune.models import LLAVA_SHAPES

    spec = LLAVA_SHAPES["1.5-7b"]
    v, t = spec["vision"], spec["text"]
    assert (v["image_size"] // v["patch_size"]) ** 2 == 576
    assert (v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"]) == (1024, 24, 16)
    assert (t["hidden_size"], t["num_attention_heads"], t["intermediate_size"]) == (4096, 32, 11008)
    assert t["vocab_size"] == 32064 and spec["real_llm_layers"] == 32
