"""`vlprune eval vqa` on a Qwen2.5-VL model with random weights (``qwen2.5-vl:tiny``) and the
offline Qwen processor: the processor lays out the prompt as the model expects, and the sweep
runs end to end with the visual budget reaching the language model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

from vlprune.cli import eval_vqa as cli_vqa  # noqa: E402
from vlprune.eval import vlm as vlm_mod  # noqa: E402
from vlprune.eval.vlm_offline import offline_qwen_processor  # noqa: E402
from vlprune.eval.vqa_data import load_vqa  # noqa: E402

QUESTIONS = [("What color is the dog?", ["brown"]), ("How many cats are there?", ["2"]),
             ("Is it raining?", ["no"]), ("What sport is this?", ["tennis"])]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qvqa")
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i, (q, answers) in enumerate(QUESTIONS):
        h, w = (int(v) for v in torch.randint(40, 120, (2,), generator=gen))
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / f"img_{i}.png")
        lines.append(json.dumps({"image": f"img_{i}.png", "question": q, "answers": answers,
                                 "question_id": i}))
    (root / "q.jsonl").write_text("\n".join(lines) + "\n")
    return root / "q.jsonl"


def test_offline_processor_layout(data):
    vlm = vlm_mod.load_vlm("qwen2.5-vl:tiny", records=load_vqa(data))
    cfg = vlm.model.config
    assert vlm.family == "qwen2_5_vl" and vlm.weights == "random"
    image = Image.open(data.parent / "img_0.png").convert("RGB")
    prompt = vlm_mod.Prompter(vlm.processor, vlm.family)("What color is the dog?")
    enc = vlm.processor(images=[image], text=[prompt], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    grid = enc["image_grid_thw"][0]
    merge = cfg.vision_config.spatial_merge_size
    # one placeholder per merged token, between the vision start and end ids
    n = int(grid.prod()) // merge ** 2
    start = ids.index(cfg.vision_start_token_id)
    assert ids[start + 1:start + 1 + n] == [cfg.image_token_id] * n
    assert ids[start + 1 + n] == cfg.vision_end_token_id
    assert 40 <= n <= 90  # about an 8 x 8 grid of merged tokens (aspect kept, sides rounded)
    # the question's words are in the vocabulary (none read as <unk>)
    unk = vlm.processor.tokenizer.unk_token_id
    question = vlm.processor.tokenizer("what color is the dog ?", add_special_tokens=False)["input_ids"]
    assert unk not in question
    assert vlm.processor.tokenizer.decode(question) == "what color is the dog?"
    with torch.no_grad():  # the model accepts what the processor made
        out = vlm.model(**enc)
    assert out.logits.shape[:2] == enc["input_ids"].shape


def test_offline_processor_refuses_bad_ids():
    vlm = vlm_mod.load_vlm("qwen2.5-vl:tiny")
    cfg = vlm.model.config
    cfg.image_token_id = cfg.text_config.vocab_size + 5
    with pytest.raises(ValueError, match="below vocab_size"):
        offline_qwen_processor(cfg)


def test_eval_vqa_runs(data, tmp_path):
    parser = argparse.ArgumentParser()
    cli_vqa.add_vqa_arguments(parser)
    out = tmp_path / "sweep"
    args = parser.parse_args([
        "--model", "qwen2.5-vl:tiny", "--data", str(data), "--visual-keep", "0.25",
        "--visual-score", "attn", "--max-new-tokens", "2", "-b", "2", "--threads", "1",
        "--no-progress", "--no-plot", "--output", str(out)])
    with pytest.warns(UserWarning, match="random weights"):
        assert cli_vqa.run_vqa(args) == 0
    rows = {r["setting"]: r for r in json.loads(Path(f"{out}.json").read_text())["rows"]}
    base, reduced = rows["unpatched"], rows["visual 0.25 attn"]
    assert base["n"] == reduced["n"] == len(QUESTIONS)
    assert base["agreement"] == 100.0
    # counted from the prompt the language model receives: a quarter (rounded up) of row 0's
    assert reduced["visual_tokens"] == -(-base["visual_tokens"] // 4)
    assert reduced["llm_tokens"] == base["llm_tokens"] - (base["visual_tokens"] - reduced["visual_tokens"])
