"""The fixed tiny CLIP vision tower and pixels of the VisionZip / PruMerge golden files.

LLaVA-1.5's geometry (336 px images, 14 px patches: 576 patches + the class token; 24 encoder
layers, as both references hard-code: VisionZip's ``r`` list of 24 entries and PruMerge's
``layers[23]``), with tiny layers (width 32, 4 heads). The weights are drawn from a seeded
generator by parameter name (the ``vision_model.`` prefix of transformers 4 dropped), so the
reference run (transformers 4.37) and the tests (transformers 5) build the same tower without
a weight file. Only torch here: the golden scripts and the tests both import it.
"""

from __future__ import annotations

import math

import torch

CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=24, num_attention_heads=4,
              image_size=336, patch_size=14)
SEED = 1234
PIXEL_SEED = 7
IMAGES = 3


def _key(name: str) -> str:
    return name[len("vision_model."):] if name.startswith("vision_model.") else name


def init_weights(model: torch.nn.Module, seed: int = SEED) -> torch.nn.Module:
    """Overwrite every parameter of a ``CLIPVisionModel`` deterministically: matrices
    ``N(0, 1 / fan_in)``, biases ``N(0, 0.02^2)``, layer-norm weights ``1 + N(0, 0.1^2)``,
    embeddings ``N(0, 0.5^2)``; parameters in name order, one generator."""
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(params, key=_key):
            p = params[name]
            key = _key(name)
            z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in key and key.endswith("weight"):
                v = 1 + 0.1 * z
            elif key.endswith("bias"):
                v = 0.02 * z
            elif "class_embedding" in key or "position_embedding" in key:
                v = 0.5 * z
            else:  # linear and patch-convolution matrices
                v = z / math.sqrt(p[0].numel())
            p.copy_(v.to(p.dtype))
    return model


def build_tower():
    """The seeded tower (transformers' ``CLIPVisionModel``, eager attention), eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(**CONFIG)
    cfg._attn_implementation = "eager"
    return init_weights(CLIPVisionModel(cfg)).eval()


def pixels(count: int = IMAGES, seed: int = PIXEL_SEED) -> torch.Tensor:
    """(count, 3, 336, 336) images: seeded smooth noise (a 24x24 grid upsampled, plus fine
    noise), so patches differ in structure as in real images."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, 24, 24, generator=gen)
    fine = 0.3 * torch.randn(count, 3, 336, 336, generator=gen)
    up = torch.nn.functional.interpolate(coarse, size=(336, 336), mode="bilinear", align_corners=False)
    return up + fine
