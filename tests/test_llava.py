"""LLaVA (transformers LlavaForConditionalGeneration): visual tokens reduced before the
language model, in forward and generate, on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import model_fixtures

import vlprune
from vlprune.models import left_pad

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

IMAGE_ID = 199
N_IMG = 16  # 32x32 image, 8x8 patches, class token dropped ("default" strategy)
PAD = 0
# (text before the image, text after it) of each prompt; different lengths
PROMPTS = ((3, 2), (7, 4), (1, 1), (5, 6))
SCORES = ("cls_attn", "attn", "random", "diversity")


def _build() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=32, patch_size=8,
        ),
        text_config=LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=200, pad_token_id=PAD, max_position_embeddings=128,
        ),
        image_token_index=IMAGE_ID, image_seq_length=N_IMG,
    )
    return LlavaForConditionalGeneration(cfg).eval()


model, _unpatched = model_fixtures(_build)


def _row(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + i)
    before, after = PROMPTS[i]
    text = torch.randint(1, IMAGE_ID, (before + after,), generator=g)
    return torch.cat([text[:before], torch.full((N_IMG,), IMAGE_ID), text[before:]])


def _pixels(rows) -> torch.Tensor:
    return torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in rows])


def _batch(rows) -> dict:
    """Left-padded prompts (as a tokenizer pads for generation), one image each."""
    seqs = [_row(i) for i in rows]
    ids, mask = left_pad(seqs, PAD)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(rows))


def _generate(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, do_sample=False)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# Row independence is checked on logits and on the embeddings the language model receives,
# not on a few greedy tokens of a random LM (which a small leak between rows rarely flips).
# A row run alone has no padding; in the left-padded batch its n positions are the row's last
# n (the reduced batch stays left-padded). float32: the batched and the single run sum in
# different orders; the differences measured on these tiny models are <= 2e-7 on logits of
# magnitude < 0.6 (float32 spacing there: 6e-8) and <= 1e-8 on the LM inputs. ROW_ATOL =
# 1e-6 leaves ~16 ulps for that noise and is below what a leak moves: adding 1e-5 times an
# image's position in the batch to its kept features fails these checks (the greedy tokens
# the tests compared before did not change).
ROW_ATOL = 1e-6


def lm_run(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward: (logits, the ``inputs_embeds`` the language model receives)."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        handle.remove()
    return logits, seen[0]


def assert_rows_independent(model, inputs: dict, alone: list[dict]) -> None:
    """Row b of the padded batch ``inputs`` gives the LM inputs and the logits of the same
    prompt run alone (``alone[b]``: its inputs), within ROW_ATOL, at every real position."""
    logits, embeds = lm_run(model, inputs)
    assert logits.shape[0] == len(alone)
    for b, single in enumerate(alone):
        l1, e1 = lm_run(model, single)
        assert l1.shape[1] <= logits.shape[1] and e1.shape[1] <= embeds.shape[1], b
        torch.testing.assert_close(embeds[b, -e1.shape[1]:], e1[0], rtol=0, atol=ROW_ATOL,
                                   msg=lambda m, b=b: f"row {b}, LM inputs: {m}")
        torch.testing.assert_close(logits[b, -l1.shape[1]:], l1[0], rtol=0, atol=ROW_ATOL,
                                   msg=lambda m, b=b: f"row {b}, logits: {m}")


class _LMInput:
    """Records the sequence lengths and masks the language model receives."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append((kwargs["inputs_embeds"].shape[1], kwargs.get("attention_mask")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("rows", [(0,), (0, 1, 2, 3)])
def test_identity_matches_unpatched(model, rows):
    inputs = _batch(rows)
    ref_logits, ref_gen = _logits(model, inputs), _generate(model, inputs)
    vlprune.patch(model, visual_keep=1.0)
    assert torch.equal(_logits(model, inputs), ref_logits)
    assert torch.equal(_generate(model, inputs), ref_gen)
    # keeping every token through the rewrite path gives the same computation
    vlprune.patch(model, visual_keep=N_IMG)
    torch.testing.assert_close(_logits(model, inputs), ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(model, inputs), ref_gen)


@pytest.mark.parametrize("keep", [4, 0.3])
@pytest.mark.parametrize("score", [*SCORES, "pool"])
def test_generate_reduces_and_rows_are_independent(model, score, keep):
    if score == "pool":
        keep = 4 if keep == 4 else 0.25
    k = keep if isinstance(keep, int) else math.ceil(keep * N_IMG)
    vlprune.patch(model, visual_keep=keep, visual_score=score)
    rows = (0, 1, 2, 3)
    inputs = _batch(rows)
    with _LMInput(model) as lm:
        out = _generate(model, inputs)
    L = inputs["input_ids"].shape[1]
    # prefill sees the shorter prompt; every row lost N_IMG - k placeholders
    assert lm.calls[0][0] == L - (N_IMG - k)
    assert all(n == 1 for n, _ in lm.calls[1:])
    # the caller's prompt comes back, then the new tokens
    assert torch.equal(out[:, :L], inputs["input_ids"]) and out.shape[1] == L + 5
    alone = [_batch((i,)) for i in rows]
    for single in alone:
        with _LMInput(model) as lm1:
            _logits(model, single)
        assert lm1.calls[0][0] == single["input_ids"].shape[1] - (N_IMG - k)
    # a row's LM inputs and logits do not depend on its neighbours
    assert_rows_independent(model, inputs, alone)


