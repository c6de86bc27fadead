"""LLaVA-NeXT (anyres), LLaVA-OneVision (SigLIP tower, Qwen2 LLM) and LLaVA-NeXT-Video (image
path): reduction before the LLM, inside it and of the prompt, on tiny random models with
left-padded batches, images of different sizes, several images in a row and a row without
an image."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import model_fixtures

import vlprune

pytest.importorskip("transformers")
from llava_family_models import FAMILIES, IMAGE_ID, VIDEO_ID, batch, build, image_tokens  # noqa: E402
from test_llava import assert_rows_independent  # noqa: E402

# rows of the padded batch: different text lengths, image sizes (so token counts), two
# images in one row and a row with no image
ROWS = [
    dict(seed=0, before=3, after=4, images=[(40, 60, 0)]),
    dict(seed=1, before=6, after=2, images=[(64, 30, 1), (30, 30, 2)]),
    dict(seed=2, before=2, after=5, images=[]),
    dict(seed=3, before=1, after=3, images=[(60, 64, 3)]),
]
SCORES = ("cls_attn", "dominant_contextual", "text", "diversity", "random")


model, _unpatched = model_fixtures(build, FAMILIES)


def _generate(model, inputs, n=4):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


class _LLMInputs:
    """Records the ``input_ids`` the model's backbone receives (after any rewrite)."""

    def __init__(self, model):
        self.ids = []
        self.handle = model.model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        self.ids.append(ids)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _budget(n: int, keep) -> int:
    return keep if isinstance(keep, int) else math.ceil(keep * n)


@pytest.mark.parametrize("rows", [[0], [0, 1, 2, 3]])
def test_no_reduction_is_identical(model, rows):
    inputs = batch(model, [ROWS[i] for i in rows])
    ref_logits, ref_gen = _logits(model, inputs), _generate(model, inputs)
    for settings in (dict(visual_keep=1.0), dict(visual_keep=1.0, text_keep=1.0)):
        vlprune.patch(model, **settings)
        assert torch.equal(_logits(model, inputs), ref_logits)
        assert torch.equal(_generate(model, inputs), ref_gen)
    # every token kept through the whole encode/select/rewrite path
    vlprune.patch(model, visual_keep=0.99999, visual_score="cls_attn")
    torch.testing.assert_close(_logits(model, inputs), ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(model, inputs), ref_gen)


@pytest.mark.parametrize("score", SCORES)
def test_reduced_generates_with_budget_and_rows_are_independent(model, score):
    keep = 0.5
    vlprune.patch(model, visual_keep=keep, visual_score=score)
    inputs = batch(model, ROWS)
    with _LLMInputs(model) as rec:
        out = _generate(model, inputs)
    L = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :L], inputs["input_ids"]) and out.shape[1] == L + 4
    # the placeholders reaching the LLM: each image's budget, per row
    reached = (rec.ids[0] == IMAGE_ID).sum(dim=1).tolist()
    want = []
    for r in ROWS:
        sizes = [(h, w) for h, w, _ in r["images"]]
        lens = image_tokens(model, sizes, [s for *_, s in r["images"]])
        want.append(sum(_budget(n, keep) for n in lens))
    assert reached == want
    # a row's LM inputs and logits do not depend on its neighbours
    assert_rows_independent(model, inputs, [batch(model, [r]) for r in ROWS])


def test_count_budget_and_protected_row_ends(model):
    vlprune.patch(model, visual_keep=40, visual_score="cls_attn")
    inputs = batch(model, [ROWS[0]])
    with _LLMInputs(model) as rec:
        _logits(model, inputs)
    assert int((rec.ids[0] == IMAGE_ID).sum()) == 40
    # a budget below an image's row-end tokens is refused with the reason
    vlprune.patch(model, visual_keep=2, visual_score="cls_attn")
    with pytest.raises(ValueError, match="row-end"):
        _logits(model, inputs)


