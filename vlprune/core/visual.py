"""Per-image selection of visual tokens handed to a language model (pure tensor code).

A vision-language model gives each image a sequence of projected visual tokens ``(n, D)``;
these functions turn a score per token into the kept tokens (top-k in original order, with
protected tokens such as LLaVA-NeXT's row-end ``image_newline`` kept first), and compute the
scores that need more than one tensor: text-guided attention (SparseVLM-like), VisionZip's
dominant + contextual tokens, and image-guided scores of prompt tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .scores import diversity_order

__all__ = [
    "contextual_count",
    "dominant_contextual",
    "image_text_alignment",
    "select_visual",
    "text_attention_scores",
    "visual_diversity_scores",
]


def select_visual(scores: Tensor, k: int, protect: Tensor | None = None) -> Tensor:
    """Indices (k,) of the kept tokens, ascending: every protected token, then the best
    ``k - protected`` of the others by ``scores`` (n,)."""
    n = scores.shape[0]
    if k >= n:
        return torch.arange(n, device=scores.device)
    s = scores.float()
    if protect is not None and bool(protect.any()):
        n_prot = int(protect.sum())
        if k < n_prot:
            raise ValueError(
                f"keeping {k} visual tokens of an image is fewer than its {n_prot} protected "
                "row-end (image_newline) tokens; give a larger visual_keep (a ratio scales with "
                "the image)"
            )
        s = s.masked_fill(protect, float("inf"))
    return s.topk(k).indices.sort().values


def visual_diversity_scores(feats: Tensor, k: int, protect: Tensor | None = None) -> Tensor:
    """Scores (n,) whose top ``k`` (with the protected tokens) are a max-min diverse subset of
    the unprotected tokens of ``feats`` (n, D) (DivPrune)."""
    n = feats.shape[0]
    free = torch.ones(n, dtype=torch.bool, device=feats.device) if protect is None else ~protect
    picks = max(0, k - (n - int(free.sum())))
    scores = torch.full((n,), float("-inf"), device=feats.device)
    if picks and bool(free.any()):
        scores[free] = diversity_order(feats[free][None], 0, picks=picks)[0]
    return scores


def text_attention_scores(visual: Tensor, text: Tensor) -> Tensor:
    """Attention (n,) the prompt's text embeddings ``text`` (t, D) give each visual token of
    ``visual`` (n, D): softmax over the visual tokens of the scaled dot products, averaged over
    the text tokens (SparseVLM's text-raters, in the language model's input space). With no
    text token every score is 0."""
    if text.shape[0] == 0:
        return torch.zeros(visual.shape[0], device=visual.device)
    logits = text.float() @ visual.float().T / math.sqrt(visual.shape[-1])
    return logits.softmax(dim=-1).mean(dim=0)


def image_text_alignment(text: Tensor, visual: Tensor) -> Tensor:
    """Alignment (t,) of each prompt token embedding ``text`` (t, D) with an image: its best
    cosine similarity to the image's projected visual tokens ``visual`` (n, D)."""
    if visual.shape[0] == 0:
        return torch.zeros(text.shape[0], device=text.device)
    sim = F.normalize(text.float(), dim=-1) @ F.normalize(visual.float(), dim=-1).T
    return sim.max(dim=-1).values


def contextual_count(k: int, contextual: int | None) -> int:
    """Contextual tokens among ``k`` kept (VisionZip: 10 of 64); at least one dominant."""
    c = round(k * 10 / 64) if contextual is None else contextual
    return max(0, min(c, k - 1))


def dominant_contextual(feats: Tensor, scores: Tensor, k: int, contextual: int | None = None,
                        protect: Tensor | None = None) -> Tensor:
    """VisionZip-like reduction of one image's tokens ``feats`` (n, D) to ``k`` tokens.

    The ``k - c`` tokens with the highest ``scores`` (class-token attention; protected tokens
    first) are *dominant* and kept as they are, in their order. The other tokens are grouped
    around ``c`` evenly spaced ones among them, each joining the group whose centre is most
    similar (cosine), and each group becomes one *contextual* token, the mean of its members;
    the contextual tokens follow the dominant ones.
    """
    n = feats.shape[0]
    if k >= n:
        return feats
    c = contextual_count(k, contextual)
    dom = select_visual(scores, k - c, protect)
    if c == 0:
        return feats[dom]
    rest_mask = torch.ones(n, dtype=torch.bool, device=feats.device)
    rest_mask[dom] = False
    rest = rest_mask.nonzero()[:, 0]  # n - k + c >= c tokens
    centres = (torch.arange(c, device=feats.device) * rest.shape[0]) // c
    r = F.normalize(feats[rest].float(), dim=-1)
    assign = (r @ r[centres].T).argmax(dim=-1)  # (R,)
    assign[centres] = torch.arange(c, device=feats.device)  # a centre stays in its own group
    sums = torch.zeros(c, feats.shape[1], device=feats.device, dtype=torch.float32)
    sums.index_add_(0, assign, feats[rest].float())
    counts = torch.bincount(assign, minlength=c).clamp_min(1).to(sums)
    ctx = (sums / counts[:, None]).to(feats.dtype)
    return torch.cat([feats[dom], ctx], dim=0)
