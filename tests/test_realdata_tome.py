"""ToMe merging on real ViT-Ti/16 weights and the 500 shared ImageNet images."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
# Drop of the original ToMe algorithm at r = 8 / 13 / 16 on comparable images (pt), plus the
# 0.5 pt slack the acceptance allows.
TOME_DROP = {8: 1.6, 13: 1.8, 16: 4.8}
SLACK = 0.5


@pytest.fixture(scope="module")
def vit_tiny_and_data(assets_dir):
    timm = pytest.importorskip("timm")
    from vlprune.eval.imagenet import load_eval_tensors
    from vlprune.eval.weights import load_weights

    torch.set_num_threads(2)
    model = timm.create_model(MODEL, pretrained=False)
    load_weights(model, assets_dir / MODEL / f"{MODEL}.npz")
    data = load_eval_tensors(assets_dir / "imagenet-sample", model)
    return model.eval(), data


def test_tome_accuracy_drop_within_reference(vit_tiny_and_data):
    from vlprune.eval.bench import Setting
    from vlprune.eval.sweep import accuracy_sweep

    model, data = vit_tiny_and_data
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
