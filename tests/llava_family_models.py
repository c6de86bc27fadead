"""Tiny random LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video models and prompts laid out
as their processors lay them out (one placeholder per visual token, the count taken from the
model's own packing), for the family tests."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from vlprune.models import left_pad

IMAGE_ID, VIDEO_ID, PAD = 199, 198, 0
CROP = 32  # crop side in pixels: 4x4 patches of 8
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
FAMILIES = ("llava_next", "llava_onevision", "llava_next_video")


def _vision(siglip: bool):
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=CROP, patch_size=8)
    return SiglipVisionConfig(**kw) if siglip else CLIPVisionConfig(**kw)


def _text(qwen: bool):
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=200, pad_token_id=PAD, max_position_embeddings=512)
    return Qwen2Config(**kw) if qwen else LlamaConfig(**kw)


def build(family: str):
    torch.manual_seed(0)
    if family == "llava_next":
        cfg = LlavaNextConfig(vision_config=_vision(False), text_config=_text(False),
                              image_token_index=IMAGE_ID, image_grid_pinpoints=PINPOINTS)
        return LlavaNextForConditionalGeneration(cfg).eval()
    if family == "llava_onevision":
        cfg = LlavaOnevisionConfig(vision_config=_vision(True), text_config=_text(True),
                                   image_token_index=IMAGE_ID, video_token_index=VIDEO_ID,
                                   image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                                   vision_feature_select_strategy="full")
        return LlavaOnevisionForConditionalGeneration(cfg).eval()
    if family == "llava_next_video":
        cfg = LlavaNextVideoConfig(vision_config=_vision(False), text_config=_text(False),
                                   image_token_index=IMAGE_ID, video_token_index=VIDEO_ID,
                                   image_grid_pinpoints=PINPOINTS, spatial_pool_stride=2)
        return LlavaNextVideoForConditionalGeneration(cfg).eval()
    raise ValueError(family)


def _image(size: tuple[int, int], seed: int) -> torch.Tensor:
    """One image's crops (max 5: base + 2x2) as the processor stacks them."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(5, 3, CROP, CROP, generator=g)


def image_tokens(model, sizes: list[tuple[int, int]], seeds: list[int]) -> list[int]:
    """Tokens each image gives in ``model`` (what its processor would expand to)."""
    if not sizes:
        return []
    pv = torch.stack([_image(s, i) for s, i in zip(sizes, seeds)])
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=pv, image_sizes=torch.tensor(sizes), return_dict=True
        ).pooler_output
    return [f.shape[0] for f in feats]


def prompt(model, row: dict) -> tuple[torch.Tensor, list]:
    """``row``: seed, before/after text lengths, images [(h, w, seed)]; returns its ids."""
    g = torch.Generator().manual_seed(100 + row["seed"])
    images = row.get("images", [])
    lens = image_tokens(model, [(h, w) for h, w, _ in images], [s for *_, s in images])
    parts = [torch.randint(1, VIDEO_ID, (row["before"],), generator=g)]
    for n in lens:
        parts += [torch.full((n,), IMAGE_ID), torch.randint(1, VIDEO_ID, (2,), generator=g)]
    parts.append(torch.randint(1, VIDEO_ID, (row["after"],), generator=g))
    return torch.cat(parts), images


def batch(model, rows: list[dict]) -> dict:
    """Left-padded prompts with their images (rows without images allowed)."""
    seqs, images = zip(*(prompt(model, r) for r in rows))
    ids, mask = left_pad(seqs, PAD)
    flat = [im for ims in images for im in ims]
    out = dict(input_ids=ids, attention_mask=mask)
    if flat:
        out["pixel_values"] = torch.stack([_image((h, w), s) for h, w, s in flat])
        out["image_sizes"] = torch.tensor([(h, w) for h, w, _ in flat])
    return out


def image_crops(size: tuple[int, int]) -> int:
    return image_size_to_num_patches(size, PINPOINTS, CROP)
