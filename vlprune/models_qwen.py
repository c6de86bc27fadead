"""Qwen2.5-VL and Qwen3-VL models with random weights, built from configs without any
download: what ``qwen2.5-vl:<shape>`` and ``qwen3-vl:<shape>`` mean for ``vlprune bench`` /
``describe`` (dispatched by :data:`vlprune.models.VLM_BUILDERS`).

:data:`SHAPES` holds, per family, the widths of public checkpoints (``"7b"``: Qwen2.5-VL-7B;
``"8b"``: Qwen3-VL-8B) and a ``"tiny"`` shape for tests. The language model is built
shallower (``llm_layers``) so that a prefill fits a CPU run; ``real_llm_layers`` records the
real depth. :func:`dummy_inputs` builds a left-padded batch the way the processor lays it out
(``<vision_start>``, the image's placeholder span, ``<vision_end>``; flattened patches;
``image_grid_thw``; ``mm_token_type_ids``).
"""

from __future__ import annotations

import torch

from .models import ModelBuildError, left_padded_prompts

__all__ = ["SHAPES", "build_qwen2_5_vl", "build_qwen3_vl", "default_image_size", "dummy_inputs"]

# token ids of the tiny shapes (the real shapes use the configs' defaults)
_TINY_IDS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252,
                 vision_end_token_id=253)

SHAPES = {
    "qwen2.5-vl": {
        "7b": dict(
            vision=dict(hidden_size=1280, depth=32, num_heads=16, intermediate_size=3420,
                        patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                        out_hidden_size=3584, spatial_merge_size=2, temporal_patch_size=2),
            text=dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                      intermediate_size=18944, vocab_size=152064, max_position_embeddings=128000,
                      rope_parameters=dict(rope_type="default", rope_theta=1000000.0,
                                           mrope_section=[16, 24, 24])),
            ids={}, img_size=448, llm_layers=4, real_llm_layers=28,
        ),
        "tiny": dict(
            vision=dict(hidden_size=32, depth=2, num_heads=4, intermediate_size=64, patch_size=4,
                        window_size=16, fullatt_block_indexes=[1], out_hidden_size=32,
                        spatial_merge_size=2, temporal_patch_size=2),
            text=dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=256, max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                           mrope_section=[2, 1, 1])),
            ids=_TINY_IDS, img_size=16, llm_layers=2, real_llm_layers=2,
        ),
    },
    "qwen3-vl": {
        "8b": dict(
            vision=dict(hidden_size=1152, depth=27, num_heads=16, intermediate_size=4304,
                        patch_size=16, out_hidden_size=4096, spatial_merge_size=2,
                        temporal_patch_size=2, num_position_embeddings=2304,
                        deepstack_visual_indexes=[8, 16, 24]),
            text=dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=12288, vocab_size=151936,
                      max_position_embeddings=262144,
                      rope_parameters=dict(rope_type="default", rope_theta=5000000.0,
                                           mrope_section=[24, 20, 20], mrope_interleaved=True)),
            ids={}, img_size=448, llm_layers=4, real_llm_layers=36,
        ),
        "tiny": dict(
            vision=dict(hidden_size=32, depth=2, num_heads=4, intermediate_size=64, patch_size=4,
                        out_hidden_size=32, spatial_merge_size=2, temporal_patch_size=2,
                        num_position_embeddings=16, deepstack_visual_indexes=[0]),
            text=dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=64, vocab_size=256, max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                           mrope_section=[2, 1, 1], mrope_interleaved=True)),
            ids=_TINY_IDS, img_size=16, llm_layers=2, real_llm_layers=2,
        ),
    },
}


def _spec(family: str, shape: str, llm_layers: int | None, vision_layers: int | None) -> dict:
    shapes = SHAPES[family]
    if shape not in shapes:
        raise ModelBuildError(f"unknown {family} shape {shape!r}; known: {sorted(shapes)}")
    spec = shapes[shape]
    vision, text = dict(spec["vision"]), dict(spec["text"])
    n_llm = spec["llm_layers"] if llm_layers is None else llm_layers
    if n_llm < 1:
        raise ModelBuildError("--llm-layers must be >= 1")
    text["num_hidden_layers"] = n_llm
    if vision_layers is not None:
        if vision_layers < 1:
            raise ModelBuildError("--vision-layers must be >= 1")
        vision["depth"] = vision_layers
        # keep only the special layers that still exist; the last layer attends fully
        if "fullatt_block_indexes" in vision:
            full = [i for i in vision["fullatt_block_indexes"] if i < vision_layers]
            vision["fullatt_block_indexes"] = full or [vision_layers - 1]
        if "deepstack_visual_indexes" in vision:
            deep = [i for i in vision["deepstack_visual_indexes"] if i < vision_layers]
            vision["deepstack_visual_indexes"] = deep or [0]
    return dict(vision=vision, text=text, ids=spec["ids"])