def test_fastv_inside_llm(model):
    # rows with the same image layout (FastV needs equal kept lengths across rows)
    rows = [dict(seed=s, before=2 + s, after=3, images=[(40, 60, 7)]) for s in range(4)]
    vlprune.patch(model, llm_layer=1, llm_keep=0.5)
    inputs = batch(model, rows)
    assert _generate(model, inputs).shape[1] == inputs["input_ids"].shape[1] + 4
    assert_rows_independent(model, inputs, [batch(model, [r]) for r in rows])
    vlprune.patch(model, visual_keep=0.5, llm_layer=1, llm_keep=8)
    d = vlprune.describe(model, batch(model, rows[:1]), flops=False)
    n = image_tokens(model, [(40, 60)], [7])[0]
    assert [(lr.tokens_in, lr.tokens_out, lr.tower) for lr in d.layers] == [
        (n, math.ceil(n / 2), "visual"), (math.ceil(n / 2), 8, "llm"),
    ]
    # describe's own example input (one base-size image per row) runs too
    assert vlprune.describe(model, flops=False, batch_size=2).layers[0].tower == "visual"
    # rows that would keep different counts inside the LLM are refused, with the counts
    vlprune.patch(model, llm_layer=1, llm_keep=0.5)
    with pytest.raises(ValueError, match="same number of tokens"):
        _logits(model, batch(model, ROWS[:2]))


def test_text_keep_drops_prompt_tokens_only(model):
    row = dict(seed=5, before=12, after=12, images=[(40, 60, 0)])
    inputs = batch(model, [row, ROWS[2]])
    vlprune.patch(model, text_keep=0.5, text_protect_last=4)
    with _LLMInputs(model) as rec:
        out = _generate(model, inputs)
    ids, new = inputs["input_ids"], rec.ids[0]
    mask = inputs["attention_mask"].bool()
    # row 0: image span intact; 2 + 12 + 12 text tokens, 4 protected at the end, so
    # ceil(0.5 * 22) = 11 of the 22 droppable ones stay
    assert int((new[0] == IMAGE_ID).sum()) == int((ids[0] == IMAGE_ID).sum())
    text_before = int(((ids[0] != IMAGE_ID) & mask[0]).sum())
    assert int(((new[0] != IMAGE_ID) & (new[0] != 0)).sum()) == text_before - 11
    assert torch.equal(new[0][-4:], ids[0][-4:])
    # the row without an image keeps its prompt
    real = ids[1][mask[1]]
    assert torch.equal(new[1][-real.shape[0]:], real)
    assert out.shape[1] == ids.shape[1] + 4


def test_unpatch_and_disabled_restore(model):
    inputs = batch(model, ROWS[:2])
    ref = _logits(model, inputs)
    vlprune.patch(model, visual_keep=0.5, visual_score="text", text_keep=0.5)
    assert _logits(model, inputs).shape[1] < ref.shape[1]
    with vlprune.disabled(model):
        assert torch.equal(_logits(model, inputs), ref)
    vlprune.unpatch(model)
    assert torch.equal(_logits(model, inputs), ref)


def test_refusals(model):
    with pytest.raises(ValueError, match="pool"):
        vlprune.patch(model, visual_keep=0.25, visual_score="pool")
    with pytest.raises(ValueError, match="not supported"):
        vlprune.patch(model, visual_keep=0.5, text_merge_r=2)
    assert not vlprune.is_patched(model)


def test_next_video_passes_videos_through():
    model = build("llava_next_video")
    vlprune.patch(model, visual_keep=0.5)
    inputs = batch(model, [ROWS[0]])
    frames = torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        n_video = model.model.get_video_features(pixel_values_videos=frames, return_dict=True
                                                 ).pooler_output
    n_video = sum(v.shape[0] for v in n_video) if isinstance(n_video, (list, tuple)) else n_video.shape[0] * n_video.shape[1]
    video = torch.full((1, n_video), VIDEO_ID)
    inputs["input_ids"] = torch.cat([inputs["input_ids"][:, :2], video, inputs["input_ids"][:, 2:]], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["pixel_values_videos"] = frames
    with _LLMInputs(model) as rec:
        out = _generate(model, inputs)
        logits = _logits(model, inputs)  # forward takes videos next to the reduced images too
    assert int((rec.ids[0] == VIDEO_ID).sum()) == int((rec.ids[-1] == VIDEO_ID).sum()) == n_video
    assert logits.shape[1] == rec.ids[-1].shape[1]
    n_img = int((inputs["input_ids"] == IMAGE_ID).sum())
    assert int((rec.ids[0] == IMAGE_ID).sum()) == math.ceil(0.5 * n_img)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("settings", [dict(text_keep=0.5), dict(visual_keep=0.3, text_keep=0.6,
                                                                   visual_score="dominant_contextual")])
def test_prompt_dropping_rows_are_independent(model, settings):
    vlprune.patch(model, **settings)
    inputs = batch(model, ROWS)
    assert _generate(model, inputs).shape[1] == inputs["input_ids"].shape[1] + 4
    assert_rows_independent(model, inputs, [batch(model, [r]) for r in ROWS])
