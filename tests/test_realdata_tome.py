"""ToMe merging on real ViT-Ti/16 weights and the 500 shared ImageNet images."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

# Top-1 drop (pt) of the original ToMe code (facebookresearch/ToMe @ af95e4b, tome.patch.timm)
# at r = 8 / 13 / 16 on these same 500 images, measured by benchmarks/fidelity/side_by_side.py
# (docs/results/fidelity_side_by_side.json; r = 8 gains 0.4 pt), plus 0.5 pt of slack.
TOME_DROP = {8: -0.4, 13: 1.4, 16: 2.8}
SLACK = 0.5


def test_tome_accuracy_drop_within_reference(vit_tiny_real):
    from vlprune.eval.imagenet import accuracy_sweep
    from vlprune.eval.sweep import Setting

    model, data = vit_tiny_real
    rows = accuracy_sweep(model, data, [Setting.merge(r) for r in TOME_DROP], progress=False)
    base = rows[0]
    assert base["n"] == 500
    assert base["top1"] == pytest.approx(82.6, abs=0.3)
    ratios = []
    for row, (r, ref) in zip(rows[1:], TOME_DROP.items()):
        assert row["setting"] == f"r={r}"
        assert -row["delta_top1"] <= ref + SLACK, (r, row)
        ratios.append(row["flops_ratio"])
    assert ratios == sorted(ratios) and ratios[-1] > 1.9  # more merging, fewer FLOPs
