"""The benchmark runner and the `vlprune` command (structure and arithmetic, never timings)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import vlprune
from vlprune.cli import main
from vlprune.cli.args import parse_merge_list
from vlprune.eval.bench import run_bench
from vlprune.eval.sweep import BASELINE, Setting

timm = pytest.importorskip("timm")


def test_run_bench_rows_and_arithmetic(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=96).eval()
    result = run_bench(
        model, [Setting.merge(0), Setting.merge(4), Setting.merge((4, 0.5))],
        model_name="test_vit", batch_size=2, rounds=2, iters=1, warmup=0, progress=False,
    )
    assert [r.setting for r in result.rows] == [BASELINE, "r=0", "r=4", "r=4@0.5"]
    base = result.row(BASELINE)
    assert base.flops_ratio == 1.0 and base.speedup == 1.0
    assert result.row("r=0").gflops_per_img == base.gflops_per_img
    for label in ("r=4", "r=4@0.5"):
        row = result.row(label)
        assert row.flops_ratio > 1.2
        assert row.tokens_final < 37
        assert row.efficiency == pytest.approx(row.speedup / row.flops_ratio)
        assert row.speedup == pytest.approx(base.batch_ms / row.batch_ms)
        assert len(row.times_ms) == 2 and row.peak_mem_mb > 0
    assert not vlprune.is_patched(model)  # the runner leaves the model as it found it
    result.write_json(tmp_path / "r.json")
    result.write_csv(tmp_path / "r.csv")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["env"]["torch"] == torch.__version__ and len(data["rows"]) == 4
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [r["setting"] for r in rows] == [BASELINE, "r=0", "r=4", "r=4@0.5"]
    assert "speedup" in result.table()


def test_run_bench_rejects_duplicates():
    model = timm.create_model("test_vit", img_size=64)
    with pytest.raises(ValueError, match="duplicate"):
        run_bench(model, [Setting.merge(2), Setting.merge(2)], batch_size=1, progress=False)


def test_cli_bench(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main([
        "bench", "--model", "test_vit", "--img-size", "64", "--merge-r", "0,3", "--batch-size", "2",
        "--rounds", "1", "--iters", "1", "--warmup", "0", "--no-progress", "--json", str(out),
        "--csv", str(tmp_path / "b.csv"), "--plot", str(tmp_path / "b.png"),
    ])
    assert rc == 0
    text = capsys.readouterr().out
    assert "efficien" in text.lower() or "effic." in text
    last = text.strip().splitlines()[-1]
    summary = json.loads(last)
    assert set(summary["rows"]) == {BASELINE, "r=0", "r=3"}
    assert json.loads(out.read_text())["model"] == "test_vit"
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_describe(capsys):
    assert main(["describe", "--model", "test_vit", "--img-size", "64", "--merge-r", "4"]) == 0
    text = capsys.readouterr().out
    assert "tokens in" in text and "GFLOPs" in text


def test_cli_open_clip_tower(capsys):
    pytest.importorskip("open_clip")
    rc = main(["describe", "--model", "open_clip:ViT-B-32", "--img-size", "64", "--merge-r", "2"])
    assert rc == 0
    assert "open_clip_vision" in capsys.readouterr().out
    assert main(["describe", "--model", "open_clip:ViT-Q-99"]) == 2
    assert "vlprune describe: error: unknown open_clip config" in capsys.readouterr().err


def test_cli_errors(capsys):
    assert main(["bench", "--model", "no_such_vit", "--no-progress"]) == 2
    assert "vlprune bench: error: unknown timm model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--merge-r", "a,b"])
    assert "bad merge-r item" in capsys.readouterr().err
    rc = main(["describe", "--model", "test_vit", "--img-size", "64", "--merge-r", "99:3"])
    assert rc == 2 and "merge_r" in capsys.readouterr().err


def test_cli_prune_options_need_keep(capsys):
    assert main(["describe", "--model", "test_vit", "--img-size", "64", "--prune-fuse"]) == 2
    assert "--prune-fuse given without --prune-keep" in capsys.readouterr().err


def test_cli_describe_hybrid(capsys):
    rc = main(["describe", "--model", "test_vit", "--img-size", "96", "--merge-r", "2",
               "--prune-keep", "0.5", "--prune-layers", "1", "--prune-recycle"])
    assert rc == 0
    row1 = [ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] == ["1"]][0]
    assert row1.split() == ["1", "35", "0.5", "2", "16"]  # 34 -> 1 + 17 kept, then r=2


def test_parse_merge_list():
    assert parse_merge_list("0, 8,16:0.5") == [0, 8, (16, 0.5)]


@pytest.mark.parametrize(
    "model, family",
    [("open_clip:ViT-B-32", "open_clip_text"), ("hf_clip:ViT-B-32", "hf_clip_text"),
     ("hf_siglip:base-patch16-224", "hf_clip_text")],
)
def test_cli_text_towers(model, family, capsys):
    pytest.importorskip("open_clip" if model.startswith("open_clip") else "transformers")
    rc = main(["describe", "--model", model, "--tower", "text", "--merge-r", "4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert family in text
    rows = [ln.split() for ln in text.splitlines() if ln.startswith("text ")]
    assert len(rows) == 12
    assert int(rows[0][2]) - int(rows[0][-1]) == 4  # full-length random texts: r tokens per layer


def test_cli_hf_image_tower_and_errors(capsys):
    pytest.importorskip("transformers")
    rc = main(["describe", "--model", "hf_siglip:base-patch16-224", "--img-size", "64",
               "--merge-r", "2"])
    assert rc == 0 and "hf_clip_vision" in capsys.readouterr().out
    assert main(["describe", "--model", "hf_clip:ViT-Q-99"]) == 2
    assert "unknown hf_clip shape" in capsys.readouterr().err
    assert main(["describe", "--model", "test_vit", "--tower", "text"]) == 2
    assert "--tower text needs" in capsys.readouterr().err


def test_run_bench_on_a_text_tower():
    pytest.importorskip("open_clip")
    from open_clip.transformer import TextTransformer

    torch.manual_seed(0)
    model = TextTransformer(context_length=24, vocab_size=100, width=32, heads=2, layers=3,
                            output_dim=16).eval()
    result = run_bench(model, [Setting.merge(2)], batch_size=2, rounds=1, iters=1, warmup=0,
                       progress=False)
    assert result.input_size == (24,)
    row = result.row("r=2")
    assert row.tokens_final == 24 - 3 * 2 and row.flops_ratio > 1.1


def test_plot_speedup_series(tmp_path):
    pytest.importorskip("matplotlib")
    from vlprune.eval.bench import plot_speedup

    pts = [(BASELINE, 1.0, 1.0, 1.0), ("r=8", 1.5, 1.4, 1.4 / 1.5)]
    path = tmp_path / "p.png"
    plot_speedup(path, {"batch 1": pts, "batch 8": pts[:1]}, xlabel="x", ylabel="y", title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_speedup(path, {"": []}, xlabel="x", ylabel="y", title="t")


def test_config_label_llava_options():
    from vlprune.config import ReductionConfig
    from vlprune.eval.sweep import config_label

    assert config_label(ReductionConfig(llm_layer=2, llm_keep=64)) == "llm 64@2"
    assert config_label(ReductionConfig(visual_keep=64, llm_layer=2, llm_keep=0.5,
                                        llm_renumber_positions=True)) == (
        "visual 64 cls_attn + llm 0.5@2 +renumber")
    # an adaptive visual score has no count of its own to show
    assert config_label(ReductionConfig(visual_score="prumerge")) == "visual prumerge"


def test_cli_adaptive_visual_score(capsys):
    """prumerge / prumerge_plus run without --visual-keep (each image picks its count) and
    refuse one; the other scores still need it."""
    assert main(["describe", "--model", "llava:tiny", "--visual-score", "prumerge"]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]  # the settings that differ from the defaults
    assert "settings: visual_score='prumerge'" in head and "visual_keep" not in head
    assert main(["describe", "--model", "llava:tiny", "--visual-score", "prumerge_plus",
                 "--visual-keep", "8"]) == 2
    assert "drop --visual-keep" in capsys.readouterr().err
    assert main(["describe", "--model", "llava:tiny", "--visual-score", "diversity"]) == 2
    assert "without --visual-keep" in capsys.readouterr().err
