"""Temporal merging of videos before the LLM (temporal_keep / temporal_threshold) on tiny
random LLaVA-NeXT-Video and LLaVA-OneVision models: budgets reach the LLM, rows of a padded
batch are independent, no reduction is identical, images next to videos still reduce."""

from __future__ import annotations

import pytest
import torch
from helpers import model_fixtures

import vlprune
from vlprune.models import left_pad

pytest.importorskip("transformers")
from llava_family_models import IMAGE_ID, PAD, VIDEO_ID, batch, build  # noqa: E402
from test_llava import assert_rows_independent  # noqa: E402

FRAMES = 4
VIDEO_FAMILIES = ("llava_next_video", "llava_onevision")


model, _unpatched = model_fixtures(build, VIDEO_FAMILIES)


def _video(seed: int, repeat: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + seed)
    if repeat:
        return torch.randn(1, 3, 32, 32, generator=g).expand(FRAMES, -1, -1, -1).clone()
    return torch.randn(FRAMES, 3, 32, 32, generator=g)


def _layout(model) -> tuple[int, bool]:
    """(tokens per frame, trailing newline token) of a video in ``model``."""
    with torch.no_grad():
        out = model.model.get_video_features(pixel_values_videos=_video(0)[None],
                                             return_dict=True).pooler_output
    newline = vlprune.adapters.llava.llava_family(model) == "llava_onevision"
    return (out.shape[1] - newline) // FRAMES, newline


def _inputs(model, rows: list[dict]) -> dict:
    """Left-padded prompts: text, one video's placeholder span, text."""
    n, newline = _layout(model)
    span = FRAMES * n + newline
    seqs = []
    for r in rows:
        g = torch.Generator().manual_seed(100 + r["seed"])
        seqs.append(torch.cat([torch.randint(1, VIDEO_ID, (r["before"],), generator=g),
                               torch.full((span,), VIDEO_ID),
                               torch.randint(1, VIDEO_ID, (r["after"],), generator=g)]))
    ids, mask = left_pad(seqs, PAD)
    videos = torch.stack([_video(r["seed"], r.get("repeat", False)) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=videos)


def _generate(model, inputs, n=3):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


class _LLMInputs:
    def __init__(self, model):
        self.ids = []
        self.handle = model.model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.ids.append(args[0] if args else kwargs.get("input_ids"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


ROWS = [dict(seed=0, before=3, after=4), dict(seed=1, before=6, after=2, repeat=True)]


def test_no_reduction_is_identical(model):
    inputs = _inputs(model, ROWS)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_gen = _generate(model, inputs)
    n, _ = _layout(model)
    vlprune.patch(model, temporal_keep=1.0)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    # every token kept through the whole encode / merge / rewrite path
    vlprune.patch(model, temporal_keep=n)
    with _LLMInputs(model) as rec, torch.no_grad():
        logits = model(**inputs).logits
    assert torch.equal(rec.ids[0], inputs["input_ids"])
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(model, inputs), ref_gen)


def test_budget_reaches_llm_and_rows_are_independent(model):
    n, newline = _layout(model)
    vlprune.patch(model, temporal_keep=1)
    inputs = _inputs(model, ROWS)
    with _LLMInputs(model) as rec:
        out = _generate(model, inputs)
    L = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :L], inputs["input_ids"]) and out.shape[1] == L + 3
    budget = n + (FRAMES - 1) * 1 + newline
    assert (rec.ids[0] == VIDEO_ID).sum(dim=1).tolist() == [budget, budget]
    # a row's LM inputs and logits do not depend on its neighbours. Not on ROWS: the still
    # video of ROWS[1] ties every token's redundancy (cosine 1 up to float noise), so the one
    # token each later frame keeps is picked by the batched tower's rounding (a different
    # spatial token alone than in the batch: LM inputs off by ~1e-2); moving frames do not tie
    moving = [dict(seed=0, before=3, after=4), dict(seed=2, before=6, after=2)]
    assert_rows_independent(model, _inputs(model, moving), [_inputs(model, [r]) for r in moving])
    # forward takes the same path
    with _LLMInputs(model) as rec, torch.no_grad():
        logits = model(**_inputs(model, ROWS[:1])).logits
    assert int((rec.ids[0] == VIDEO_ID).sum()) == budget and logits.shape[1] == rec.ids[0].shape[1]


def test_threshold_collapses_repeated_frames(model):
    n, newline = _layout(model)
    vlprune.patch(model, temporal_threshold=0.99)
    inputs = _inputs(model, ROWS)
    with _LLMInputs(model) as rec:
        out = _generate(model, inputs)
    counts = (rec.ids[0] == VIDEO_ID).sum(dim=1).tolist()
    assert counts[1] == n + newline  # the still video: one frame's tokens
    assert counts[0] > n + newline  # random frames differ
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert_rows_independent(model, inputs, [_inputs(model, [r]) for r in ROWS])


def test_images_and_video_together():
    model = build("llava_next_video")
    n, _ = _layout(model)
    vlprune.patch(model, visual_keep=0.5, temporal_keep=2)
    inputs = batch(model, [dict(seed=0, before=3, after=4, images=[(40, 60, 0)])])
    video = torch.full((1, FRAMES * n), VIDEO_ID)
    inputs["input_ids"] = torch.cat([inputs["input_ids"][:, :2], video, inputs["input_ids"][:, 2:]], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["pixel_values_videos"] = _video(3)[None]
    with _LLMInputs(model) as rec:
        out = _generate(model, inputs)
    n_img = int((inputs["input_ids"] == IMAGE_ID).sum())
    assert int((rec.ids[0] == IMAGE_ID).sum()) == -(-n_img // 2)
    assert int((rec.ids[0] == VIDEO_ID).sum()) == n + (FRAMES - 1) * 2
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    # temporal merging alone leaves the images untouched
    vlprune.patch(model, temporal_keep=2)
    with _LLMInputs(model) as rec, torch.no_grad():
        model(**inputs)
    assert int((rec.ids[0] == IMAGE_ID).sum()) == n_img


def test_refusals(model):
    n, _ = _layout(model)
    vlprune.patch(model, temporal_keep=n + 1)
    with pytest.raises(ValueError, match="temporal_keep"), torch.no_grad():
        model(**_inputs(model, ROWS[:1]))
    with pytest.raises(ValueError, match="exclude each other"):
        vlprune.patch(model, temporal_keep=2, temporal_threshold=0.9)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        vlprune.ReductionConfig(temporal_threshold=1.5)
    with pytest.raises(ValueError, match="temporal_keep"):
        vlprune.ReductionConfig(temporal_keep=0)
    image_only = build("llava_next")
    with pytest.raises(ValueError, match="takes no videos"):
        vlprune.patch(image_only, temporal_keep=2)
    assert not vlprune.is_patched(image_only)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, image_size=32, patch_size=8))
    with pytest.raises(ValueError, match="temporal_keep/temporal_threshold"):
        vlprune.patch(tower, temporal_keep=2)
