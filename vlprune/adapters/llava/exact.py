"""Exact published pre-projector rules on LLaVA-1.5: VisionZip, LLaVA-PruMerge, PruMerge+.

``visual_score="visionzip"``, ``"prumerge"`` and ``"prumerge_plus"`` reproduce the authors'
code (dvlab-research/VisionZip ``visionzip/clip_encoder.py``; 42Shawn/LLaVA-PruMerge
``llava/model/multimodal_encoder/clip_encoder.py``), which reduces the vision tower's hidden
states at the feature layer *before* the projector. So these scores do not go through
``get_image_features``: :func:`~vlprune.adapters.llava.encode.encode_exact` runs the tower
once (``output_hidden_states``), reduces each image's hidden states (:func:`reduce_hidden`,
:mod:`vlprune.core.visual`), and projects the kept tokens with the model's own
``multi_modal_projector``.

Per image, as the references at batch size 1 (LLaVA's evaluation): PruMerge's IQR statistics
are the image's own (the reference pools them over the batch, and its PruMerge+ only runs at
batch size 1), so counts differ per image and each placeholder span shrinks to its image's
count. Output order is the references': VisionZip's dominant tokens in position order (class
token first) then the contextual ones; PruMerge's kept tokens best-first by class attention,
PruMerge+'s sampled ones after them (ascending), then the extra token.

What each reads, for a tower of L encoder layers and ``vision_feature_layer`` f (LLaVA-1.5:
24 layers, f = -2, so layer 22 produces the features and layer 23 reads them):

* VisionZip: the layer that produces ``hidden_states[f]`` (VisionZip hard-codes
  ``attentions[-2]``, ``hidden_states[-2]`` and ``layers[-2].metric``): its class-token
  attention, recomputed per head from its input, summed over heads; its keys averaged over
  heads (VisionZip's ``metric``). The class token is kept with the dominant tokens whatever
  ``vision_feature_select_strategy`` says (VisionZip's tower returns it).
* PruMerge / PruMerge+: the layer that reads ``hidden_states[f]`` (the reference hooks
  ``layers[23]``'s ``q_proj`` / ``k_proj``): single-head attention
  ``softmax(q k^T / sqrt(D))`` over the full projections (bias included, no head split), the
  class token's row over the patches; the keys of the patches. The patches are
  ``hidden_states[f][1:]`` (LLaVA's ``"patch"`` features).

Only ``LlavaForConditionalGeneration`` with a class-token tower and one int feature layer is
supported (:func:`check_exact`); the references' other paths (VisionZip's LLaVA-NeXT layout,
batched outlier statistics) are not reproduced.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...config import ADAPTIVE_VISUAL_SCORES, ReductionConfig
from ...core.select import count_of
from ...core.visual import contextual_count, prumerge_merge, prumerge_select, visionzip_reduce
from ..base import UnsupportedModelError

#: visual scores that reduce the tower's hidden states before the projector
EXACT_SCORES = ("visionzip", "prumerge", "prumerge_plus")
PRUMERGE_KNN = 32  # the reference's k of its k-nearest-neighbour update


def _feature_index(layer: int, num_layers: int) -> int:
    """Index into ``hidden_states`` (0: the embeddings, i: the output of layer i - 1)."""
    return layer % (num_layers + 1)


def check_exact(model: nn.Module, config: ReductionConfig, family: str, layers,
                tower_reduces: bool, class_token: bool, patches: int) -> None:
    """Raise unless ``model`` can run the exact rule of ``config.visual_score`` (``layers``:
    the tower's encoder layers, ``class_token``: whether it has one, ``patches``: patches per
    image)."""
    score = config.visual_score
    name = type(model).__name__
    if family != "llava":
        extra = (" (VisionZip's own LLaVA-NeXT layout, restore_image_features_sorted with its "
                 "hard-coded 24x24 grid, is not reproduced)") if score == "visionzip" else ""
        raise ValueError(
            f"visual_score={score!r} is the exact rule of its authors for LLaVA-1.5 "
            f"(LlavaForConditionalGeneration: one crop, a CLIP tower with a class token); "
            f"{name} packs anyres crops{extra}; use visual_score='dominant_contextual' "
            "(VisionZip-like) or 'cls_attn'"
        )
    if not class_token:
        raise ValueError(
            f"visual_score={score!r} ranks patches by the class token's attention; the vision "
            "tower of this model has no class token: use 'dominant_contextual', 'diversity' or "
            "'text'"
        )
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(
            f"visual_score={score!r} reads one vision_feature_layer, the model concatenates "
            f"{list(layer)}; use 'text', 'diversity' or 'random'"
        )
    if tower_reduces:
        raise ValueError(
            f"visual_score={score!r} reads the full patch grid of the vision tower; merge_r / "
            "prune_keep inside the tower would change it: use one or the other"
        )
    attn = getattr(layers[0], "self_attn", None)
    if not (hasattr(layers[0], "layer_norm1") and all(
            hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads"))):
        raise UnsupportedModelError(
            f"visual_score={score!r} needs CLIP-style encoder layers (layer_norm1, "
            "self_attn.q_proj/k_proj)"
        )
    num = len(layers)
    h = _feature_index(layer, num)
    if h == 0:
        raise ValueError(f"visual_score={score!r} needs a vision_feature_layer after the embeddings")
    if score in ADAPTIVE_VISUAL_SCORES:
        if h >= num:
            raise ValueError(
                f"visual_score={score!r} reads the attention of the encoder layer after the "
                f"feature layer (layers[23] of LLaVA-1.5's 24, at vision_feature_layer=-2); "
                f"vision_feature_layer={layer} is the tower's last output"
            )
        if patches - 1 < PRUMERGE_KNN:
            raise ValueError(
                f"visual_score={score!r} updates each kept token with its {PRUMERGE_KNN} nearest "
                f"other patches; this tower gives only {patches} patches per image"
            )


def _attn_inputs(layer: nn.Module, x: Tensor):
    h = layer.layer_norm1(x)
    attn = layer.self_attn
    return h, attn


def visionzip_scores(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """From the input ``x`` (B, N+1, D) of the feature layer: the class token's attention to
    each patch summed over heads (B, N) and the keys averaged over heads (B, N+1, d), as
    VisionZip's patched ``CLIPAttention`` computes them (``q * scale``, softmax)."""
    h, attn = _attn_inputs(layer, x)
    B, N1, _ = h.shape
    H = attn.num_heads
    scale = getattr(attn, "scale", (h.shape[-1] // H) ** -0.5)
    k = attn.k_proj(h).view(B, N1, H, -1).transpose(1, 2)  # (B, H, N+1, d)
    q = (attn.q_proj(h[:, :1]) * scale).view(B, 1, H, -1).transpose(1, 2)
    cls = (q @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]  # (B, H, N+1)
    return cls[:, :, 1:].sum(dim=1), k.mean(dim=1)


def prumerge_scores(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """From the input ``x`` (B, N+1, D) of the layer PruMerge hooks: the class token's
    single-head attention to each patch (B, N), ``softmax(q k^T * D ** -0.5)`` over the full
    ``q_proj`` / ``k_proj`` outputs, and the patches' keys (B, N, D)."""
    h, attn = _attn_inputs(layer, x)
    k = attn.k_proj(h)
    q = attn.q_proj(h[:, :1])
    a = ((q @ k.transpose(-2, -1)) * x.shape[-1] ** -0.5).softmax(dim=-1)
    return a[:, 0, 1:], k[:, 1:]


class ExactResult:
    """Per image: the kept pre-projector tokens and what the rule decided (for tests and
    ``describe``)."""

    def __init__(self):
        self.tokens: list[Tensor] = []
        self.indices: list[Tensor] = []  # VisionZip: dominant (all_indices); PruMerge: kept
        self.ratios: list[float] = []  # PruMerge: the IQR outlier fraction


def reduce_hidden(score: str, hidden_states, layers, feature_layer: int, keep: int | float | None,
                  contextual: int | None, span: int) -> ExactResult:
    """Apply ``score``'s exact rule to every image of the tower output ``hidden_states``
    (a tuple of (B, N+1, D)); ``span``: the placeholder tokens of one image (what a ``visual_keep``
    ratio or count refers to)."""
    h = _feature_index(feature_layer, len(layers))
    feats = hidden_states[h]
    res = ExactResult()
    if score == "visionzip":
        cls_attn, keys = visionzip_scores(layers[h - 1], hidden_states[h - 1])
        k = count_of(keep, span, "visual_keep", "an image gives only {n} visual tokens")
        c = contextual_count(k, contextual)
        for j in range(feats.shape[0]):
            out, idx, _ = visionzip_reduce(feats[j], cls_attn[j], keys[j], k - c - 1, c)
            res.tokens.append(out)
            res.indices.append(idx)
        return res
    cls_attn, keys = prumerge_scores(layers[h], feats)
    patches = feats[:, 1:]
    for j in range(feats.shape[0]):  # one image at a time: the reference's batch of one
        idx, ratio = prumerge_select(cls_attn[j], plus=score == "prumerge_plus")
        res.tokens.append(prumerge_merge(patches[j], cls_attn[j], keys[j], idx, PRUMERGE_KNN))
        res.indices.append(idx)
        res.ratios.append(ratio)
    return res