def _check_img_size(img_size: int | None, vision: dict) -> None:
    unit = vision["patch_size"] * vision["spatial_merge_size"]
    if img_size is not None and (img_size <= 0 or img_size % unit):
        raise ModelBuildError(
            f"image size {img_size} must be a positive multiple of patch_size x spatial_merge_size "
            f"= {unit} for this shape"
        )


def build_qwen2_5_vl(shape: str, img_size: int | None = None, llm_layers: int | None = None,
                     vision_layers: int | None = None):
    """A ``Qwen2_5_VLForConditionalGeneration`` of a ``SHAPES["qwen2.5-vl"]`` shape, random
    weights. ``img_size`` only checks the size (images are dynamic: :func:`dummy_inputs`)."""
    try:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    except ImportError as e:
        raise ModelBuildError("Qwen2.5-VL models need transformers: pip install 'vlprune[hf]'") from e
    spec = _spec("qwen2.5-vl", shape, llm_layers, vision_layers)
    _check_img_size(img_size, spec["vision"])
    cfg = Qwen2_5_VLConfig(vision_config=spec["vision"], text_config=spec["text"], **spec["ids"])
    return Qwen2_5_VLForConditionalGeneration(cfg)


def build_qwen3_vl(shape: str, img_size: int | None = None, llm_layers: int | None = None,
                   vision_layers: int | None = None):
    """A ``Qwen3VLForConditionalGeneration`` of a ``SHAPES["qwen3-vl"]`` shape, random
    weights (DeepStack layers as the shape gives them)."""
    try:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    except ImportError as e:
        raise ModelBuildError("Qwen3-VL models need transformers: pip install 'vlprune[hf]'") from e
    spec = _spec("qwen3-vl", shape, llm_layers, vision_layers)
    _check_img_size(img_size, spec["vision"])
    cfg = Qwen3VLConfig(vision_config=spec["vision"], text_config=spec["text"], **spec["ids"])
    return Qwen3VLForConditionalGeneration(cfg)


def default_image_size(model) -> int:
    """The square image size of the :data:`SHAPES` shape ``model`` was built with (by its
    vision widths), else the smallest size of two merged tokens a side."""
    for family in SHAPES.values():
        for spec in family.values():
            v = spec["vision"]
            vc = model.config.vision_config
            if v["hidden_size"] == vc.hidden_size and v["patch_size"] == vc.patch_size:
                return spec["img_size"]
    return 2 * model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size


def dummy_inputs(model, batch_size: int, text_tokens: int, image_size: int | None = None,
                 seed: int = 0) -> dict:
    """A left-padded batch of ``batch_size`` prompts, one ``image_size`` square image each
    (rows ``b`` get ``text_tokens + b`` text tokens around the image, so the padding differs),
    laid out as the Qwen processors lay it out: ``input_ids`` with ``<vision_start>``, the
    image's placeholder span and ``<vision_end>``; ``attention_mask``; ``mm_token_type_ids``
    (1 at image placeholders); ``pixel_values`` as flattened patches
    ``(sum t*h*w, C * temporal_patch * patch * patch)``; ``image_grid_thw``."""
    cfg = model.config
    vc = cfg.vision_config
    size = image_size or default_image_size(model)
    unit = vc.patch_size * vc.spatial_merge_size
    if size % unit:
        raise ValueError(f"image_size must be a multiple of {unit} (patch_size x spatial_merge_size)")
    if batch_size < 1 or text_tokens < 2:
        raise ValueError("dummy_inputs needs batch_size >= 1 and text_tokens >= 2")
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    grid = size // vc.patch_size
    n_img = grid * grid // vc.spatial_merge_size ** 2
    specials = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                cfg.vision_end_token_id}
    pad = cfg.text_config.pad_token_id or 0
    span = torch.cat([torch.tensor([cfg.vision_start_token_id]),
                      torch.full((n_img,), cfg.image_token_id),
                      torch.tensor([cfg.vision_end_token_id])])
    ids, mask = left_padded_prompts(batch_size, text_tokens, span, cfg.text_config.vocab_size,
                                    specials, pad, g)
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pixels = torch.randn(batch_size * grid * grid, patch_dim, generator=g)
    return dict(
        input_ids=ids.to(p.device), attention_mask=mask.to(p.device),
        mm_token_type_ids=(ids == cfg.image_token_id).long().to(p.device),
        pixel_values=pixels.to(p.device, p.dtype),
        image_grid_thw=torch.tensor([[1, grid, grid]] * batch_size, device=p.device),
    )
