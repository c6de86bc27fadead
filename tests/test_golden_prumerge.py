"""vlprune's ``visual_score="prumerge"`` / ``"prumerge_plus"`` against the original
LLaVA-PruMerge (``token_prune_merge_advanced``) and PruMerge+ (``..._plus``).

``tests/golden/prumerge_llava15.npz`` was written by the reference code (42Shawn/LLaVA-PruMerge,
``llava/model/multimodal_encoder/clip_encoder.py``; commit, versions and adaptations in the
``.json``) with ``benchmarks/fidelity/make_golden_prumerge.py`` on the seeded tiny tower of
``benchmarks/fidelity/tiny_clip.py`` (576 patches, 24 layers: the reference hooks
``layers[23]``) and 3 fixed images, one image per call. Here the same tower sits in a tiny
LLaVA-1.5 patched with ``vlprune.patch``; we compare the adaptive ratio and count, the kept
indices (in the reference's order), the pre-projector tokens and the tokens the language
model receives (the projector applied to the reference's tokens), in one batch of images with
different counts.

Counts, ratios and indices must be equal. Tokens: 1e-5 absolute plus 1e-5 relative (float32;
the tower's feature layer differs by ~5e-6 between transformers 4.37 and 5, values up to 16;
see ``test_golden_visionzip.py``).
"""

from __future__ import annotations

import pytest
import torch
from fidelity_report import report
from golden_llava import build_llava, lm_visual_features, load, prompts, tiny_clip, tower_hidden

import vlprune

pytest.importorskip("transformers")
from vlprune.adapters.llava.detect import encoder_layers  # noqa: E402
from vlprune.adapters.llava.exact import reduce_hidden  # noqa: E402

ATOL = RTOL = 1e-5
METHODS = ("prumerge", "prumerge_plus")


@pytest.fixture(scope="module")
def golden():
    return load("prumerge_llava15")


@pytest.fixture(scope="module")
def llava():
    return build_llava()


@pytest.fixture(scope="module")
def pixels():
    return tiny_clip.pixels()


@pytest.fixture(scope="module")
def hidden(llava, pixels):
    return tower_hidden(llava, pixels)


def _split(golden, name):
    counts = golden[f"{name}_counts"].tolist()
    kept = golden[f"{name}_kept_counts"].tolist()
    return counts, golden[f"{name}_tokens"].split(counts), golden[f"{name}_idx"].split(kept)


def test_golden_describes_its_source(golden):
    ref = golden["meta"]["reference"]
    assert ref["repository"] == "https://github.com/42Shawn/LLaVA-PruMerge"
    assert len(ref["commit"]) == 40
    assert golden["meta"]["tower"]["config"] == tiny_clip.CONFIG
    for name in METHODS:
        counts, toks, idx = _split(golden, name)
        assert len(counts) == 3 and all(t.shape == (c, 32) for t, c in zip(toks, counts))
    # the batch below needs images of different adaptive counts
    assert len(set(golden["prumerge_counts"].tolist())) > 1


@pytest.mark.parametrize("name", METHODS)
def test_rule_matches_reference(golden, llava, hidden, name):
    """On the tower's hidden states: the IQR ratio, the kept indices in the reference's order
    (top-k best first; PruMerge+'s sampled positions after them) and the updated tokens with
    the extra token last."""
    counts, toks, idx = _split(golden, name)
    res = reduce_hidden(name, hidden, encoder_layers(llava), -2, None, None, 576)
    diff = max(float((res.tokens[j] - toks[j]).abs().max()) for j in range(3)
               if res.tokens[j].shape == toks[j].shape)
    report(name, "max |pre-projector token diff| (counts and indices compared exactly)", diff)
    assert res.ratios == pytest.approx(golden[f"{name}_ratio"].tolist(), abs=0)
    for j in range(3):
        assert res.indices[j].tolist() == idx[j].tolist()
        assert res.tokens[j].shape[0] == counts[j]
        torch.testing.assert_close(res.tokens[j], toks[j], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", METHODS)
def test_patched_llava_matches_reference(golden, llava, pixels, name):
    """Through ``vlprune.patch`` on one batch of the 3 images (different counts): each row's
    span shrinks to its image's count, the language model receives the projector's image of
    the reference's tokens, and ``describe`` reports every image's count."""
    counts, toks, _ = _split(golden, name)
    vlprune.patch(llava, visual_score=name)
    try:
        feats, ids = lm_visual_features(llava, pixels)
        d = vlprune.describe(llava, dict(prompts(3), pixel_values=pixels), flops=False)
    finally:
        vlprune.unpatch(llava)
    assert (ids == llava.config.image_token_id).sum(dim=1).tolist() == counts
    with torch.no_grad():
        for j in range(3):
            want = llava.model.multi_modal_projector(toks[j][None])[0]
            torch.testing.assert_close(feats[j], want, atol=ATOL, rtol=RTOL)
    assert [(lr.index, lr.tokens_in, lr.tokens_out, lr.tower) for lr in d.layers] == [
        (j, 576, c, "visual") for j, c in enumerate(counts)]
