"""Per-image visual-token selection (vlprune.core.visual): top-k with protected tokens,
VisionZip's dominant + contextual tokens, text-guided and image-guided scores."""

from __future__ import annotations

import pytest
import torch

from vlprune.core.visual import (
    contextual_count,
    dominant_contextual,
    image_text_alignment,
    select_visual,
    text_attention_scores,
    visual_diversity_scores,
)


def test_select_keeps_protected_then_best_in_order():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.0, 0.5])
    assert select_visual(scores, 3).tolist() == [1, 3, 5]
    protect = torch.tensor([False, False, False, False, True, False])
    assert select_visual(scores, 3, protect).tolist() == [1, 3, 4]
    assert select_visual(scores, 6).tolist() == list(range(6))
    with pytest.raises(ValueError, match="row-end"):
        select_visual(scores, 1, torch.tensor([True, True, False, False, False, False]))


def test_contextual_count_follows_visionzip_split():
    assert contextual_count(64, None) == 10
    assert contextual_count(1, None) == 0
    assert contextual_count(8, 20) == 7  # at least one dominant token


def test_dominant_contextual_means_of_groups():
    torch.manual_seed(0)
    # two clusters of leftover tokens around two directions, and three dominant tokens
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    feats = torch.stack([a * 1.0, a * 2.0, torch.tensor([0, 0, 1.0, 0]), b * 1.0, b * 3.0,
                         torch.tensor([0, 0, 0, 1.0]), a * 4.0, b * 5.0])
    scores = torch.tensor([0.0, 0.0, 9.0, 0.0, 0.0, 8.0, 0.0, 7.0])
    out = dominant_contextual(feats, scores, k=5, contextual=2)
    assert out.shape == (5, 4)
    # dominant tokens first, in their order
    assert torch.equal(out[:3], feats[[2, 5, 7]])
    # contextual tokens: the mean of each direction's leftover tokens
    ctx = {tuple(r.tolist()) for r in out[3:]}
    assert ctx == {tuple((a * 7 / 3).tolist()), tuple((b * 2.0).tolist())}
    # keeping everything is the identity
    assert torch.equal(dominant_contextual(feats, scores, k=8), feats)


def test_text_attention_prefers_aligned_tokens():
    torch.manual_seed(1)
    visual = torch.randn(20, 16) * 0.1
    text = torch.randn(3, 16)
    visual[7] = text[0] * 3
    visual[12] = text[1] * 3
    s = text_attention_scores(visual, text)
    assert set(s.topk(2).indices.tolist()) == {7, 12}
    assert torch.allclose(s.sum(), torch.tensor(1.0))
    assert torch.equal(text_attention_scores(visual, text[:0]), torch.zeros(20))


def test_image_text_alignment_and_diversity():
    visual = torch.eye(4)
    text = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0.5], [1.0, 1.0, 0, 0]])
    torch.testing.assert_close(image_text_alignment(text, visual), torch.tensor([1.0, 1.0, 2 ** -0.5]))
    feats = torch.tensor([[1.0, 0], [0.99, 0.01], [0, 1.0], [-1.0, 0]])
    # By hand (DivPrune's max-min rule on cosine similarity, 0.99/|(0.99, .01)| = 0.99995):
    #   g01 = .99995, g02 = 0, g03 = -1, g12 = .0101, g13 = -.99995, g23 = 0
    #   most similar other token: t0 .99995, t1 .99995, t2 .0101, t3 0 -> first pick t3 (least)
    #   distance 1 - g to the picks {3}: t0 2, t1 1.99995, t2 1 -> second pick t0
    #   distance to {3, 0}: t1 min(1.99995, .00005) = .00005, t2 min(1, 1) = 1 -> third pick t2
    # scores: n - step = 4, 3, 2 for t3, t0, t2; t1 is never picked (-inf)
    s = visual_diversity_scores(feats, 3)
    assert s.tolist() == [3.0, float("-inf"), 2.0, 4.0]
    assert s.topk(3).indices.tolist() == [3, 0, 2]
    # t2 protected, k = 2: one pick among t0, t1, t3; their most similar others are .99995,
    # .99995 and max(-1, -.99995) = -.99995, so t3 is picked: kept {2 (protected), 3}
    protect = torch.tensor([False, False, True, False])
    assert select_visual(visual_diversity_scores(feats, 2, protect), 2, protect).tolist() == [2, 3]
