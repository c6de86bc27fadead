"""ToMe merging on real ViT-Ti/16 weights and the 500 shared ImageNet images."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

# Drop of the original ToMe algorithm at r = 8 / 13 / 16 on comparable images (pt), plus the
# 0.5 pt slack the acceptance allows.
TOME_DROP = {8: 1.6, 13: 1.8, 16: 4.8}
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
