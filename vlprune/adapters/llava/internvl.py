"""InternVL (transformers' ``InternVLForConditionalGeneration`` and ``InternVLModel``): what
differs from the LLaVA families.

An InternVL image arrives as tiles (``pixel_values`` is ``(total_tiles, 3, H, W)``: the
processor's crops and thumbnail of every image of the batch, in order). Each tile gives the
same number of tokens: its patch grid (the class token dropped) is pixel-shuffled
(``downsample_ratio`` 0.5: each token holds a 2x2 block of patches, concatenated) and
projected. One image's placeholder span in ``input_ids`` is one contiguous run of image
tokens (the processor wraps it in ``<img>`` ... ``</img>``), holding its tiles' tokens, so
the runs say how many tiles each image has (:func:`image_runs`, :func:`image_tiles`).

* ``visual_keep`` is per image: all of an image's tiles are ranked as one
  (:func:`~vlprune.adapters.llava.encode.group_tiles`), and a ratio is of all its tiles'
  tokens. The kept features reach upstream as one ``(1, kept, D)`` tensor (InternVL's
  ``forward`` scatters a tensor's values into the placeholders; LLaVA's take a list).
* FastV (``llm_keep``) budgets per image too: per run of image tokens.
* Tower scores (``cls_attn``, ``attn``, ``dominant_contextual``) are per patch at the feature
  layer (the InternViT layer's own pre-norm, q/k projections and q/k norms); a token's score
  is the **sum** of its 2x2 patches' scores (:func:`shuffle_scores`), grouped by the model's
  own ``pixel_shuffle``, so the grouping is the features' grouping. The sum keeps the scores
  a distribution over the image's tokens (the attention the class token gives the token's
  whole block); every token holds the same number of patches, so a mean would rank alike.
* Prompt dropping (``text_keep``) never drops the tokens right before and after an image
  run (``<img>``, ``</img>``): they mark where each image starts and ends
  (:func:`span_neighbours`).
* Videos: the processor gives a video as its frames, each a one-tile image with its own run,
  so each frame is reduced as an image; temporal merging is refused.
* Refused at ``patch()`` (:func:`check_internvl`): merging or pruning inside the vision
  tower (each tile's pixel shuffle needs its full square patch grid), ``pool`` (the pixel
  shuffle already folds 2x2 patches into each token) and the exact LLaVA-1.5 rules
  (``visionzip``, ``prumerge``, ``prumerge_plus``: they reduce the CLIP patch grid of one
  crop before the projector).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...config import ReductionConfig
from ..base import upstream_class
from .tower import ATTENTION_OPTIONS, TOWER_OPTIONS

# transformers 5: the HF-native InternVL classes (InternVL2.5 / InternVL3 "-hf" checkpoints)
INTERNVL_CLASSES = {
    "transformers.models.internvl.modeling_internvl.InternVLForConditionalGeneration": "internvl",
    "transformers.models.internvl.modeling_internvl.InternVLModel": "internvl",
}
# LLaVA-1.5's vision tower options, refused here (prop_attn and attn_backend only matter with
# them; check_llava_tower refuses attn_backend='flex')
_TOWER_NAMES = tuple(n for n in TOWER_OPTIONS if n not in ATTENTION_OPTIONS)
_EXACT = ("visionzip", "prumerge", "prumerge_plus")


def check_internvl(model: nn.Module, config: ReductionConfig) -> None:
    """Raise for the options an InternVL cannot run (before anything is patched)."""
    name = type(model).__name__
    default = ReductionConfig()
    tower = [n for n in _TOWER_NAMES if getattr(config, n) != getattr(default, n)]
    if tower:
        raise ValueError(
            f"{', '.join(tower)} (merging or pruning inside the vision tower) not available on "
            f"{name}: each tile's pixel shuffle folds 2x2 neighbouring patches of the tile's full "
            "square patch grid into one token, so the tower must keep every patch; use "
            "visual_keep (reduction of the projected tokens before the language model)"
        )
    temporal = [n for n in ("temporal_keep", "temporal_threshold") if getattr(config, n) is not None]
    if temporal:
        raise ValueError(
            f"{', '.join(temporal)} merge video frames over time; {name} takes a video as its "
            "frames, each an image of one tile with its own <img> run in pixel_values, so each "
            "frame is reduced as an image (visual_keep); temporal merging is available on "
            "LlavaNextVideoForConditionalGeneration and LlavaOnevisionForConditionalGeneration"
        )
    score = config.visual_score
    if score in _EXACT:  # prumerge / prumerge_plus come without visual_keep
        raise ValueError(
            f"visual_score={score!r} is the exact rule of its authors for LLaVA-1.5 (one crop, a "
            f"CLIP tower whose patch grid it reduces before the projector); {name} pixel-shuffles "
            "2x2 patches of every tile into one token before its projector, so the rule does not "
            "apply; use visual_score='cls_attn' or 'dominant_contextual' (VisionZip-like)"
        )
    if score == "pool":
        raise ValueError(
            f"visual_score='pool' averages 2x2 patches; {name}'s pixel shuffle already folds "
            "2x2 patches into each token: use 'cls_attn', 'attn', 'text', 'diversity' or 'random'"
        )
    layer = model.config.vision_feature_layer
    if config.visual_keep is not None and not isinstance(layer, int):
        raise ValueError(f"{name} reads one int vision_feature_layer, got {layer!r}")


def tile_tokens(model: nn.Module) -> int:
    """Projected tokens of one tile: its patch grid shrunk by ``downsample_ratio`` per side."""
    vcfg = model.config.vision_config
    size, patch = vcfg.image_size, vcfg.patch_size
    h, w = size if isinstance(size, (list, tuple)) else (size, size)
    ph, pw = patch if isinstance(patch, (list, tuple)) else (patch, patch)
    ratio = model.config.downsample_ratio
    return int((h // ph) * ratio) * int((w // pw) * ratio)


def image_runs(input_ids: Tensor, image_id: int) -> list[list[int]]:
    """Per row, the lengths of its runs of consecutive ``image_id`` tokens, in order: one run
    per image (its placeholder span)."""
    out = []
    for row in input_ids == image_id:
        idx = row.nonzero()[:, 0]
        if idx.numel() == 0:
            out.append([])
            continue
        breaks = ((idx[1:] != idx[:-1] + 1).nonzero()[:, 0] + 1).tolist()
        bounds = [0, *breaks, idx.numel()]
        out.append([b - a for a, b in zip(bounds, bounds[1:])])
    return out


def image_tiles(input_ids: Tensor, image_id: int, per_tile: int, num_tiles: int) -> list[int]:
    """The tile count of every image of the batch (row by row): each run of image tokens is
    one image of ``run / per_tile`` tiles; the counts must add up to the ``num_tiles`` tiles
    of ``pixel_values``."""
    tiles = []
    for b, runs in enumerate(image_runs(input_ids, image_id)):
        for n in runs:
            if n % per_tile:
                raise ValueError(
                    f"row {b} holds a run of {n} image tokens; each InternVL tile gives "
                    f"{per_tile} tokens, so an image's run must be a multiple of {per_tile} "
                    "(expand each image placeholder to its tiles' tokens, as the processor does)"
                )
            tiles.append(n // per_tile)
    if sum(tiles) != num_tiles:
        raise ValueError(
            f"input_ids hold image runs of {tiles} tiles ({sum(tiles)} in all) but pixel_values "
            f"has {num_tiles} tiles; give every image its tiles' placeholder tokens"
        )
    return tiles


def shuffle_scores(inner: nn.Module, scores: Tensor) -> Tensor:
    """Per-patch scores (C, N) of C tiles -> per-token scores (C, T): each token's score is the
    sum of the scores of the patches the model's own ``pixel_shuffle`` folds into it."""
    C, N = scores.shape
    side = math.isqrt(N)
    if side * side != N:
        raise ValueError(f"InternVL tiles need a square patch grid, got {N} patches")
    cls = upstream_class(type(inner))
    grid = scores.float().reshape(C, side, side, 1)
    shuffled = cls.pixel_shuffle(inner, grid, scale_factor=inner.config.downsample_ratio)
    return shuffled.reshape(C, -1, shuffled.shape[-1]).sum(dim=-1)


def span_neighbours(input_ids: Tensor, image_id: int) -> Tensor:
    """(B, L) bool: the tokens right before and right after each run of image tokens (the
    ``<img>`` / ``</img>`` marks), which prompt dropping keeps."""
    img = input_ids == image_id
    out = torch.zeros_like(img)
    out[:, :-1] |= img[:, 1:] & ~img[:, :-1]
    out[:, 1:] |= img[:, :-1] & ~img[:, 1:]
    return out
