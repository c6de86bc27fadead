"""Per-image selection of the visual tokens that reach the language model.

Owns :func:`select_images`: each encoded image keeps ``visual_keep`` of its projected tokens,
ranked by ``visual_score`` (the tower's attention, class row or mean received, captured by
:func:`~vlprune.adapters.llava.encode.encode_images`, the prompt, feature diversity, a seeded
random draw, VisionZip-like dominant + contextual tokens) with the row-end tokens kept first,
or averaged over 2x2 patches (``pool``, :func:`pool_grid`). The exact pre-projector rules
(``visionzip``, ``prumerge``, ``prumerge_plus``, :mod:`.exact`) arrive already selected; their
counts may differ per image (PruMerge's adaptive count). ``describe`` records the first image's
counts, or with an adaptive score one entry per image (index: its number in the batch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...config import ADAPTIVE_VISUAL_SCORES
from ...core.visual import (
    dominant_contextual,
    select_visual,
    text_attention_scores,
    visual_diversity_scores,
)
from ..base import LayerRecord, PatchContext
from .detect import visual_keep_count
from .encode import Encoded


def select_images(ctx: PatchContext, enc: Encoded, texts: list[Tensor | None]) -> list[Tensor]:
    """The kept tokens of every image under the settings ``ctx``, ``texts[j]``: the prompt
    embeddings of image j's row."""
    cfg = ctx.config
    score = cfg.visual_score
    kept = [] if not enc.selected else list(enc.feats)  # exact rules: selected when encoded
    for j, f in enumerate([] if enc.selected else enc.feats):
        n = f.shape[0]
        prot = enc.protect[j]
        if cfg.visual_is_identity:
            kept.append(f)
            continue
        k = visual_keep_count(cfg.visual_keep, n)
        if score == "pool":
            kept.append(pool_grid(f, k, cfg.visual_keep))
            continue
        if score == "dominant_contextual":
            kept.append(dominant_contextual(f, enc.scores[j], k, cfg.visual_contextual, prot))
            continue
        if score in ("cls_attn", "attn"):
            s = enc.scores[j]
        elif score == "text":
            s = text_attention_scores(f, texts[j])
        elif score == "random":
            # seeded by position only, so an image's choice does not depend on its batch
            gen = torch.Generator().manual_seed(cfg.visual_seed)
            s = torch.rand(n, generator=gen).to(f.device)
        else:  # diversity
            s = visual_diversity_scores(f, k, prot)
        kept.append(f[select_visual(s, k, prot)])
    record = ctx.record
    if record is not None and enc.feats:
        # adaptive scores: one record per image (index j: its number in the batch), as
        # counts differ per image; otherwise the first image's (all alike)
        per_image = cfg.visual_score in ADAPTIVE_VISUAL_SCORES
        for j, f in enumerate(kept if per_image else kept[:1]):
            record.append(LayerRecord(j, enc.lens[j], f.shape[0], 0, None, "visual"))
    return kept


def pool_grid(f: Tensor, k: int, visual_keep: int | float) -> Tensor:
    """The (n, D) tokens of one square patch grid averaged over 2x2 patches (``k`` must be
    ``n // 4``; ``visual_keep`` is what the caller asked for, for the error message)."""
    n, D = f.shape
    side = math.isqrt(n)
    if side * side != n or side % 2:
        raise ValueError(
            f"visual_score='pool' needs an even square patch grid without the class token "
            f"(vision_feature_select_strategy='default'); got {n} tokens per image"
        )
    if k != n // 4:
        raise ValueError(
            f"visual_score='pool' averages 2x2 patches: visual_keep must be {n // 4} (or "
            f"0.25) for {n} tokens per image, got {visual_keep!r}"
        )
    grid = f.view(side, side, D).permute(2, 0, 1)[None]
    return F.avg_pool2d(grid, 2)[0].flatten(1).T
