"""Per-image (per-video) selection of the merged visual tokens that reach the language model.

Owns :func:`select_tokens`: each encoded image or video keeps ``visual_keep`` of its merged
tokens (a count, or a ratio of that item's tokens), ranked by ``visual_score`` -- the tower's
attention (``attn``, :func:`~.encode.received_attention`), the prompt (``text``), feature
diversity or a seeded random draw -- and returns their indices, ascending, so each kept token
keeps its place (and its 3-D position) in the prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...core.select import count_of
from ...core.visual import select_visual, text_attention_scores, visual_diversity_scores
from ..base import LayerRecord, PatchContext
from .encode import Encoded


def keep_count(keep: int | float, n: int, name: str = "visual_keep") -> int:
    """Tokens one image or video keeps: an int count as is, a ratio ``ceil(ratio * n)``."""
    return count_of(keep, n, name, "an image or video gives only {n} visual tokens")


def select_tokens(ctx: PatchContext, enc: Encoded, texts: list[Tensor | None],
                  what: str) -> list[Tensor]:
    """Indices of the kept tokens of every item of ``enc`` under the settings ``ctx``;
    ``texts[j]``: the prompt embeddings of item j's row (``text`` score)."""
    cfg = ctx.config
    score = cfg.visual_score
    out = []
    for j, f in enumerate(enc.feats):
        n = f.shape[0]
        k = keep_count(cfg.visual_keep, n)
        if score == "attn":
            s = enc.scores[j]
        elif score == "text":
            s = text_attention_scores(f, texts[j])
        elif score == "random":
            # seeded by position only, so an item's choice does not depend on its batch
            s = torch.rand(n, generator=torch.Generator().manual_seed(cfg.visual_seed)).to(f.device)
        elif score == "diversity":
            s = visual_diversity_scores(f, k)
        else:  # check_qwen refuses the others at patch time
            raise ValueError(f"visual_score={score!r} is not supported on Qwen-VL models")
        out.append(select_visual(s, k))
    record = ctx.record
    if record is not None and enc.feats:
        record.append(LayerRecord(0, enc.feats[0].shape[0], out[0].shape[0], 0, None,
                                  "visual" if what == "image" else what))
    return out
