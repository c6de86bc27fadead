"""Which Qwen-VL family a model is, where its parts are, and the patch-time checks.

Owns family detection (:func:`qwen_family`), the base model holding ``visual`` and
``language_model`` (:func:`inner_model`), the vision block whose attention the ``attn``
score reads (:func:`score_block`) and :func:`check_qwen`, which refuses a
:class:`~vlprune.config.ReductionConfig` the model cannot run before anything is patched.
"""

from __future__ import annotations

from torch import nn

from ...config import ReductionConfig
from ..base import UnsupportedModelError, class_path_in_mro

_FAMILIES = {
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration":
        "qwen2_5_vl",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLModel": "qwen2_5_vl",
    "transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLForConditionalGeneration": "qwen3_vl",
    "transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLModel": "qwen3_vl",
}

# visual_score values and why the others are refused on these models
SCORES = ("attn", "text", "diversity", "random")
_REFUSED_SCORES = {
    "cls_attn": "it ranks by the class token's attention, and the Qwen vision towers have no "
    "class token; visual_score='attn' ranks by the attention each token receives",
    "dominant_contextual": "its contextual tokens average several visual tokens, and such an "
    "average has no single 3-D (t, h, w) M-RoPE position to keep",
    "pool": "it averages 2x2 groups of tokens, which the tower's patch merger has already "
    "done once; the averages would have no single 3-D (t, h, w) M-RoPE position",
    "visionzip": "it is the exact VisionZip rule of LLaVA-1.5 (a CLIP tower with a class token, "
    "one 336 px crop); the Qwen vision towers have no class token",
    "prumerge": "it is the exact LLaVA-PruMerge rule of LLaVA-1.5 (class-token attention of a "
    "CLIP tower); the Qwen vision towers have no class token",
    "prumerge_plus": "it is the exact LLaVA-PruMerge+ rule of LLaVA-1.5 (class-token attention "
    "of a CLIP tower); the Qwen vision towers have no class token",
}
# the tower options of other families, refused here
_TOWER_OPTIONS = ("merge_r", "prune_keep", "prune_layers", "prune_score", "prune_fuse",
                  "prune_recycle", "prune_seed", "prop_attn", "trace_source")
_SUPPORTED = ("visual_keep", "visual_score", "visual_seed", "text_keep", "text_protect_last",
              "llm_layer", "llm_keep", "llm_renumber_positions", "temporal_keep",
              "temporal_threshold", "family")


def qwen_family(model: nn.Module) -> str | None:
    """``qwen2_5_vl``, ``qwen3_vl`` or None."""
    mro = class_path_in_mro(model)
    for path, name in _FAMILIES.items():
        if path in mro:
            return name
    return None


def inner_model(model: nn.Module) -> nn.Module:
    """The base model (``Qwen2_5_VLModel`` / ``Qwen3VLModel``): the one holding ``visual`` and
    ``language_model``."""
    return model if "visual" in model._modules else model.model


def is_base_model(model: nn.Module) -> bool:
    """True for a base model (no language-model head, no ``generate``)."""
    return inner_model(model) is model


def score_block(model: nn.Module) -> int:
    """Index of the vision block whose attention ``attn`` reads: Qwen2.5-VL's last
    full-attention block (``fullatt_block_indexes``; the others attend within windows),
    Qwen3-VL's last block (every block attends fully)."""
    visual = inner_model(model).visual
    full = getattr(visual, "fullatt_block_indexes", None)
    if full is None:
        return len(visual.blocks) - 1
    full = [i for i in full if 0 <= i < len(visual.blocks)]
    if not full:
        raise ValueError(
            "visual_score='attn' reads the attention of the vision tower's last "
            "full-attention block, but fullatt_block_indexes names none of its "
            f"{len(visual.blocks)} blocks; use visual_score 'text', 'diversity' or 'random'"
        )
    return max(full)


#: the oldest transformers whose Qwen-VL code the adapter follows (5.23 / 5.24 name the cache
#: argument of ``compute_3d_position_ids`` differently)
MIN_TRANSFORMERS = (5, 25)


def _check_structure(model: nn.Module) -> None:
    from ..hf_common import transformers_version

    installed = transformers_version()
    if tuple(int(p) for p in installed.split(".")[:2] if p.isdigit()) < MIN_TRANSFORMERS:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the Qwen-VL adapter needs transformers >= "
            f"{'.'.join(map(str, MIN_TRANSFORMERS))} (installed: {installed}): pip install "
            "-U 'transformers>=5.25'")
    inner = inner_model(model)
    visual = getattr(inner, "visual", None)
    lm = getattr(inner, "language_model", None)
    blocks = getattr(visual, "blocks", None)
    if blocks is None or getattr(lm, "layers", None) is None or not hasattr(visual, "merger"):
        raise UnsupportedModelError(
            f"{type(model).__name__}: expected a Qwen-VL base model with visual.blocks, "
            "visual.merger and language_model.layers"
        )
    attn = getattr(blocks[0], "attn", None)
    if not (hasattr(blocks[0], "norm1") and hasattr(attn, "qkv") and hasattr(attn, "num_heads")):
        raise UnsupportedModelError(
            f"{type(model).__name__}: expected vision blocks with norm1 and attn.qkv / num_heads"
        )


def check_qwen(model: nn.Module, config: ReductionConfig) -> None:
    """Raise unless ``model`` can run ``config`` (before anything is patched; FastV's own
    checks are :func:`~.llm.check_llm`)."""
    _check_structure(model)
    name = type(model).__name__
    tower = [n for n in _TOWER_OPTIONS if getattr(config, n) != getattr(ReductionConfig(), n)]
    if tower:
        raise ValueError(
            f"{', '.join(tower)} reduce tokens inside the vision tower, which {name} does not "
            "support: its tower packs every image's patches into one sequence (with windowed "
            "attention on Qwen2.5-VL) and its patch merger needs each 2x2 group of patches "
            "whole. Use visual_keep (reduction before the language model), text_keep or "
            "llm_layer / llm_keep"
        )
    other = [n for n in ReductionConfig.field_names()
             if n not in _SUPPORTED and n not in _TOWER_OPTIONS
             and n != "version" and getattr(config, n) != getattr(ReductionConfig(), n)]
    if other:
        raise ValueError(
            f"{', '.join(other)} not supported on {name}; use visual_keep, visual_score, "
            "visual_seed (reduction before the language model), text_keep, text_protect_last "
            "(prompt dropping), llm_layer, llm_keep (pruning inside it) and temporal_keep / "
            "temporal_threshold (videos)"
        )
    # (cls_attn is the default score: refused only when visual tokens are ranked)
    if config.visual_score in _REFUSED_SCORES and (
            not config.visual_is_identity or config.visual_score != "cls_attn"):
        raise ValueError(
            f"visual_score={config.visual_score!r} not supported on {name}: "
            f"{_REFUSED_SCORES[config.visual_score]}; use one of {list(SCORES)}"
        )
    if not config.has_visual_settings:
        raise ValueError(
            "give visual_keep (an int count or a float ratio in (0, 1] of each image's or "
            f"video's tokens), text_keep, llm_layer and llm_keep, or temporal_keep / "
            f"temporal_threshold (videos) to patch {name}"
        )
    if config.visual_keep is not None and config.visual_score == "attn":
        score_block(model)
