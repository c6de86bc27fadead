"""`vlprune eval vqa` (vlprune.eval.eval_vqa) on llava:tiny with its offline processor and a
generated JSONL set: rows, files, visual tokens, skipped images, metric consistency, padding,
a hand-worked VQA accuracy, and two processes against one."""

from __future__ import annotations

import argparse
import csv
import json
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
from vlprune.eval import eval_vqa as ev  # noqa: E402
from vlprune.eval.bench import BASELINE  # noqa: E402
from vlprune.eval.vqa_data import load_vqa  # noqa: E402
from vlprune.eval.vqa_metric import normalize_answer, score_predictions  # noqa: E402

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
    ev.add_vqa_arguments(parser)
    return parser.parse_args(argv)


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--visual-keep", str(KEEP), "--max-new-tokens", "3",
            "--device", "cpu", "--threads", "1", "--no-progress", "--output", str(out), *extra]


def _run(data: Path, out: Path, *extra: str) -> tuple[int, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = ev.run_vqa(_parse(*_argv(data, out, *extra)))
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
    assert list(csv_rows[0])[:len(ev.COLUMNS)] == list(ev.COLUMNS)
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

    monkeypatch.setattr(ev, "load_vlm", no_model)
    with pytest.raises(ev.UnreadableImagesError, match=r"2 of 10 questions have an unreadable "
                       r"image: absent.png \(missing\); empty.png .*without --strict"):
        ev.run_vqa(_parse(*_argv(data, tmp_path / "s", "--strict")))


def test_unknown_setting_and_bad_arguments_error(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse("--data", str(data), "--setting", "visual_kep=64")
    err = capsys.readouterr().err
    assert "unknown key 'visual_kep'" in err and "did you mean visual_keep" in err
    with pytest.raises(SystemExit):
        _parse("--data", str(data), "--answer-processing", "loose")
    assert "invalid choice: 'loose'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--batch-size must be >= 1"):
        ev.run_vqa(_parse(*_argv(data, tmp_path / "x", "-b", "0")))
    with pytest.raises(SystemExit, match="--visual-score given without --visual-keep"):
        ev.run_vqa(_parse("--data", str(data), "--visual-score", "random"))
    # a valid key with a value the model refuses: named, before any question is answered
    with pytest.raises(ValueError, match="setting 'visual 1000 cls_attn'.*576"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped images, the random weights
        ev.run_vqa(_parse(*_argv(data, tmp_path / "y", "--setting", "visual_keep=1000")))
    with pytest.raises(ValueError, match="unknown llava shape 'huge'.*llava:tiny"):
        ev.load_vlm("llava:huge")


def _fixed_answers(answers: dict[str, tuple[str, str]]):
    """A stand-in for VQAEval._run_batch: unpatched / patched answer per question."""
    def run_batch(self, records, images, clock):
        patched = vlprune.is_patched(self.model)
        return ev.BatchOutput([answers[r.question][patched] for r in records], 1.0, None, 0)
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
    monkeypatch.setattr(ev.VQAEval, "_run_batch", _fixed_answers({
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
    vlm = ev.load_vlm("llava:tiny", records=records)
    proc, cfg = vlm.processor, vlm.model.config
    tok = proc.tokenizer
    assert len(tok) == cfg.text_config.vocab_size == 320
    assert tok.convert_tokens_to_ids("<image>") == cfg.image_token_id == 300
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    prompts = [ev.Prompter(proc)(q) for q in (records[0].question, "Why?")]
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
        chat = ev.Prompter(proc)
        assert chat.kind == "chat template" and chat("Why?") == ev.Prompter(Plain())("Why?")
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
    p = ev.Prompter(Plain())
    assert p("Is it red?") == ("USER: <image>\nIs it red? Answer the question using a single "
                               "word or phrase. ASSISTANT:")
    assert ev.Prompter(Plain(), suffix="")(" Is it red? ") == "USER: <image>\nIs it red? ASSISTANT:"
    assert ev.Prompter(Plain(), "llava_onevision", suffix="")("Q?") == \
        "<|im_start|>user <image>\nQ?<|im_end|><|im_start|>assistant\n"
    assert ev.Prompter(Plain(), template="<image> Q: {question} A:", suffix="")("x?") == "<image> Q: x? A:"
    with pytest.raises(ValueError, match=r"needs \{question\} and <image>"):
        ev.Prompter(Plain(), template="{question}")


def test_local_folder_model_gives_the_same_answers(data, batch4, tmp_path):
    vlm = ev.load_vlm("llava:tiny", records=load_vqa(data))
    folder = tmp_path / "tiny-llava"
    vlm.model.save_pretrained(folder)
    vlm.processor.save_pretrained(folder)
    loaded = ev.load_vlm(str(folder))
    assert loaded.family == "llava" and loaded.weights == "pretrained"
    assert type(loaded.processor).__name__ == "LlavaProcessor"
    rc, _ = _run(data, tmp_path / "local", "-b", "4", "--model", str(folder), "--no-plot")
    assert rc == 0
    local = json.loads((tmp_path / "local.json").read_text())
    assert _answers(local) == _answers(batch4["result"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="could not read the config of the local folder"):
        ev.load_vlm(str(tmp_path / "empty"))


@pytest.mark.slow
def test_two_processes_equal_one(data, batch4, tmp_path, request):
    if _launch is None:
        pytest.skip("tests/test_distributed.py (the two-process launcher) is not importable")
    request.getfixturevalue("two_ranks")  # skips when two gloo ranks cannot start here
    out = tmp_path / "two"
    proc = _launch(["-m", "vlprune.eval.eval_vqa", *_argv(data, out, "-b", "4")], cwd=REPO)
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
