"""InternVL models (transformers' ``InternVLForConditionalGeneration``) with random weights,
built from configs without any download: what ``internvl:<shape>`` means for ``vlprune
bench`` / ``describe`` (dispatched by :data:`vlprune.models.VLM_BUILDERS`).

:data:`SHAPES` holds the widths of public checkpoints (``"internvl3-8b"``: InternViT-300M-448px
and a Qwen2.5-7B-shaped language model; ``"internvl3-1b"``: the same tower and a
Qwen2.5-0.5B-shaped one) and a ``"tiny"`` shape for tests. The language model is built
shallower (``llm_layers``) so that a prefill fits a CPU run; ``real_llm_layers`` records the
real depth. :func:`dummy_inputs` lays a left-padded batch out as the InternVL processor does:
``<img>``, the image's tiles' placeholder tokens, ``</img>`` (the ids just below
``image_token_id``, as in the InternVL3 tokenizer), and ``pixel_values`` of every tile.
"""

from __future__ import annotations

import torch

from .models import ModelBuildError, left_padded_prompts

__all__ = ["SHAPES", "build_internvl", "dummy_inputs"]

# InternViT-300M-448px: the tower of InternVL2.5 / InternVL3 up to 38B
_INTERNVIT_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096, image_size=448, patch_size=14,
                       layer_norm_eps=1e-6, norm_type="layer_norm", use_qk_norm=False,
                       use_mean_pooling=True, layer_scale_init_value=0.1)
_INTERNVL3_IDS = dict(image_token_id=151667)  # <img> 151665, </img> 151666, <IMG_CONTEXT>

SHAPES = {
    "internvl3-8b": dict(
        vision=_INTERNVIT_300M,
        text=dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                  intermediate_size=18944, vocab_size=151674, max_position_embeddings=32768,
                  rope_theta=1000000.0, pad_token_id=151643, tie_word_embeddings=False),
        ids=_INTERNVL3_IDS, llm_layers=4, real_llm_layers=28,
    ),
    "internvl3-1b": dict(
        vision=_INTERNVIT_300M,
        text=dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151674, max_position_embeddings=32768,
                  rope_theta=1000000.0, pad_token_id=151643, tie_word_embeddings=True),
        ids=_INTERNVL3_IDS, llm_layers=4, real_llm_layers=24,
    ),
    "tiny": dict(  # 56 px tiles of 8x8 patches: 16 tokens per tile after the pixel shuffle
        vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, image_size=56, patch_size=7),
        text=dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=256, max_position_embeddings=1024,
                  pad_token_id=0),
        ids=dict(image_token_id=255), llm_layers=2, real_llm_layers=2,
    ),
}


def build_internvl(shape: str, img_size: int | None = None, llm_layers: int | None = None,
                   vision_layers: int | None = None):
    """An ``InternVLForConditionalGeneration`` of a :data:`SHAPES` shape with random weights
    (the class token and position embeddings drawn too, which the library's initialisation
    leaves at zero). ``img_size``: the tile size (a multiple of twice the patch size);
    ``llm_layers`` / ``vision_layers``: the depths (default: the shape's ``llm_layers``, the
    tower's real depth)."""
    try:
        from transformers import (
            InternVLConfig,
            InternVLForConditionalGeneration,
            InternVLVisionConfig,
            Qwen2Config,
        )
    except ImportError as e:
        raise ModelBuildError("InternVL models need transformers: pip install 'vlprune[hf]'") from e
    if shape not in SHAPES:
        raise ModelBuildError(f"unknown internvl shape {shape!r}; known: {sorted(SHAPES)}")
    spec = SHAPES[shape]
    vision, text = dict(spec["vision"]), dict(spec["text"])
    if img_size is not None:
        unit = 2 * vision["patch_size"]  # the pixel shuffle folds 2x2 patches
        if img_size <= 0 or img_size % unit:
            raise ModelBuildError(
                f"image size {img_size} must be a positive multiple of 2 x patch_size = {unit}"
            )
        vision["image_size"] = img_size
    if vision_layers is not None:
        if vision_layers < 1:
            raise ModelBuildError("--vision-layers must be >= 1")
        vision["num_hidden_layers"] = vision_layers
    n_llm = spec["llm_layers"] if llm_layers is None else llm_layers
    if n_llm < 1:
        raise ModelBuildError("--llm-layers must be >= 1")
    text["num_hidden_layers"] = n_llm
    tie = text.pop("tie_word_embeddings", True)
    grid = vision["image_size"] // vision["patch_size"]
    cfg = InternVLConfig(
        vision_config=InternVLVisionConfig(**vision), text_config=Qwen2Config(**text),
        image_seq_length=(grid // 2) ** 2, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=tie, **spec["ids"],
    )
    model = InternVLForConditionalGeneration(cfg)
    emb = model.model.vision_tower.embeddings
    with torch.no_grad():
        std = cfg.vision_config.initializer_range
        emb.cls_token.normal_(std=std)
        if emb.position_embeddings is not None:
            emb.position_embeddings.normal_(std=std)
    return model


def dummy_inputs(model, batch_size: int, text_tokens: int, image_size: int | None = None,
                 seed: int = 0) -> dict:
    """A left-padded batch of ``batch_size`` prompts, one square ``image_size`` image each
    (default: one tile), tiled as the InternVL processor tiles a square image: ``(image_size //
    tile)**2`` crops, plus the thumbnail when there is more than one. Row ``b`` has
    ``text_tokens + b`` text tokens around ``<img>``, the image's placeholder tokens (tiles x
    tokens per tile) and ``</img>``, so the padding differs; ``attention_mask``;
    ``pixel_values`` ``(batch_size * tiles, 3, tile, tile)``."""
    cfg = model.config
    vc = cfg.vision_config
    tile = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
    patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
    size = image_size or tile
    if size <= 0 or size % tile:
        raise ValueError(f"image_size must be a positive multiple of the tile size {tile}")
    if batch_size < 1 or text_tokens < 2:
        raise ValueError("dummy_inputs needs batch_size >= 1 and text_tokens >= 2")
    crops = (size // tile) ** 2
    tiles = crops + (1 if crops > 1 else 0)
    per_tile = int(tile // patch * cfg.downsample_ratio) ** 2
    image_id = cfg.image_token_id
    start, end = image_id - 2, image_id - 1
    pad = cfg.text_config.pad_token_id or 0
    vocab = cfg.text_config.vocab_size
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    span = torch.cat([torch.tensor([start]), torch.full((tiles * per_tile,), image_id),
                      torch.tensor([end])])
    ids, mask = left_padded_prompts(batch_size, text_tokens, span, vocab, {image_id, start, end},
                                    pad, g)
    pixels = torch.randn(batch_size * tiles, vc.num_channels, tile, tile, generator=g)
    return dict(input_ids=ids.to(p.device), attention_mask=mask.to(p.device),
                pixel_values=pixels.to(p.device, p.dtype))
