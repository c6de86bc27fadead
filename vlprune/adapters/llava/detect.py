"""Which LLaVA family a model is, its geometry, and the patch-time checks.

Owns family detection (:func:`llava_family`), the token counts of one image
(:func:`vision_tokens`, :func:`visual_keep_count`), where the vision tower's encoder layers
are (:func:`encoder_layers`, :func:`has_class_token`) and :func:`check_llava`, which refuses
a :class:`~vlprune.config.ReductionConfig` the model cannot run before anything is patched.
"""

from __future__ import annotations

import math

from torch import nn

from ...config import ReductionConfig
from ...core.select import count_of
from ..base import UnsupportedModelError, class_path_in_mro, hf_image_input_size
from .exact import EXACT_SCORES, check_exact
from .internvl import INTERNVL_CLASSES, check_internvl, tile_tokens
from .llm import check_decoder_layers, llm_layers
from .parts import inner_model
from .tower import TOWER_OPTIONS, check_llava_tower, tower_requested, tower_tokens_per_image

_FAMILIES = {
    "transformers.models.llava.modeling_llava.LlavaForConditionalGeneration": "llava",
    "transformers.models.llava_next.modeling_llava_next.LlavaNextForConditionalGeneration":
        "llava_next",
    "transformers.models.llava_onevision.modeling_llava_onevision."
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "transformers.models.llava_next_video.modeling_llava_next_video."
    "LlavaNextVideoForConditionalGeneration": "llava_next_video",
    # the base models (no language-model head): the same families
    "transformers.models.llava.modeling_llava.LlavaModel": "llava",
    "transformers.models.llava_next.modeling_llava_next.LlavaNextModel": "llava_next",
    "transformers.models.llava_onevision.modeling_llava_onevision.LlavaOnevisionModel":
        "llava_onevision",
    "transformers.models.llava_next_video.modeling_llava_next_video.LlavaNextVideoModel":
        "llava_next_video",
    # InternVL: tiles of one patch grid each, pixel-shuffled (see .internvl)
    **INTERNVL_CLASSES,
}
# visual_score values that read the vision tower's attention at the feature layer
ATTN_SCORES = ("cls_attn", "attn", "dominant_contextual")
_VIDEO_FAMILIES = ("llava_onevision", "llava_next_video")


def llava_family(model: nn.Module) -> str | None:
    """``llava``, ``llava_next``, ``llava_onevision``, ``llava_next_video``, ``internvl`` or
    None."""
    mro = class_path_in_mro(model)
    for path, name in _FAMILIES.items():
        if path in mro:
            return name
    return None


