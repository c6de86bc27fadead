"""`lmms-eval --model vlprune` (vlprune.lmms): a tiny random LLaVA saved with its offline
processor to a local folder and a tiny local task (JSON questions over generated images,
`--include_path`), run through the lmms-eval command line offline: unpatched, at
`visual_keep=1.0` (same answers as unpatched and as `vlprune eval vqa` on the same data) and at
`visual_keep=4` (the logged visual tokens are the budget); and the model arguments refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")
pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from vlprune.eval import vlm as vlm_mod  # noqa: E402
from vlprune.eval.vqa_data import load_vqa  # noqa: E402

N_IMG = 576  # llava:tiny: 336 px, patch 14, class token dropped
QUESTIONS = [
    ("What color is the dog?", ["brown"]),
    ("How many cats are there?", ["2"]),
    ("Is it raining?", ["no"]),
    ("Where is the man?", ["beach"]),
    ("What sport is this?", ["tennis"]),
]
TASK = "vlprune_tiny_vqa"

UTILS = '''
from PIL import Image

SUFFIX = "Answer the question using a single word or phrase."


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"{doc['question']} {SUFFIX}"


def process_results(doc, results):
    pred = results[0].strip().lower()
    return {"exact_match": float(pred in [a.lower() for a in doc["answers"]])}
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Images, the questions (JSONL for `vlprune eval vqa`, JSON for the task), the task folder
    and the tiny LLaVA saved with its processor."""
    root = tmp_path_factory.mktemp("lmms")
    gen = torch.Generator().manual_seed(0)
    lines, docs = [], []
    for i, (q, answers) in enumerate(QUESTIONS):
        image = root / f"img_{i}.png"
        h, w = (int(v) for v in torch.randint(30, 90, (2,), generator=gen))
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(image)
        lines.append(json.dumps({"image": image.name, "question": q, "answers": answers,
                                 "question_id": 100 + i}))
        docs.append({"question_id": 100 + i, "question": q, "answers": answers,
                     "image_path": str(image)})
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    (root / "questions.json").write_text(json.dumps(docs))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    (tasks / f"{TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / "questions.json"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answers
        process_results: !function utils.process_results
        generation_kwargs:
          max_new_tokens: 3
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 0.0
        """))
    vlm = vlm_mod.load_vlm("llava:tiny", records=load_vqa(root / "questions.jsonl"))
    model_dir = root / "tiny-llava"
    vlm.model.save_pretrained(model_dir)
    vlm.processor.save_pretrained(model_dir)
    return {"root": root, "tasks": tasks, "model": model_dir, "data": root / "questions.jsonl"}


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(root / "hf_home"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled")
    env.pop("WORLD_SIZE", None)
    return env


def _start(setup: dict[str, Path], name: str, options: str = "") -> tuple[Path, subprocess.Popen]:
    """Start one lmms-eval run (the runs go side by side: most of each is start-up)."""
    out = setup["root"] / "out" / name
    model_args = f"pretrained={setup['model']}" + (f",{options}" if options else "")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vlprune", "--model_args", model_args,
           "--tasks", TASK, "--include_path", str(setup["tasks"]), "--batch_size", "2",
           "--device", "cpu", "--output_path", str(out), "--log_samples"]
    proc = subprocess.Popen(cmd, env=_env(setup["root"]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return out, proc


def _finish(out: Path, proc: subprocess.Popen) -> dict:
    """Its results JSON and its samples (by doc_id)."""
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-5000:]
    results = sorted(out.rglob("*_results.json"))
    samples = sorted(out.rglob(f"*_samples_{TASK}.jsonl"))
    assert results and samples, (log[-3000:], sorted(out.rglob("*")))
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines()]
    return {"results": json.loads(results[-1].read_text()),
            "samples": {r["doc_id"]: r for r in rows}}


def _answers(run: dict) -> list[str]:
    """The answers in doc order (lmms-eval logs one response per sample as a string)."""
    resps = [run["samples"][i]["filtered_resps"] for i in sorted(run["samples"])]
    return [r if isinstance(r, str) else r[0] for r in resps]


@pytest.fixture(scope="module")
def runs(setup) -> dict[str, dict]:
    started = {"base": _start(setup, "base"),
               "keep1": _start(setup, "keep1", "visual_keep=1.0"),
               "keep4": _start(setup, "keep4", "visual_keep=4,visual_score=cls_attn")}
    return {name: _finish(*run) for name, run in started.items()}


def test_visual_keep_one_equals_unreduced_and_vlprune_eval_vqa(setup, runs, tmp_path):
    base, keep1 = _answers(runs["base"]), _answers(runs["keep1"])
    assert len(base) == len(QUESTIONS)
    assert keep1 == base
    from vlprune.cli import main

    out = tmp_path / "sweep"
    rc = main(["eval", "vqa", "--model", str(setup["model"]), "--data", str(setup["data"]),
               "--visual-keep", "4", "--max-new-tokens", "3", "-b", "2", "--device", "cpu",
               "--threads", "1", "--no-progress", "--no-plot", "--output", str(out)])
    assert rc == 0
    result = json.loads(Path(f"{out}.json").read_text())
    rows = {r["setting"]: r for r in result["rows"]}
    unpatched = next(r for r in result["rows"] if r["config"] in (None, {}, ""))
    preds = [json.loads(line)["prediction"]
             for line in Path(unpatched["predictions"]).read_text().splitlines()]
    assert preds == base
    reduced = next(r for r in rows.values() if r is not unpatched)
    reduced_preds = [json.loads(line)["prediction"]
                     for line in Path(reduced["predictions"]).read_text().splitlines()]
    # cls_attn is vlprune eval vqa's default visual score
    assert reduced_preds == _answers(runs["keep4"])


def test_logged_visual_tokens_are_the_budget(runs):
    for name, expected in (("base", N_IMG), ("keep1", N_IMG), ("keep4", 4)):
        res = runs[name]["results"]
        throughput = res["throughput"]
        assert throughput["avg_visual_tokens"] == expected, (name, throughput)
        assert throughput["avg_gflops_prefill"] > 0
        assert throughput["avg_prefill_ms"] > 0
        assert "visual_keep" in res["config"]["model_args"] or name == "base"
    g = {n: runs[n]["results"]["throughput"]["avg_gflops_prefill"] for n in runs}
    assert g["keep4"] < g["base"]
    assert g["keep1"] == pytest.approx(g["base"], rel=1e-3)
    for i, sample in runs["keep4"]["samples"].items():
        base_in = runs["base"]["samples"][i]["token_counts"][0]["input_tokens"]
        assert sample["token_counts"][0]["input_tokens"] == base_in - N_IMG + 4


def test_model_args_refused(setup):
    from vlprune.lmms.model import VLPruneLMM

    with pytest.raises(ValueError, match="allowed: pretrained.*visual_keep"):
        VLPruneLMM(pretrained=str(setup["model"]), device="cpu", visual_kep=4)
    lm = VLPruneLMM(pretrained=str(setup["model"]), device="cpu")
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])
    with pytest.raises(ValueError, match="greedily"):
        lm._greedy_kwargs({"do_sample": True, "temperature": 0.7})
    gen, until = lm._greedy_kwargs({"max_new_tokens": 5, "temperature": 0, "until": "ASSISTANT:"})
    assert gen["max_new_tokens"] == 5 and not gen["do_sample"] and until == ["ASSISTANT:"]
    assert lm._question("<image>\nWhat is it?") == "What is it?"


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    from vlprune.lmms.model import VLPruneLMM

    assert get_model("vlprune") is VLPruneLMM
