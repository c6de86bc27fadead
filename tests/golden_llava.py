"""A tiny LLaVA-1.5 around the fixed tower of the VisionZip / PruMerge golden files
(``benchmarks/fidelity/tiny_clip.py``), and what its patched forward hands the language model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(ROOT / "benchmarks" / "fidelity"))
import tiny_clip  # noqa: E402

IMAGE_ID = 199
N_PATCH = 576


def load(name: str) -> dict:
    np = pytest.importorskip("numpy")
    with np.load(GOLDEN / f"{name}.npz", allow_pickle=False) as z:
        data = {k: torch.from_numpy(z[k]) for k in z.files}
    data["meta"] = json.loads((GOLDEN / f"{name}.json").read_text())
    return data


def build_llava():
    """LlavaForConditionalGeneration (2 tiny Llama layers) whose vision tower is the seeded
    tower of the golden files; ``vision_feature_layer=-2``, ``"default"`` strategy."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**tiny_clip.CONFIG),
        text_config=LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=200, pad_token_id=0, max_position_embeddings=1024,
        ),
        image_token_index=IMAGE_ID, image_seq_length=N_PATCH,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    model.model.vision_tower.set_attn_implementation("eager")  # the references' attention
    tiny_clip.init_weights(model.model.vision_tower)
    return model


def prompts(n: int) -> dict:
    """``n`` rows: two text tokens, one image's 576 placeholders, two text tokens."""
    text = torch.arange(1, 5).repeat(n, 1) + torch.arange(n)[:, None]
    ids = torch.cat([text[:, :2], torch.full((n, N_PATCH), IMAGE_ID), text[:, 2:]], dim=1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def lm_visual_features(model, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The visual tokens each image hands the language model in a patched forward, and the
    rewritten ``input_ids`` the model core receives."""
    seen = {}

    def hook(module, args, kwargs):
        seen["mm"] = kwargs["mm_encoder_outputs"]["image"].pooler_output
        seen["ids"] = kwargs["input_ids"]

    handle = model.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**prompts(pixels.shape[0]), pixel_values=pixels)
    finally:
        handle.remove()
    return [t.float() for t in seen["mm"]], seen["ids"]


def tower_hidden(model, pixels: torch.Tensor):
    with torch.no_grad():
        return model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
