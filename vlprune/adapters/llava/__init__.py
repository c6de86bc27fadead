"""Hugging Face LLaVA-style models (transformers >= 5): fewer visual tokens reach the
language model, and fewer prompt tokens too.

Families: ``LlavaForConditionalGeneration`` (LLaVA-1.5), ``LlavaNextForConditionalGeneration``
(anyres: a base image, unpadded crops and row-end ``image_newline`` tokens),
``LlavaOnevisionForConditionalGeneration`` (SigLIP tower, ``anyres_max`` packing) and
``LlavaNextVideoForConditionalGeneration`` (images, and videos with temporal merging), and
their base models without the language-model head (``LlavaModel``, ``LlavaNextModel``,
``LlavaOnevisionModel``, ``LlavaNextVideoModel``: the same reductions in ``forward``, whose
``last_hidden_state`` then holds the shorter sequence); and InternVL
(``InternVLForConditionalGeneration``, ``InternVLModel``: tiles of pixel-shuffled tokens, one
ranking per image over all its tiles; see :mod:`.internvl`).

Reduction points, combinable:

* **before the LLM** (``visual_keep``/``visual_score``): each image keeps ``visual_keep`` of its
  projected tokens (a count, or a ratio of that image's tokens), and its placeholder span in
  the prompt shrinks to match. Scores per token come from the vision tower's feature layer
  (class-token attention, recomputed for that one query row from the layer's own projections;
  on a tower without a class token, and with ``attn``, the mean attention each token
  receives), from the prompt
  (``text``), or from the features (``diversity``, ``random``). On anyres images the per-crop
  scores are packed by the model's own ``pack_image_features`` (recorded during the forward),
  so they line up with the packed features; row-end ``image_newline`` tokens are kept first.
* **prompt dropping** (``text_keep``): droppable prompt tokens of a row with images are ranked
  by their best cosine similarity to the row's kept visual tokens.
* **inside the LLM** (``llm_layer``/``llm_keep``, FastV): see :mod:`.llm`.
* **inside the vision tower** (``merge_r``/``prune_*``, LLaVA-1.5): see :mod:`.tower`.
* **videos** (``temporal_keep``/``temporal_threshold``, NeXT-Video and OneVision): each video's
  frame tokens (``get_video_features``, reshaped to ``(1, frames, tokens, D)``; OneVision's
  trailing ``image_newline`` token set aside and kept) go through
  :func:`~vlprune.merging.temporal_merge`: tokens repeating the same place of the frame before
  merge into it, and the video's placeholder span shrinks to the merged count. Without temporal
  reduction, videos next to reduced images are encoded unchanged.

How it is wired (:mod:`.model`): the patched ``forward`` encodes the images itself
(``get_image_features``, once), selects the kept tokens, removes the dropped positions from ``input_ids``,
``attention_mask``, ``position_ids`` and ``labels`` with one keep mask (rows re-padded on the
side they were padded on, left when unknown) and calls upstream with ``mm_encoder_outputs``
holding the kept features. ``generate`` does the same rewrite once, then runs upstream
``generate`` on the shorter prompt (so the KV cache holds the shorter sequence) and returns the
caller's prompt followed by the generated tokens.

The package, one concern a module: :mod:`.detect` (families, token counts, checks),
:mod:`.encode` (the tower and projector run once, scores captured), :mod:`.select` (kept
tokens per image), :mod:`.rewrite` (placeholder spans, prompt dropping, the shorter
sequences), :mod:`.video` (temporal merging), :mod:`.model` (the patched ``forward`` /
``generate``), :mod:`.llm` (FastV), :mod:`.tower` (LLaVA-1.5 tower merging / pruning),
:mod:`.internvl` (InternVL's tiles, pixel-shuffled scores and refusals), :mod:`.parts` (the
base model of either kind); this module holds the adapter and its registration.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import ReductionConfig
from ..base import (
    Adapter,
    PatchContext,
    device_dtype,
    hf_image_input_size,
    register_adapter,
    swap_class,
)
from .detect import check_llava, encoder_layers, llava_family, vision_tokens, visual_keep_count
from .encode import install_captures
from .llm import FastVLayerMixin, FastVPoint, FastVRankLayerMixin, llm_layers
from .model import LlavaBaseMixin, LlavaMixin, LlavaPackBaseMixin
from .parts import inner_model, is_base_model
from .tower import llava_context, patch_llava_tower

__all__ = [
    "LlavaAdapter",
    "LlavaMixin",
    "check_llava",
    "llava_family",
    "vision_tokens",
    "visual_keep_count",
]


@register_adapter
class LlavaAdapter(Adapter):
    name = "hf_llava"
    supported = (
        "transformers>=5 LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, "
        "LlavaOnevisionForConditionalGeneration, LlavaNextVideoForConditionalGeneration, "
        "InternVLForConditionalGeneration and their base models (LlavaModel, LlavaNextModel, "
        "LlavaOnevisionModel, LlavaNextVideoModel, InternVLModel): "
        "visual tokens reduced before the language model (visual_keep) and inside it "
        "(llm_layer/llm_keep), prompt tokens dropped (text_keep), videos merged over time "
        "(temporal_keep/temporal_threshold; NeXT-Video, OneVision)"
    )

    def matches(self, model: nn.Module) -> bool:
        return llava_family(model) is not None

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        check_llava(model, config)

    def num_layers(self, model: nn.Module) -> int:
        return len(encoder_layers(model))

    def make_context(self, model: nn.Module, config: ReductionConfig) -> PatchContext:
        check_llava(model, config)
        return llava_context(model, config, self.name, self.num_layers(model))

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        if not is_base_model(model):
            mixin = LlavaMixin
        else:  # no generate; an anyres one also records its own pack_image_features calls
            mixin = LlavaPackBaseMixin if hasattr(model, "pack_image_features") else LlavaBaseMixin
        swap_class(model, mixin, ctx)
        model.__dict__["_vlprune"] = ctx
        patch_llava_tower(model, ctx)
        install_captures(model, ctx)
        cfg = ctx.config
        if cfg.llm_keep is None:
            return
        lm = inner_model(model).language_model
        state = FastVPoint(ctx, cfg.llm_layer, getattr(lm, "rotary_emb", None), visual_keep_count)
        model.__dict__["_vlprune_llm"] = state
        layers = llm_layers(model)
        # layer llm_layer - 1 ranks (its own attention, as FastV); llm_layer on run pruned
        swap_class(layers[cfg.llm_layer - 1], FastVRankLayerMixin, ctx, llm=state)
        for i, layer in enumerate(layers[cfg.llm_layer:]):
            swap_class(layer, FastVLayerMixin, ctx, llm=state, first=i == 0)

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        return hf_image_input_size(model.config.vision_config)

    def example_input(self, model, batch_size=1, input_size=None):
        """One image per row: a short text prefix, the image's placeholder span, a suffix
        (LLaVA-1.5 layout; anyres families get one base-size image each, InternVL one tile)."""
        device, dtype = device_dtype(model)
        size = input_size or self.default_input_size(model)
        n = vision_tokens(model)
        image_id = model.config.image_token_id
        vocab = model.config.text_config.vocab_size
        text = torch.randint(0, vocab, (batch_size, 8), device=device)
        text = torch.where(text == image_id, (text + 1) % vocab, text)
        pixels = torch.randn(batch_size, *size, device=device, dtype=dtype)
        out = {"pixel_values": pixels}
        if llava_family(model) not in ("llava", "internvl"):
            # anyres: one image of the crop size each; its token count (base image, crops,
            # row ends) is whatever the model's packing gives, so ask the model
            sizes = torch.tensor([list(size[1:])] * batch_size, device=device)
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            crops = image_size_to_num_patches(
                size[1:], model.config.image_grid_pinpoints, model.config.vision_config.image_size
            )
            out["pixel_values"] = torch.randn(batch_size, crops, *size, device=device, dtype=dtype)
            out["image_sizes"] = sizes
            with torch.no_grad():
                feats = inner_model(model).get_image_features(
                    pixel_values=out["pixel_values"][:1], image_sizes=sizes[:1], return_dict=True
                ).pooler_output
            n = feats[0].shape[0]
        image = torch.full((batch_size, n), image_id, device=device)
        out["input_ids"] = torch.cat([text[:, :3], image, text[:, 3:]], dim=1)
        return out