def test_forward_features_and_labels(model):
    inputs = _batch((0, 1))
    vlprune.patch(model, visual_keep=5, visual_score="cls_attn")
    labels = inputs["input_ids"].clone()
    labels[labels == IMAGE_ID] = -100
    with torch.no_grad(), _LMInput(model) as lm:
        out = model(**inputs, labels=labels)
    L = inputs["input_ids"].shape[1]
    assert out.logits.shape[1] == L - (N_IMG - 5) == lm.calls[0][0]
    assert torch.isfinite(out.loss)
    # the kept image features are 5 of each image's own projected patches, in their order
    kept = out.image_outputs.pooler_output
    assert [k.shape for k in kept] == [(5, 32)] * 2
    with torch.no_grad():
        full = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    for k, f in zip(kept, full):
        where = [int((f == row).all(dim=1).nonzero()[0]) for row in k]
        assert where == sorted(set(where))


def test_random_is_seeded_and_scores_differ(model):
    inputs = _batch((0,))
    vlprune.patch(model, visual_keep=4, visual_score="random", visual_seed=1)
    a, b = _logits(model, inputs), _logits(model, inputs)
    assert torch.equal(a, b)
    vlprune.patch(model, visual_keep=4, visual_score="random", visual_seed=2)
    assert not torch.equal(_logits(model, inputs), a)


def test_disabled_and_unpatch_restore(model):
    inputs = _batch((0, 2))
    ref_logits, ref_gen = _logits(model, inputs), _generate(model, inputs)
    cls = type(model)
    vlprune.patch(model, visual_keep=4)
    assert _logits(model, inputs).shape[1] < ref_logits.shape[1]
    with vlprune.disabled(model):
        assert torch.equal(_logits(model, inputs), ref_logits)
    vlprune.unpatch(model)
    assert type(model) is cls and type(model) is LlavaForConditionalGeneration
    assert not any(k.startswith("_vlprune") for m in model.modules() for k in m.__dict__)
    assert torch.equal(_logits(model, inputs), ref_logits)
    assert torch.equal(_generate(model, inputs), ref_gen)


def test_configure_and_describe(model):
    vlprune.patch(model, visual_keep=8)
    vlprune.configure(model, visual_keep=4, visual_score="diversity")
    d = vlprune.describe(model, flops=False)
    assert [(lr.tokens_in, lr.tokens_out, lr.tower) for lr in d.layers] == [(N_IMG, 4, "visual")]


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(visual_keep=4, visual_contextual=2), "would be ignored"),
        (dict(visual_keep=4, visual_score="dominant_contextual", visual_contextual=-1), "int >= 0"),
        (dict(text_keep=0.0), r"text_keep must be a float ratio in \(0, 1\]"),
        (dict(text_keep=2), r"text_keep must be a float ratio in \(0, 1\]"),
        (dict(visual_keep=4, text_protect_last=3), "text_keep is not"),
        (dict(text_keep=0.5, text_protect_last=-1), "int >= 0"),
        (dict(visual_keep=4, visual_score="nope"), "allowed"),
        (dict(visual_score="random"), "visual_keep is not"),
        (dict(visual_seed=3), "visual_keep is not"),
        (dict(visual_keep=0), "int count >= 1"),
        (dict(visual_keep=1.5), "float ratio in"),
        (dict(visual_keep=True), "int count >= 1 or a float"),
        (dict(visual_keep=-0.5), "float ratio in"),
    ],
)
def test_bad_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        vlprune.ReductionConfig(**settings)


def test_refusals(model):
    with pytest.raises(ValueError, match="only 16 visual tokens"):
        vlprune.patch(model, visual_keep=17)
    with pytest.raises(ValueError, match="visual_keep must be 4"):
        vlprune.patch(model, visual_keep=5, visual_score="pool")
    with pytest.raises(ValueError, match="text_merge_r not supported on LlavaForConditionalGeneration"):
        vlprune.patch(model, visual_keep=4, text_merge_r=2)
    with pytest.raises(ValueError, match="give visual_keep"):
        vlprune.patch(model, merge_r=0)
    assert not vlprune.is_patched(model)
    # image-only models refuse the visual_* settings
    tower = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8,
    ))
    with pytest.raises(ValueError, match="vision-language model"):
        vlprune.patch(tower, visual_keep=4)
    # prompts whose placeholder count does not match the images
    vlprune.patch(model, visual_keep=4)
    inputs = _batch((0,))
    inputs["input_ids"] = inputs["input_ids"][:, 1:]
    inputs["input_ids"][0, 3] = 5  # one placeholder fewer
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    with pytest.raises(ValueError, match="image tokens"):
        _logits(model, inputs)
