"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """The shared folder of real weights and images, from ``$VLPRUNE_ASSETS``."""
    root = os.environ.get("VLPRUNE_ASSETS")
    if not root:
        pytest.skip("set VLPRUNE_ASSETS to the shared assets folder")
    path = Path(root)
    if not path.is_dir():
        pytest.fail(f"VLPRUNE_ASSETS={root} is not a folder")
    return path


VIT_TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


@pytest.fixture(scope="session")
def vit_tiny_real(assets_dir: Path):
    """Real ViT-Ti/16 AugReg weights and the 500 shared images, decoded once per session.

    Returns ``(model, (images, labels))``. Tests must leave the model unpatched.
    """
    timm = pytest.importorskip("timm")
    import torch

    from vlprune.eval.image_data import load_eval_tensors
    from vlprune.eval.weights import load_weights

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = timm.create_model(VIT_TINY, pretrained=False)
    load_weights(model, assets_dir / VIT_TINY / f"{VIT_TINY}.npz")
    data = load_eval_tensors(assets_dir / "imagenet-sample", model)
    yield model.eval(), data
    import vlprune

    assert not vlprune.is_patched(model), "a test left the shared real-weights model patched"
