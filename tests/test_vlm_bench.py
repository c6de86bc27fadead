"""The LLaVA prefill/decode benchmark and `vlprune bench --model llava:...` (structure and
arithmetic, never timings)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import vlprune
from vlprune.cli import build_llava, main
from vlprune.eval.bench import BASELINE, Setting
from vlprune.eval.vlm_bench import llava_prompts, run_vlm_bench

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
    for label, keep in zip(labels[1:], (192, 64, 144)):
        row = result.row(label)
        assert row.visual_tokens == keep and row.llm_tokens == keep + 20
        assert row.flops_ratio > 1.0
        assert row.speedup == pytest.approx(base.prefill_ms / row.prefill_ms)
        assert row.efficiency == pytest.approx(row.speedup / row.flops_ratio)
        assert len(row.times_prefill_ms) == 2 and len(row.times_generate_ms) == 2
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
    assert row.decode_tok_s is None and row.times_generate_ms == [] and row.peak_mem_mb is None


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


def test_cli_llava_errors():
    with pytest.raises(SystemExit, match="unknown llava shape"):
        main(["describe", "--model", "llava:99b"])
    with pytest.raises(SystemExit, match="--llm-layers / --vision-layers need a llava"):
        main(["describe", "--model", "test_vit", "--llm-layers", "2"])
    with pytest.raises(SystemExit, match="--text-tokens / --new-tokens need a llava"):
        main(["bench", "--model", "test_vit", "--new-tokens", "2", "--no-progress"])
    with pytest.raises(SystemExit, match="--visual-score given without --visual-keep"):
        main(["describe", "--model", "llava:tiny", "--visual-score", "random"])


def test_llava_1_5_7b_shape():
    """The real shape's config (not built: the config alone carries the shapes)."""
    from vlprune.cli import LLAVA_SHAPES

    spec = LLAVA_SHAPES["1.5-7b"]
    v, t = spec["vision"], spec["text"]
    assert (v["image_size"] // v["patch_size"]) ** 2 == 576
    assert (v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"]) == (1024, 24, 16)
    assert (t["hidden_size"], t["num_attention_heads"], t["intermediate_size"]) == (4096, 32, 11008)
    assert t["vocab_size"] == 32064 and spec["real_llm_layers"] == 32
