"""vlprune's diversity selection (``visual_score="diversity"``, ``prune_score="diversity"``)
against the original DivPrune implementation.

The golden file was produced by the reference code (vbdi/divprune,
``LLaVA/llava/model/llava_arch.py``: ``DivPrune`` and ``pairwise_cosine_similarity``; commit,
versions and command in ``tests/golden/divprune_llava15.json``) with
``benchmarks/fidelity/make_golden_divprune.py``: seeded LLaVA-1.5-shaped projected visual
tokens (576 x 64, clustered) and the reference's picks, in pick order, for three subset ratios.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fidelity_report import report

from vlprune.core.scores import diversity_order
from vlprune.core.visual import select_visual, visual_diversity_scores

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def golden():
    np = pytest.importorskip("numpy")
    with np.load(GOLDEN / "divprune_llava15.npz", allow_pickle=False) as z:
        data = {k: torch.from_numpy(z[k]) for k in z.files}
    meta = json.loads((GOLDEN / "divprune_llava15.json").read_text())
    return data, meta


def _ratios(meta) -> list[str]:
    return sorted(meta["counts"], key=float)


def test_golden_describes_its_source(golden):
    _, meta = golden
    assert meta["reference"]["repository"] == "https://github.com/vbdi/divprune"
    assert len(meta["reference"]["commit"]) == 40
    assert len(_ratios(meta)) == 3


def test_pick_order_matches_divprune(golden):
    """The same tokens in the same order: DivPrune's first pick (the token farthest from its
    nearest neighbour), then max-min picks."""
    data, meta = golden
    feats = data["feats"]
    for ratio in _ratios(meta):
        want = data[f"picks_{ratio}"].tolist()
        k = len(want)
        scores = diversity_order(feats[None], 0, picks=k)[0]
        got = scores.argsort(descending=True)[:k].tolist()
        report("DivPrune", f"{k} picks: positions in pick order that differ from the reference",
               sum(g != w for g, w in zip(got, want)))
        assert got == want, f"ratio {ratio}: first difference at pick {_first_diff(got, want)}"


def test_llava_selection_keeps_divprune_set(golden):
    """The LLaVA path's selection (scores, then kept indices in original order) keeps exactly
    DivPrune's subset for the same count."""
    data, meta = golden
    feats = data["feats"]
    for ratio in _ratios(meta):
        want = sorted(data[f"picks_{ratio}"].tolist())
        k = len(want)
        kept = select_visual(visual_diversity_scores(feats, k), k)
        assert kept.tolist() == want


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
