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
from .select import stable_order

__all__ = [
    "contextual_count",
    "iqr_outlier_ratio",
    "prumerge_merge",
    "prumerge_select",
    "visionzip_reduce",
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
    return stable_order(s)[:k].sort().values  # ties: the earlier token


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
    """VisionZip-like reduction of one image's tokens ``feats`` (n, D) to ``k`` tokens (our
    own variant; the exact rule is :func:`visionzip_reduce`, ``visual_score="visionzip"``).

    The ``k - c`` tokens with the highest ``scores`` (class-token attention; protected tokens
    first) are *dominant* and kept as they are, in their order. The other tokens are grouped
    around ``c`` evenly spaced ones among them, each joining the group whose centre is most
    similar (cosine), and each group becomes one *contextual* token, the mean of its members;
    the contextual tokens follow the dominant ones.

    Differences from VisionZip: it works on any token list (anyres crops packed with row-end
    tokens, towers without a class token, the projected features), so (1) it groups and
    averages the *projected* features (VisionZip: the tower hidden states before the
    projector), (2) similarity is cosine on those features (VisionZip: the feature layer's keys
    averaged over heads), (3) centres are at ``i * R // c`` (VisionZip: every ``R // c``-th
    leftover token, the first ``c``), (4) a contextual token is the mean of the group, centre
    included (VisionZip: the centre plus the mean of its other members), (5) the class token
    is not kept (VisionZip keeps it among the dominant tokens) and the ranking is the class
    attention averaged over heads (VisionZip: summed; the same order up to ties).
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


# ---------------------------------------------------------------------------------------------
# Exact pre-projector rules of published methods (LLaVA-1.5 geometry: one crop, class token).
# Each works on one image's tower hidden states at the feature layer, before the projector.


def visionzip_reduce(hidden: Tensor, cls_attn: Tensor, keys: Tensor, dominant: int,
                     contextual: int) -> tuple[Tensor, Tensor, Tensor]:
    """VisionZip (dvlab-research/VisionZip ``CLIPVisionTower_VisionZip.forward``) on one image.

    ``hidden`` (N+1, D): the tower's hidden states at the feature layer, class token first;
    ``cls_attn`` (N,): the class token's attention to each patch at that layer, summed over
    heads; ``keys`` (N+1, d): that layer's keys averaged over heads. Keeps the class token and
    the ``dominant`` patches of highest ``cls_attn`` (in their original order, class token
    first), then ``contextual`` tokens: of the R leftover tokens (original order) every
    ``max(1, R // contextual)``-th one, the first ``contextual`` of those, are centres; each
    other leftover token joins its most cosine-similar centre (keys), and a contextual token is
    its centre plus the mean of its members (the centre alone when it has none).

    Returns the kept tokens (1 + dominant + contextual, D), the dominant indices (class token
    0 first, then ``topk`` order as VisionZip's ``all_indices``) and the centre indices into
    the leftover tokens.
    """
    n1 = hidden.shape[0]
    dev = hidden.device
    top = stable_order(cls_attn)[:dominant] + 1  # VisionZip's topk; ties: the earlier patch
    all_idx = torch.cat([torch.zeros(1, dtype=top.dtype, device=dev), top])
    mask = torch.ones(n1, dtype=torch.bool, device=dev)
    mask[all_idx] = False
    dom = hidden[~mask]  # original order, class token first
    if contextual == 0:
        return dom, all_idx, torch.zeros(0, dtype=torch.long, device=dev)
    left = hidden[mask]
    metric = keys[mask]
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # zero keys: no NaN
    R = left.shape[0]
    step = max(1, R // contextual)
    centres = torch.arange(0, R, step, device=dev)[:contextual]
    members = ~torch.isin(torch.arange(R, device=dev), centres)
    sim = metric[members] @ metric[centres].T
    one_hot = torch.zeros(int(members.sum()), centres.shape[0], dtype=hidden.dtype, device=dev)
    one_hot.scatter_(1, sim.argmax(dim=1, keepdim=True), 1)
    counts = one_hot.sum(dim=0).clamp(min=1)[:, None]
    ctx = left[centres] + (one_hot.T @ left[members]) / counts
    return torch.cat([dom, ctx]), all_idx, centres


def iqr_outlier_ratio(cls_attn: Tensor) -> float:
    """LLaVA-PruMerge's ``outlier_dectection``: the fraction of the values of ``cls_attn``
    above ``Q3 + 1.5 * IQR`` (numpy's linear percentiles, in float32, as the reference)."""
    import numpy as np

    a = cls_attn.detach().to(torch.float32).cpu().numpy().flatten()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    upper = q3 + 1.5 * (q3 - q1)
    return len(np.where(a > upper)[0]) / len(a)


def prumerge_select(cls_attn: Tensor, plus: bool) -> tuple[Tensor, float]:
    """The kept patch indices of LLaVA-PruMerge (``token_prune_merge_advanced``, adaptive):
    the ``int(N * ratio)`` patches of highest ``cls_attn`` (N,) in descending order, ``ratio``
    the IQR outlier fraction; PruMerge+ (``..._plus``) appends the positions
    ``0, s, 2s, ... < N - 1`` (``s = int(int(1 / ratio) / 3)``; the reference writes 575, N - 1
    at LLaVA-1.5's 576 patches) that are not kept yet, ascending. Returns the indices and the
    ratio."""
    n = cls_attn.shape[0]
    ratio = iqr_outlier_ratio(cls_attn)
    idx = stable_order(cls_attn)[: int(n * ratio)]  # the reference's topk; ties: earlier first
    if plus:
        if ratio == 0:
            raise ValueError(
                "visual_score='prumerge_plus' found no class-attention outlier in an image, so its "
                "sampling step int(1 / ratio) is undefined (the reference divides by zero here)"
            )
        s = int(int(1 / ratio) / 3)
        if s == 0:
            raise ValueError(
                f"visual_score='prumerge_plus': {ratio:.3f} of the patches are outliers, so the "
                "sampling step int(int(1 / ratio) / 3) is 0 (the reference fails here too)"
            )
        seq = torch.arange(0, n - 1, s, device=cls_attn.device)
        idx = torch.cat([idx, seq[~torch.isin(seq, idx)]])
    return idx, ratio


def prumerge_merge(feats: Tensor, cls_attn: Tensor, keys: Tensor, idx: Tensor,
                   knn: int = 32) -> Tensor:
    """LLaVA-PruMerge's merge on one image: ``feats`` (N, D) the patch features, ``cls_attn``
    (N,), ``keys`` (N, C) the patch keys, ``idx`` the kept indices (in their order). Each kept
    token becomes itself plus the ``cls_attn``-weighted sum (not normalised) of the ``knn``
    other tokens (kept or not) whose keys are most cosine-similar to its own; one extra token,
    the ``cls_attn``-weighted sum of the tokens not kept, follows. Returns (len(idx) + 1, D)."""
    n = feats.shape[0]
    dev = feats.device
    kn = F.normalize(keys, p=2, dim=-1)
    sim = kn[idx] @ kn.T  # (k, N)
    sim[torch.arange(idx.shape[0], device=dev), idx] = float("-inf")  # not itself
    nn_idx = stable_order(sim)[:, :knn]  # (k, knn), most similar first (ties: earlier)
    updated = feats[idx] + (feats[nn_idx] * cls_attn[nn_idx][..., None]).sum(dim=1)
    rest = torch.ones(n, dtype=torch.bool, device=dev)
    rest[idx] = False
    extra = (feats[rest] * cls_attn[rest][:, None]).sum(dim=0, keepdim=True)
    return torch.cat([updated, extra])
