"""vlprune's ``visual_score="visionzip"`` against the original VisionZip (LLaVA-1.5 path).

``tests/golden/visionzip_llava15.npz`` was written by the reference code
(dvlab-research/VisionZip, ``visionzip.visionzip(model, dominant=D, contextual=C)`` then
``CLIPVisionTower_VisionZip.forward``; commit, versions and adaptations in the ``.json``) with
``benchmarks/fidelity/make_golden_visionzip.py`` on the seeded tiny tower of
``benchmarks/fidelity/tiny_clip.py`` (576 patches, 24 layers) and 3 fixed images. Here the
same tower sits in a tiny LLaVA-1.5 patched with ``vlprune.patch``; we compare the dominant
indices, the pre-projector tokens (dominant then contextual) and the tokens the language
model receives (the projector applied to the reference's tokens).

Tolerance 1e-5 absolute plus 1e-5 relative: float32 throughout, but the tower's hidden states
reach 16 in magnitude after 22 layers and transformers 4.37 and 5 run them with different
kernels, so the feature layer itself already differs by up to ~5e-6 (``test_same_tower``);
the rule adds nothing measurable (max differences measured: 6.1e-6 at 64 tokens, 8.6e-6 at
128, both under 6e-6 relative). The reference reads the attention of its own forward, we
recompute the class row and the keys from the layer's input.
"""

from __future__ import annotations

import pytest
import torch
from fidelity_report import report
from golden_llava import build_llava, lm_visual_features, load, tiny_clip, tower_hidden

import vlprune

pytest.importorskip("transformers")
from vlprune.adapters.llava.detect import encoder_layers  # noqa: E402
from vlprune.adapters.llava.exact import reduce_hidden  # noqa: E402

ATOL = 1e-5
RTOL = 1e-5
SETTINGS = {64: (54, 10), 128: (108, 20)}  # visual_keep: VisionZip's dominant, contextual


@pytest.fixture(scope="module")
def golden():
    return load("visionzip_llava15")


@pytest.fixture(scope="module")
def llava():
    return build_llava()


@pytest.fixture(scope="module")
def pixels():
    return tiny_clip.pixels()


def test_golden_describes_its_source(golden):
    ref = golden["meta"]["reference"]
    assert ref["repository"] == "https://github.com/dvlab-research/VisionZip"
    assert len(ref["commit"]) == 40
    assert golden["meta"]["tower"]["config"] == tiny_clip.CONFIG
    assert golden["idx_54"].shape == (3, 54) and golden["tokens_54"].shape == (3, 64, 32)
    assert golden["idx_108"].shape == (3, 108) and golden["tokens_108"].shape == (3, 128, 32)


def test_same_tower(golden, llava, pixels):
    """The tests' tower (transformers 5) is the reference's (transformers 4.37)."""
    hs = tower_hidden(llava, pixels)
    torch.testing.assert_close(hs[-2][:, :4], golden["hidden_head"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("keep", sorted(SETTINGS))
def test_rule_matches_reference(golden, llava, pixels, keep):
    """The rule on the tower's hidden states: VisionZip's dominant indices (class token first,
    the rest in the reference's top-k order) and its pre-projector tokens."""
    dom, _ = SETTINGS[keep]
    hs = tower_hidden(llava, pixels)
    res = reduce_hidden("visionzip", hs, encoder_layers(llava), -2, keep, None, 576)
    diff = max(float((res.tokens[j] - golden[f"tokens_{dom}"][j]).abs().max())
               for j in range(pixels.shape[0]))
    report("VisionZip", f"{keep} tokens: max |pre-projector token diff|", diff)
    for j in range(pixels.shape[0]):
        assert res.indices[j].tolist() == golden[f"idx_{dom}"][j].tolist()
        torch.testing.assert_close(res.tokens[j], golden[f"tokens_{dom}"][j], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("keep", sorted(SETTINGS))
def test_patched_llava_matches_reference(golden, llava, pixels, keep):
    """Through ``vlprune.patch``: each image's span shrinks to ``keep`` tokens and the language
    model receives the projector's image of the reference's tokens."""
    dom, _ = SETTINGS[keep]
    vlprune.patch(llava, visual_keep=keep, visual_score="visionzip")
    try:
        feats, ids = lm_visual_features(llava, pixels)
        d = vlprune.describe(llava, {**_inputs(pixels)}, flops=False)
    finally:
        vlprune.unpatch(llava)
    with torch.no_grad():
        want = llava.model.multi_modal_projector(golden[f"tokens_{dom}"])
    assert (ids == llava.config.image_token_id).sum(dim=1).tolist() == [keep] * 3
    for j in range(3):
        torch.testing.assert_close(feats[j], want[j], atol=ATOL, rtol=RTOL)
    assert [(lr.tokens_in, lr.tokens_out, lr.tower) for lr in d.layers] == [(576, keep, "visual")]


def _inputs(pixels):
    from golden_llava import prompts

    return dict(prompts(pixels.shape[0]), pixel_values=pixels)


def test_contextual_count_option(llava, pixels):
    """``visual_contextual`` sets the contextual count; the class token is always kept."""
    vlprune.patch(llava, visual_keep=20, visual_score="visionzip", visual_contextual=5)
    try:
        feats, _ = lm_visual_features(llava, pixels[:1])
    finally:
        vlprune.unpatch(llava)
    hs = tower_hidden(llava, pixels[:1])
    res = reduce_hidden("visionzip", hs, encoder_layers(llava), -2, 20, 5, 576)
    assert feats[0].shape[0] == 20 and res.indices[0].shape[0] == 15 and res.indices[0][0] == 0