def vision_tokens(model: nn.Module, strategy: str | None = None) -> int:
    """Projected tokens of one crop (the patch grid, plus the class token for ``full``): the
    tokens of one LLaVA-1.5 image, the base image of an anyres one, one tile of an InternVL
    image (its pixel-shuffled grid)."""
    if llava_family(model) == "internvl":
        return tile_tokens(model)
    vcfg = model.config.vision_config
    _, h, w = hf_image_input_size(vcfg)
    n = (h // vcfg.patch_size) * (w // vcfg.patch_size)
    strategy = strategy or model.config.vision_feature_select_strategy
    return n + (1 if strategy == "full" else 0)


def visual_keep_count(keep: int | float, num_tokens: int, name: str = "visual_keep") -> int:
    """Tokens one image keeps: an int count as is, a ratio as ``ceil(ratio * n)`` (>= 1)."""
    return count_of(keep, num_tokens, name, "an image gives only {n} visual tokens")


def _vision_inner(model: nn.Module) -> nn.Module:
    tower = getattr(inner_model(model), "vision_tower", None)
    return getattr(tower, "vision_model", tower)


def encoder_layers(model: nn.Module):
    """The vision tower's encoder layers (``encoder.layers``, or under ``vision_model``;
    InternViT's ``encoder.layer``)."""
    encoder = getattr(_vision_inner(model), "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is None:
        layers = getattr(encoder, "layer", None)
    if layers is None:
        tower = getattr(inner_model(model), "vision_tower", None)
        raise UnsupportedModelError(
            f"LLaVA with a {type(tower).__name__} vision tower: expected a CLIP-, SigLIP- or "
            "InternViT-like tower with encoder.layers"
        )
    return layers


def has_class_token(model: nn.Module) -> bool:
    """True when the vision tower's embeddings prepend a class token (CLIP's
    ``class_embedding``, InternViT's ``cls_token``)."""
    emb = getattr(_vision_inner(model), "embeddings", None)
    return hasattr(emb, "class_embedding") or hasattr(emb, "cls_token")


def attention_parts(layer: nn.Module):
    """``(pre_norm, q, k, heads, scale)`` of a vision encoder layer: its pre-attention norm,
    functions giving the query and key projections of normed input (InternViT's q/k norms
    included) and the attention's heads and scale; ``None`` for a layer of another kind."""
    if hasattr(layer, "layer_norm1") and hasattr(layer, "self_attn"):  # CLIP / SigLIP
        attn = layer.self_attn
        norm, q, k = layer.layer_norm1, attn.q_proj, attn.k_proj
    elif hasattr(layer, "layernorm_before") and hasattr(layer, "attention"):  # InternViT
        attn = layer.attention
        norm = layer.layernorm_before

        def q(h, attn=attn):
            return attn.q_norm(attn.q_proj(h))

        def k(h, attn=attn):
            return attn.k_norm(attn.k_proj(h))
    else:
        return None
    if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads")):
        return None
    return norm, q, k, attn.num_heads, getattr(attn, "scale", None)


def check_llava(model: nn.Module, config: ReductionConfig) -> None:
    """Raise unless ``model`` can run ``config`` (before anything is patched)."""
    family = llava_family(model)
    anyres = family != "llava"  # image token counts vary (anyres crops, InternVL tiles)
    other = [
        n for n in ReductionConfig.field_names()
        if not n.startswith(("visual_", "llm_", "temporal_"))
        and n not in ("family", "text_keep", "text_protect_last", *TOWER_OPTIONS)
        and getattr(config, n) != getattr(ReductionConfig(), n)
    ]
    if other:
        raise ValueError(
            f"{', '.join(other)} not supported on {type(model).__name__}; use visual_keep, "
            "visual_score (reduction before the language model), text_keep (prompt dropping), "
            "llm_layer, llm_keep (pruning inside it) and temporal_keep / temporal_threshold "
            "(videos)"
        )
    if family == "internvl":
        check_internvl(model, config)  # tower options, pool, the exact rules, temporal: refused
    temporal = [n for n in ("temporal_keep", "temporal_threshold") if getattr(config, n) is not None]
    if temporal and family not in _VIDEO_FAMILIES:
        raise ValueError(
            f"{', '.join(temporal)} merge video frames over time; {type(model).__name__} takes no "
            "videos (LlavaNextVideoForConditionalGeneration and "
            "LlavaOnevisionForConditionalGeneration do)"
        )
    check_llava_tower(model, config)  # merge_r / prune_*: refused on anyres families
    if not config.has_visual_settings and not tower_requested(config):
        raise ValueError(
            "give visual_keep (an int count or a float ratio in (0, 1]), text_keep, llm_layer "
            "and llm_keep, temporal_keep or temporal_threshold (videos), or merge_r / prune_keep "
            f"(inside the vision tower) to patch {type(model).__name__}"
        )
    n = tower_tokens_per_image(model, config)
    n = vision_tokens(model) if n is None else n
    if config.llm_keep is not None:
        layers = llm_layers(model)
        if not 0 < config.llm_layer < len(layers):
            raise ValueError(
                f"llm_layer={config.llm_layer} out of range: the language model has "
                f"{len(layers)} decoder layers, give 1..{len(layers) - 1}"
            )
        check_decoder_layers(layers[config.llm_layer - 1:])
        if not anyres:
            per_image = n if config.visual_keep is None else visual_keep_count(config.visual_keep, n)
            if isinstance(config.llm_keep, int) and config.llm_keep > per_image:
                raise ValueError(
                    f"llm_keep={config.llm_keep} but each image enters the language model with "
                    f"only {per_image} visual tokens"
                )
    if config.visual_score in EXACT_SCORES and not config.visual_is_identity:
        check_exact(model, config, family, encoder_layers(model), tower_requested(config),
                    has_class_token(model), vision_tokens(model, "default"))
    if config.visual_keep is None:
        return
    layers = encoder_layers(model)
    if config.visual_score in ATTN_SCORES and attention_parts(layers[0]) is None:
        raise UnsupportedModelError(
            f"visual_score={config.visual_score!r} needs CLIP-, SigLIP- or InternViT-style encoder "
            "layers (a pre-norm and q_proj/k_proj); use 'text', 'diversity' or 'random'"
        )
    if not anyres and isinstance(config.visual_keep, int):
        visual_keep_count(config.visual_keep, n)
    if config.visual_score == "pool":
        if anyres:
            raise ValueError(
                f"visual_score='pool' pools one square patch grid; {type(model).__name__} packs "
                "crops of different shapes with row-end tokens: use another visual_score"
            )
        grid = vision_tokens(model, "default")
        if model.config.vision_feature_select_strategy != "default" or math.isqrt(grid) ** 2 != grid:
            raise ValueError("visual_score='pool' needs a square patch grid without the class token")
        if visual_keep_count(config.visual_keep, n) != n // 4:
            raise ValueError(
                f"visual_score='pool' averages 2x2 patches: visual_keep must be {n // 4} (or 0.25) "
                f"for {n} tokens per image, got {config.visual_keep!r}"
            )
