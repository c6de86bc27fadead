"""`vlprune eval vqa` (vlprune.cli.eval_vqa, vlprune.eval.vqa / caption / generation / vlm) on llava:tiny with its offline processor and a
generated JSONL set: rows, files, visual tokens, skipped images, metric consistency, padding,
a hand-worked VQA accuracy, and two processes against one; then the same for captioning
(`--task caption`): CIDEr / BLEU rows recomputed from the written captions, hand-worked BLEU,
the COCO captions JSON, and the errors of each task."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

try:  # the two-process launcher and its gloo check, shared with the imagenet test
    from test_distributed import _launch, two_ranks  # noqa: F401
except ImportError:  # pragma: no cover - without it the two-process test is skipped
    _launch = None

import vlprune  # noqa: E402
from vlprune.cli import eval_vqa as cli_vqa  # noqa: E402
from vlprune.cli.args import RunError, UsageError  # noqa: E402
from vlprune.eval import caption, generation, vqa  # noqa: E402
from vlprune.eval import vlm as vlm_mod  # noqa: E402
from vlprune.eval.image_data import UnreadableImagesError  # noqa: E402
from vlprune.eval.sweep import BASELINE  # noqa: E402
from vlprune.eval.vqa_data import load_captions, load_vqa  # noqa: E402
from vlprune.eval.vqa_metric import (  # noqa: E402
    caption_scores,
    caption_tokenize,
    normalize_answer,
    score_predictions,
)

torch.set_num_threads(1)  # tiny ops: a second thread only waits on a busy machine

REPO = Path(__file__).parents[1]
N_IMG = 576  # llava:tiny: 336 px, patch 14, class token dropped
KEEP = 64
EXPECTED_COLUMNS = {
    "setting", "method", "vqa_accuracy", "delta_accuracy", "exact_match", "agreement",
    "visual_tokens", "visual_tokens_last", "llm_tokens", "gflops_prefill", "flops_ratio",
    "prefill_ms", "speedup", "decode_tok_s", "samples_per_s", "n", "skipped", "seconds",
    "predictions", "model", "data", "format", "questions", "batch_size", "max_new_tokens",
    "answer_processing", "prompt", "world_size", "timing", "config", "vlprune", "torch",
    "transformers",
}
# question, answers, image (None: a generated image of its own)
QUESTIONS = [
    ("What color is the dog?", ["brown", "brown", "black"], None),
    ("How many cats are there?", ["2"], None),
    ("Is it raining?", ["no", "no", "yes"], None),
    ("What is on the table?", ["a cup"], "absent.png"),
    ("Where is the man?", ["beach"], None),
    ("What sport is this?", ["tennis", "tennis", "tennis"], None),
    ("Is the sky blue?", ["yes"], "empty.png"),
    ("What animal is this?", ["cat", "kitten"], None),
    ("What color is the car?", ["red"], "truncated.png"),
    ("Who is there?", ["nobody"], None),
]
N_GOOD = 7
UNREADABLE = ("absent.png", "empty.png", "truncated.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """10 questions in a JSONL file: 7 with a readable image, one image absent, one an empty
    file, one a truncated PNG (its header reads; decoding fails during the sweep)."""
    root = tmp_path_factory.mktemp("vqa")
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i, (q, answers, image) in enumerate(QUESTIONS):
        if image is None:
            image = f"img_{i}.png"
            h, w = (int(v) for v in torch.randint(30, 90, (2,), generator=gen))
            pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / image)
        lines.append(json.dumps({"image": image, "question": q, "answers": answers,
                                 "question_id": 100 + i}))
    (root / "empty.png").write_bytes(b"")
    pixels = torch.randint(0, 256, (64, 64, 3), generator=gen, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(root / "full.png")
    (root / "truncated.png").write_bytes((root / "full.png").read_bytes()[:300])
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "questions.jsonl"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_vqa.add_vqa_arguments(parser)
    return parser.parse_args(argv)


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--visual-keep", str(KEEP), "--max-new-tokens", "3",
            "--device", "cpu", "--threads", "1", "--no-progress", "--output", str(out), *extra]


def _run(data: Path, out: Path, *extra: str) -> tuple[int, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = cli_vqa.run_vqa(_parse(*_argv(data, out, *extra)))
    return rc, [str(w.message) for w in caught]


def _jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def batch4(data, tmp_path_factory) -> dict:
    """The reference sweep: unpatched + visual_keep=64 at batch 4."""
    out = tmp_path_factory.mktemp("b4") / "res" / "sweep"
    rc, caught = _run(data, out, "-b", "4")
    assert rc == 0
    return {"out": out, "warnings": caught, "result": json.loads(Path(f"{out}.json").read_text())}


def _answers(result: dict) -> dict[str, list[str]]:
    return {r["setting"]: [p["prediction"] for p in _jsonl(r["predictions"])]
            for r in result["rows"]}


def test_sweep_rows_files_and_tokens(batch4):
    out, result = batch4["out"], batch4["result"]
    assert result["kind"] == "eval_vqa" and result["complete"] is True
    rows = result["rows"]
    assert [r["setting"] for r in rows] == [BASELINE, f"visual {KEEP} cls_attn"]
    assert [r["method"] for r in rows] == [BASELINE, "visual cls_attn"]
    base, red = rows
    assert base["visual_tokens"] == base["visual_tokens_last"] == N_IMG
    assert red["visual_tokens"] == red["visual_tokens_last"] == KEEP
    assert base["llm_tokens"] - red["llm_tokens"] == N_IMG - KEEP
    assert red["flops_ratio"] > 1.5 and red["gflops_prefill"] < base["gflops_prefill"]
    assert base["agreement"] == 100.0 and base["delta_accuracy"] == 0.0
    for r in rows:
        assert r["n"] == N_GOOD and r["skipped"] == len(UNREADABLE)
        assert r["prefill_ms"] > 0 and r["samples_per_s"] > 0 and r["seconds"] > 0
        assert 0 <= r["vqa_accuracy"] <= 100 and 0 <= r["agreement"] <= 100
    meta = result["meta"]
    assert meta["answer_processing"] == "full" and meta["format"] == "jsonl"  # JSONL: full
    assert meta["questions"] == len(QUESTIONS) and meta["weights"] == "random"
    assert meta["prompt"].startswith("USER: <image>\n{question} Answer the question")

    with open(f"{out}.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert EXPECTED_COLUMNS <= set(csv_rows[0]) and len(csv_rows) == 2
    assert list(csv_rows[0])[:len(vqa.COLUMNS)] == list(vqa.COLUMNS)
    assert Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"

    folder = Path(f"{out}.predictions")
    assert sorted(p.name for p in folder.iterdir()) == [
        "00_unpatched.jsonl", f"01_visual_{KEEP}_cls_attn.jsonl", "skipped.jsonl"]
    skipped = _jsonl(folder / "skipped.jsonl")
    assert sorted(Path(s["image"]).name for s in skipped) == sorted(UNREADABLE)
    # the header check finds two before the run; the truncated PNG fails while decoding
    texts = [w for w in batch4["warnings"] if "unreadable image" in w]
    assert len(texts) == 2 and "absent.png (missing)" in texts[0] and "truncated.png" in texts[1]


def test_accuracy_is_recomputed_from_the_written_predictions(batch4):
    rows = batch4["result"]["rows"]
    ref = {p["index"]: normalize_answer(p["prediction"]) for p in _jsonl(rows[0]["predictions"])}
    for r in rows:
        preds = _jsonl(r["predictions"])
        assert [p["index"] for p in preds] == sorted(p["index"] for p in preds)
        assert len(preds) == r["n"]
        again = score_predictions([p["prediction"] for p in preds], [p["answers"] for p in preds],
                                  answer_processing="full")
        assert again["vqa_accuracy"] == pytest.approx(r["vqa_accuracy"], abs=1e-9)
        assert again["exact_match"] == pytest.approx(r["exact_match"], abs=1e-9)
        assert 100 * sum(p["accuracy"] for p in preds) / len(preds) == pytest.approx(r["vqa_accuracy"])
        agree = [normalize_answer(p["prediction"]) == ref[p["index"]] for p in preds]
        assert [p["agrees"] for p in preds] == agree
        assert r["agreement"] == pytest.approx(100 * sum(agree) / len(agree))
    answers = _answers(batch4["result"])
    assert len(set(answers[BASELINE])) > 1  # the answers depend on the question and image
    assert rows[1]["agreement"] < 100  # and 64 visual tokens change some of them


def test_batch_size_one_gives_the_batch_four_answers(data, batch4, tmp_path):
    rc, _ = _run(data, tmp_path / "b1", "-b", "1", "--no-plot")
    assert rc == 0
    one = json.loads((tmp_path / "b1.json").read_text())
    assert _answers(one) == _answers(batch4["result"])
    assert not (tmp_path / "b1.png").exists()


def test_strict_refuses_unreadable_images_before_loading(data, tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(cli_vqa, "load_vlm", no_model)
    with pytest.raises(UnreadableImagesError, match=r"2 of 10 questions have an unreadable "
                       r"image: absent.png \(missing\); empty.png .*without --strict"):
        cli_vqa.run_vqa(_parse(*_argv(data, tmp_path / "s", "--strict")))


def test_unknown_setting_and_bad_arguments_error(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse("--data", str(data), "--setting", "visual_kep=64")
    err = capsys.readouterr().err
    assert "unknown key 'visual_kep'" in err and "did you mean visual_keep" in err
    with pytest.raises(SystemExit):
        _parse("--data", str(data), "--answer-processing", "loose")
    assert "invalid choice: 'loose'" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--batch-size must be >= 1"):
        cli_vqa.run_vqa(_parse(*_argv(data, tmp_path / "x", "-b", "0")))
    with pytest.raises(UsageError, match="--visual-score given without --visual-keep"):
        cli_vqa.run_vqa(_parse("--data", str(data), "--visual-score", "random"))
    # a valid key with a value the model refuses: named, before any question is answered
    with pytest.raises(ValueError, match="setting 'visual 1000 cls_attn'.*576"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped images, the random weights
        cli_vqa.run_vqa(_parse(*_argv(data, tmp_path / "y", "--setting", "visual_keep=1000")))
    with pytest.raises(ValueError, match="unknown llava shape 'huge'.*llava:tiny"):
        vlm_mod.load_vlm("llava:huge")


def _fixed_answers(answers: dict[str, tuple[str, str]]):
    """A stand-in for VQAEval._run_batch: unpatched / patched answer per question."""
    def run_batch(self, records, images, clock):
        patched = vlprune.is_patched(self.model)
        return generation.BatchOutput([answers[r.question][patched] for r in records], 1.0, None, 0)
    return run_batch


def test_hand_worked_vqa_accuracy(data, tmp_path, monkeypatch):
    """Three questions with 10 answers each, answered with fixed text.

    Official definition: the mean over the 10 annotators of min(1, matches among the other
    9 / 3).
    - "Yes" against 3 x yes + 7 x no: the 3 yes-annotators see 2 matches (2/3), the 7 others
      see 3 (1): (3 * 2/3 + 7) / 10 = 0.9. Exact match: the most common answer is "no": 0.
    - "The dog." (normalised "dog") against 1 x dog + 9 x cat: the dog-annotator sees 0
      matches, the 9 others 1 (1/3): 9 * (1/3) / 10 = 0.3. Exact match 0.
    - "2" against 10 x "two": with answer processing "full" the answers become "2": every
      annotator sees 9 matches: 1.0 (exact match 1); with "official" unanimous answers are
      not processed at all, "2" != "two": 0.0 (exact match normalises both sides: still 1).
    full: (0.9 + 0.3 + 1.0) / 3 = 73.333 %; official: (0.9 + 0.3 + 0) / 3 = 40 %; exact match
    33.333 % in both. The reduced setting answers "No" to the first (7 matches for the
    yes-annotators, 6 for the no-annotators: 1.0): full (1 + 0.3 + 1) / 3 = 76.667 %,
    agreement 2/3.
    """
    image = next(data.parent.glob("img_*.png")).name
    rows = [("Is it sunny?", ["yes"] * 3 + ["no"] * 7), ("What animal?", ["dog"] + ["cat"] * 9),
            ("How many?", ["two"] * 10)]
    path = tmp_path / "hand.jsonl"
    path.write_text("".join(json.dumps({"image": str(data.parent / image), "question": q,
                                        "answers": a}) + "\n" for q, a in rows))
    monkeypatch.setattr(vqa.VQAEval, "_run_batch", _fixed_answers({
        "Is it sunny?": ("Yes", "No"), "What animal?": ("The dog.", "the dog"),
        "How many?": ("2", "2")}))
    expected = {"full": (73.33333333333333, 76.66666666666667), "official": (40.0, 43.333333333333336)}
    for processing, (acc_base, acc_red) in expected.items():
        out = tmp_path / processing
        rc, _ = _run(path, out, "--answer-processing", processing, "--no-plot")
        assert rc == 0
        base, red = json.loads(Path(f"{out}.json").read_text())["rows"]
        assert base["vqa_accuracy"] == pytest.approx(acc_base)
        assert red["vqa_accuracy"] == pytest.approx(acc_red)
        assert red["delta_accuracy"] == pytest.approx(acc_red - acc_base)
        assert base["exact_match"] == pytest.approx(100 / 3)
        assert red["exact_match"] == pytest.approx(200 / 3)  # "No" is the most common answer
        assert red["agreement"] == pytest.approx(200 / 3) and base["n"] == 3
        assert base["decode_tok_s"] is None and base["prefill_ms"] == 1.0
        per_question = [p["accuracy"] for p in _jsonl(base["predictions"])]
        assert per_question == pytest.approx([0.9, 0.3, 1.0 if processing == "full" else 0.0])


def test_offline_processor_expands_the_image_token(data):
    records = load_vqa(data)
    vlm = vlm_mod.load_vlm("llava:tiny", records=records)
    proc, cfg = vlm.processor, vlm.model.config
    tok = proc.tokenizer
    assert len(tok) == cfg.text_config.vocab_size == 320
    assert tok.convert_tokens_to_ids("<image>") == cfg.image_token_id == 300
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    prompts = [vlm_mod.Prompter(proc)(q) for q in (records[0].question, "Why?")]
    images = [Image.new("RGB", (50, 80)), Image.new("RGB", (90, 40))]
    x = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    assert x["pixel_values"].shape == (2, 3, 336, 336)
    assert ((x["input_ids"] == 300).sum(1) == N_IMG).all()
    assert x["attention_mask"][:, -1].all() and not x["attention_mask"][1, 0]  # left padded
    ids = x["input_ids"][0][x["attention_mask"][0].bool()]
    assert ids[0] == 1 and tok.unk_token_id not in ids.tolist()  # every word is known
    assert tok.decode(tok("What color is the dog?", add_special_tokens=False)["input_ids"]) \
        == "what color is the dog?"
    # a processor with a chat template (here llava-hf/llava-1.5-7b-hf's) writes the prompt
    proc.chat_template = LLAVA_15_CHAT_TEMPLATE
    try:
        chat = vlm_mod.Prompter(proc)
        assert chat.kind == "chat template" and chat("Why?") == vlm_mod.Prompter(Plain())("Why?")
    finally:
        proc.chat_template = None


class Plain:
    """A processor without a chat template."""

    image_token = "<image>"
    chat_template = None


LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_prompt_templates():
    p = vlm_mod.Prompter(Plain())
    assert p("Is it red?") == ("USER: <image>\nIs it red? Answer the question using a single "
                               "word or phrase. ASSISTANT:")
    assert vlm_mod.Prompter(Plain(), suffix="")(" Is it red? ") == "USER: <image>\nIs it red? ASSISTANT:"
    assert vlm_mod.Prompter(Plain(), "llava_onevision", suffix="")("Q?") == \
        "<|im_start|>user <image>\nQ?<|im_end|><|im_start|>assistant\n"
    assert vlm_mod.Prompter(Plain(), template="<image> Q: {question} A:", suffix="")("x?") == "<image> Q: x? A:"
    with pytest.raises(ValueError, match=r"needs \{question\} and <image>"):
        vlm_mod.Prompter(Plain(), template="{question}")


def test_local_folder_model_gives_the_same_answers(data, batch4, tmp_path):
    vlm = vlm_mod.load_vlm("llava:tiny", records=load_vqa(data))
    folder = tmp_path / "tiny-llava"
    vlm.model.save_pretrained(folder)
    vlm.processor.save_pretrained(folder)
    loaded = vlm_mod.load_vlm(str(folder))
    assert loaded.family == "llava" and loaded.weights == "pretrained"
    assert type(loaded.processor).__name__ == "LlavaProcessor"
    rc, _ = _run(data, tmp_path / "local", "-b", "4", "--model", str(folder), "--no-plot")
    assert rc == 0
    local = json.loads((tmp_path / "local.json").read_text())
    assert _answers(local) == _answers(batch4["result"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="could not read the config of the local folder"):
        vlm_mod.load_vlm(str(tmp_path / "empty"))


@pytest.mark.slow
def test_two_processes_equal_one(data, batch4, tmp_path, request):
    if _launch is None:
        pytest.skip("tests/test_distributed.py (the two-process launcher) is not importable")
    request.getfixturevalue("two_ranks")  # skips when two gloo ranks cannot start here
    out = tmp_path / "two"
    proc = _launch(["-m", "vlprune.cli", "eval", "vqa", *_argv(data, out, "-b", "4")], cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count("--result") == 1  # only the main process prints and writes
    one, two = batch4["result"], json.loads(Path(f"{out}.json").read_text())
    assert one["meta"]["world_size"] == 1 and two["meta"]["world_size"] == 2
    assert [r["setting"] for r in one["rows"]] == [r["setting"] for r in two["rows"]]
    for a, b in zip(one["rows"], two["rows"]):
        for key in ("vqa_accuracy", "exact_match", "agreement", "delta_accuracy", "n",
                    "skipped", "visual_tokens", "visual_tokens_last", "llm_tokens",
                    "gflops_prefill"):
            assert a[key] == b[key], (a["setting"], key, a[key], b[key])
        assert _jsonl(a["predictions"]) == _jsonl(b["predictions"])
    assert _jsonl(Path(f"{out}.predictions") / "skipped.jsonl") == \
        _jsonl(Path(f"{batch4['out']}.predictions") / "skipped.jsonl")


# --------------------------------------------------------------------------------------------
# Captioning (--task caption)
# --------------------------------------------------------------------------------------------

needs_coco = pytest.mark.skipif(
    importlib.util.find_spec("pycocoevalcap") is None,
    reason="caption metrics need pycocoevalcap (pip install pycocoevalcap, extra 'caption')",
)

# reference captions of the generated images: 2 or 3 each
CAPTIONS = [
    ["a brown dog runs on the grass", "a dog running across a green lawn", "a puppy outside"],
    ["two cats sleep on a red sofa", "a pair of cats asleep on a couch"],
    ["a man rides a bicycle down the street", "a person cycling on a city road",
     "a cyclist in traffic"],
    ["a plate of food with rice and vegetables", "a dinner plate with rice"],
    ["a red bus parked near a building", "a large bus on the side of the road"],
    ["a group of people standing on a beach", "people on the sand near the ocean",
     "a crowd at the sea"],
]
CAPTION_COLUMNS = {"cider", "delta_cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "agreement",
                   "visual_tokens", "visual_tokens_last", "llm_tokens", "gflops_prefill",
                   "flops_ratio", "prefill_ms", "speedup", "decode_tok_s", "samples_per_s", "n",
                   "skipped", "seconds", "predictions", "task", "images", "caption_metric"}


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    """6 random images with their reference captions in a JSONL file (ids "img0" ...)."""
    root = tmp_path_factory.mktemp("captions")
    gen = torch.Generator().manual_seed(1)
    lines = []
    for i, refs in enumerate(CAPTIONS):
        h, w = (int(v) for v in torch.randint(30, 90, (2,), generator=gen))
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / f"img_{i}.png")
        lines.append(json.dumps({"image": f"img_{i}.png", "captions": refs, "id": f"img{i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "captions.jsonl"


def _caption_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--task", "caption", "--data", str(data), "--visual-keep", str(KEEP), "--device",
            "cpu", "--threads", "1", "--no-progress", "--output", str(out), *extra]


def _run_captions(data: Path, out: Path, *extra: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        assert cli_vqa.run_vqa(_parse(*_caption_argv(data, out, *extra))) == 0
    return json.loads(Path(f"{out}.json").read_text())


@pytest.fixture(scope="module")
def caption_sweep(captions, tmp_path_factory) -> dict:
    """unpatched + visual_keep=64 on llava:tiny, 6 new tokens at most, batch 4."""
    out = tmp_path_factory.mktemp("cap") / "res" / "captions"
    return {"out": out, "result": _run_captions(captions, out, "-b", "4", "--max-new-tokens", "6")}


@needs_coco
def test_caption_sweep_rows_and_files(caption_sweep):
    out, result = caption_sweep["out"], caption_sweep["result"]
    assert result["kind"] == "eval_caption" and result["complete"] is True
    rows = result["rows"]
    assert [r["setting"] for r in rows] == [BASELINE, f"visual {KEEP} cls_attn"]
    base, red = rows
    assert base["visual_tokens"] == N_IMG and red["visual_tokens"] == KEEP
    assert red["flops_ratio"] > 1.5 and base["agreement"] == 100.0 and base["delta_cider"] == 0.0
    for r in rows:
        assert r["n"] == len(CAPTIONS) and r["skipped"] == 0
        assert r["cider"] >= 0 and 0 <= r["bleu_4"] <= 100 and r["prefill_ms"] > 0
        assert "vqa_accuracy" not in r
    meta = result["meta"]
    assert meta["task"] == "caption" and meta["images"] == len(CAPTIONS)
    assert meta["max_new_tokens"] == 6 and meta["format"] == "jsonl"
    assert meta["prompt"] == ("USER: <image>\nProvide a one-sentence caption for the provided "
                              "image. ASSISTANT:")
    assert meta["caption_metric"].startswith("pycocoevalcap ")
    assert result["plot"]["y"] == "cider"

    with open(f"{out}.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert CAPTION_COLUMNS <= set(csv_rows[0]) and len(csv_rows) == 2
    assert list(csv_rows[0])[:len(caption.CAPTION_COLUMNS)] == list(caption.CAPTION_COLUMNS)
    assert Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"
    folder = Path(f"{out}.predictions")
    assert sorted(p.name for p in folder.iterdir()) == [
        "00_unpatched.jsonl", f"01_visual_{KEEP}_cls_attn.jsonl", "skipped.jsonl"]
    first = _jsonl(base["predictions"])[0]
    assert set(first) == {"index", "image_id", "image", "prediction", "captions", "agrees"}
    assert first["image_id"] == "img0" and first["captions"] == CAPTIONS[0]


@needs_coco
def test_caption_scores_are_recomputed_from_the_written_predictions(caption_sweep):
    rows = caption_sweep["result"]["rows"]
    tokens = {p["index"]: caption_tokenize(p["prediction"])
              for p in _jsonl(rows[0]["predictions"])}
    for r in rows:
        preds = _jsonl(r["predictions"])
        assert [p["index"] for p in preds] == list(range(len(CAPTIONS)))
        again = caption_scores([p["prediction"] for p in preds], [p["captions"] for p in preds])
        for key in ("cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4"):
            assert r[key] == pytest.approx(again[key], abs=1e-9), key
        agree = [caption_tokenize(p["prediction"]) == tokens[p["index"]] for p in preds]
        assert [p["agrees"] for p in preds] == agree
        assert r["agreement"] == pytest.approx(100 * sum(agree) / len(agree))
        assert r["delta_cider"] == pytest.approx(r["cider"] - rows[0]["cider"])
    captions = [p["prediction"] for p in _jsonl(rows[0]["predictions"])]
    assert len(set(captions)) > 1  # the captions depend on the image


def _fixed_captions(captions: dict[str, tuple[str, str]]):
    """A stand-in for CaptionEval._run_batch: unpatched / patched caption per image id."""
    def run_batch(self, records, images, clock):
        patched = vlprune.is_patched(self.model)
        return generation.BatchOutput([captions[r.image_id][patched] for r in records], 1.0, None, 0)
    return run_batch


@needs_coco
def test_hand_worked_caption_scores(captions, tmp_path, monkeypatch):
    """Three images with two references each, captioned with fixed text.

    Unpatched: every caption is one of its image's references (up to case and punctuation,
    which the tokenizer drops), so every n-gram of it is in that reference: BLEU-1..4
    precisions are 1, and the closest reference length is its own length (brevity penalty
    1): BLEU-1..4 = 100.
    Patched: image a unchanged (7 tokens), image b "two cats sleep" (3 tokens: 3 unigrams,
    2 bigrams, 1 trigram, all in the reference "two cats sleep on a red sofa", closest
    reference length 7), image c unchanged (8 tokens). Corpus BLEU sums the counts: every
    precision is still 1 (18/18, 15/15, 12/12, 9/9), candidate length 18, reference length
    7 + 7 + 8 = 22, brevity penalty exp(1 - 22/18): BLEU-1..4 = 100 exp(-2/9) = 80.074.
    Agreement: a (same tokens) and c agree, b does not: 2/3.
    """
    image = str(captions.parent / "img_0.png")
    refs = {"a": ["a black dog runs on the grass", "a dog running across a lawn"],
            "b": ["two cats sleep on a red sofa", "a pair of cats asleep on a couch"],
            "c": ["a man rides a bicycle down the street", "a person cycling on a city road"]}
    path = tmp_path / "hand.jsonl"
    path.write_text("".join(json.dumps({"image": image, "captions": c, "id": k}) + "\n"
                            for k, c in refs.items()))
    monkeypatch.setattr(caption.CaptionEval, "_run_batch", _fixed_captions({
        "a": ("A black dog runs on the grass.", "a black dog runs on the grass"),
        "b": ("Two cats sleep on a red sofa", "two cats sleep"),
        "c": ("a man rides a bicycle down the street", "a man rides a bicycle down the street"),
    }))
    result = _run_captions(path, tmp_path / "hand", "--no-plot")
    base, red = result["rows"]
    assert result["meta"]["max_new_tokens"] == 30  # the caption default
    for k in range(1, 5):
        assert base[f"bleu_{k}"] == pytest.approx(100.0, abs=1e-6)
        assert red[f"bleu_{k}"] == pytest.approx(100 * math.exp(-2 / 9), abs=1e-6)
    assert red["agreement"] == pytest.approx(200 / 3) and base["n"] == red["n"] == 3
    assert [p["agrees"] for p in _jsonl(red["predictions"])] == [True, False, True]
    # CIDEr-D against the scorer itself on the same captions
    preds = ["a black dog runs on the grass", "two cats sleep",
             "a man rides a bicycle down the street"]
    assert red["cider"] == pytest.approx(caption_scores(preds, list(refs.values()))["cider"])
    assert red["delta_cider"] == pytest.approx(red["cider"] - base["cider"])
    assert base["decode_tok_s"] is None and base["prefill_ms"] == 1.0


@needs_coco
def test_captions_identical_to_every_reference_score_the_maximum(captions, tmp_path,
                                                                 monkeypatch):
    """Every reference of an image is its caption (up to case and punctuation): BLEU-1..4 =
    100; CIDEr-D: candidate and reference n-gram vectors are equal, and each n = 1..4 has an
    n-gram found in one image only (idf log 3 > 0), so every cosine is 1, the length
    penalty exp(0) = 1, and CIDEr-D = 10 (its scale) x 1 = 1000 (x100)."""
    image = str(captions.parent / "img_1.png")
    texts = {"a": "a black dog runs on the grass", "b": "two cats sleep on a red sofa",
             "c": "a man rides a bicycle down the street"}
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps({"image": image, "id": k,
                                        "captions": [t, t.capitalize() + "."]}) + "\n"
                            for k, t in texts.items()))
    monkeypatch.setattr(caption.CaptionEval, "_run_batch",
                        _fixed_captions({k: (t, t.upper()) for k, t in texts.items()}))
    for row in _run_captions(path, tmp_path / "same", "--no-plot")["rows"]:
        assert row["bleu_4"] == pytest.approx(100.0, abs=1e-6)
        assert row["bleu_1"] == pytest.approx(100.0, abs=1e-6)
        assert row["cider"] == pytest.approx(1000.0, abs=1e-6)
        assert row["agreement"] == 100.0


@needs_coco
def test_coco_captions_json_sweep(captions, tmp_path, monkeypatch):
    """A COCO captions JSON with --images: records in "images" order, missing images skipped
    and listed."""
    folder = tmp_path / "val2014"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:012d}.png").write_bytes((captions.parent / f"img_{i}.png").read_bytes())
    data = {"images": [{"id": i, "file_name": f"{i:012d}.png"} for i in (2, 0, 1, 9)],
            "annotations": [{"image_id": i, "id": 10 * i + j, "caption": c}
                            for i, refs in enumerate(CAPTIONS[:3]) for j, c in enumerate(refs)]
            + [{"image_id": 9, "id": 90, "caption": "a missing image"}]}
    path = tmp_path / "annotations" / "captions_val2014.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    monkeypatch.setattr(caption.CaptionEval, "_run_batch", _fixed_captions(
        {i: ("a dog", "a cat") for i in (0, 1, 2)}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_vqa.run_vqa(_parse(*_caption_argv(path, tmp_path / "coco", "--images", str(folder),
                                                "--no-plot"))) == 0
    assert any("1 of 4 images are unreadable: 000000000009.png (missing)" in str(w.message)
               for w in caught)
    result = json.loads((tmp_path / "coco.json").read_text())
    assert result["meta"]["format"] == "coco_captions"
    base, red = result["rows"]
    assert base["n"] == 3 and base["skipped"] == 1 and red["agreement"] == 0.0
    preds = _jsonl(base["predictions"])
    assert [p["image_id"] for p in preds] == [2, 0, 1]
    assert preds[1]["captions"] == CAPTIONS[0]
    skipped = _jsonl(tmp_path / "coco.predictions" / "skipped.jsonl")
    assert [(s["image_id"], s["error"]) for s in skipped] == [(9, "missing")]


def test_caption_prompts(captions):
    instruction = "Provide a one-sentence caption for the provided image."
    assert vlm_mod.CAPTION_INSTRUCTION == instruction
    p = vlm_mod.Prompter(Plain(), suffix="", needs_question=False)
    assert p(instruction) == f"USER: <image>\n{instruction} ASSISTANT:"
    # the offline processor knows the instruction's and the references' words
    proc = vlm_mod.load_vlm("llava:tiny", records=load_captions(captions)).processor
    ids = proc.tokenizer(f"{instruction} {CAPTIONS[1][1]}")["input_ids"]
    assert proc.tokenizer.unk_token_id not in ids
    # a processor with a chat template writes the same prompt
    proc.chat_template = LLAVA_15_CHAT_TEMPLATE
    try:
        chat = vlm_mod.Prompter(proc, suffix="", needs_question=False)
        assert chat.kind == "chat template" and chat(instruction) == p(instruction)
    finally:
        proc.chat_template = None
    # --prompt: {question} is optional for captions, required for questions
    assert vlm_mod.Prompter(Plain(), template="<image> Caption:", suffix="",
                       needs_question=False)(instruction) == "<image> Caption:"
    with pytest.raises(ValueError, match=r"needs <image>, got"):
        vlm_mod.Prompter(Plain(), template="Caption:", suffix="", needs_question=False)
    with pytest.raises(ValueError, match=r"needs \{question\} and <image>"):
        vlm_mod.Prompter(Plain(), template="<image> Caption:")


def test_task_errors(data, captions, tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(cli_vqa, "load_vlm", no_model)
    with pytest.raises(SystemExit):
        _parse("--task", "detection", "--data", str(captions))
    err = capsys.readouterr().err
    assert "invalid choice: 'detection'" in err and "vqa" in err and "caption" in err
    args = _parse("--data", str(captions))
    args.task = "detection"
    with pytest.raises(ValueError, match=r"--task must be one of \['vqa', 'caption'\]"):
        cli_vqa.run_vqa(args)
    # caption data with --task vqa (the default): the error says so and names the formats
    with pytest.raises(ValueError, match=r"line 1 has a caption and no question.*--task caption"
                       r".*accepted formats: 'vqav2'.*'gqa'.*'jsonl'"):
        cli_vqa.run_vqa(_parse(*_argv(captions, tmp_path / "x")))
    # questions with --task caption
    with pytest.raises(ValueError, match=r"line 1 has a question and no caption.*--task vqa.*"
                       r"accepted caption formats: 'coco_captions'.*'jsonl'"):
        cli_vqa.run_vqa(_parse(*_caption_argv(data, tmp_path / "y")))
    # options of the other task
    with pytest.raises(ValueError, match=r"--answer-processing, --no-suffix apply only to "
                       r"--task vqa"):
        cli_vqa.run_vqa(_parse(*_caption_argv(captions, tmp_path / "z", "--answer-processing",
                                         "full", "--no-suffix")))
    with pytest.raises(ValueError, match="--format coco_captions is a caption format; --task "
                       "vqa takes vqav2, gqa, jsonl"):
        cli_vqa.run_vqa(_parse(*_argv(captions, tmp_path / "w", "--format", "coco_captions")))
    with pytest.raises(ValueError, match="--format gqa is a VQA format; --task caption takes "
                       "coco_captions, jsonl"):
        cli_vqa.run_vqa(_parse(*_caption_argv(captions, tmp_path / "v", "--format", "gqa")))
    with pytest.raises(TypeError, match="CaptionEval evaluates CaptionRecord records, got a "
                       "VQARecord"):
        caption.CaptionEval(nn_stub(), None, load_vqa(data))


def nn_stub() -> torch.nn.Module:
    return torch.nn.Linear(1, 1)


def test_caption_task_needs_pycocoevalcap(captions, tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(cli_vqa, "load_vlm", no_model)
    for name in ("pycocoevalcap", "pycocoevalcap.bleu", "pycocoevalcap.bleu.bleu",
                 "pycocoevalcap.cider", "pycocoevalcap.cider.cider"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RunError, match="caption metrics need the 'pycocoevalcap' package.*"
                       "pip install pycocoevalcap"):
        cli_vqa.run_vqa(_parse(*_caption_argv(captions, tmp_path / "x")))


@needs_coco
@pytest.mark.slow
def test_caption_two_processes_equal_one(captions, caption_sweep, tmp_path, request):
    """CIDEr is a corpus score: computed once over the gathered captions, two processes give
    the one-process numbers."""
    if _launch is None:
        pytest.skip("tests/test_distributed.py (the two-process launcher) is not importable")
    request.getfixturevalue("two_ranks")  # skips when two gloo ranks cannot start here
    out = tmp_path / "two"
    proc = _launch(["-m", "vlprune.cli", "eval", "vqa",
                    *_caption_argv(captions, out, "-b", "4", "--max-new-tokens", "6")], cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count("--result") == 1
    one, two = caption_sweep["result"], json.loads(Path(f"{out}.json").read_text())
    assert two["meta"]["world_size"] == 2
    for a, b in zip(one["rows"], two["rows"], strict=True):
        for key in ("cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "agreement", "n",
                    "skipped", "visual_tokens", "gflops_prefill"):
            assert a[key] == b[key], (a["setting"], key, a[key], b[key])
        assert _jsonl(a["predictions"]) == _jsonl(b["predictions"])
