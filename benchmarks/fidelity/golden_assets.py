"""What the golden-file scripts share: the reference checkout's commit, the real ViT-Ti
weights and the first shared images, loaded the way the project's real-data tests load them."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import torch

MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def timm_state_dict(assets: Path) -> dict[str, torch.Tensor]:
    """The real ViT-Ti weights (timm keys) from the shared assets."""
    with np.load(assets / MODEL / f"{MODEL}.npz", allow_pickle=False) as z:
        return {k: torch.from_numpy(np.array(z[k])) for k in z.files}


def load_timm_model(assets: Path):
    """timm's ViT-Ti with the real weights, in eval mode, and its state dict."""
    import timm

    model = timm.create_model(MODEL, pretrained=False)
    sd = timm_state_dict(assets)
    model.load_state_dict(sd, strict=True)
    return model.eval(), sd


def load_images(assets: Path, model, count: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    root = assets / "imagenet-sample"
    with open(root / "labels.csv", newline="") as f:
        rows = {row["filename"]: int(row["class_index"]) for row in csv.DictReader(f)}
    files = sorted(rows)[:count]
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    folder = root / "images" if (root / "images").is_dir() else root
    xs = []
    for name in files:
        with Image.open(folder / name) as im:
            xs.append(transform(im.convert("RGB")))
    return files, torch.stack(xs), torch.tensor([rows[n] for n in files])
