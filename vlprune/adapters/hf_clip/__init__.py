"""Hugging Face transformers 5.x CLIP and SigLIP: image towers, text towers, and the
two-tower ``CLIPModel`` / ``SiglipModel``.

The package: :mod:`.layers` (what both tower kinds share: family lookup, encoder check, the
patched encoder layer and attention), :mod:`.vision` (``CLIPVisionModel``,
``CLIPVisionModelWithProjection``, ``SiglipVisionModel`` and SigLIP's pooling head; also the
image tower of two-tower models and of LLaVA, :mod:`vlprune.adapters.llava.tower`),
:mod:`.text` (``CLIPTextModel``, ``CLIPTextModelWithProjection``, ``SiglipTextModel``). This
module holds the two-tower models: :class:`TwoTowerMixin` (with guidance and both inputs,
the guiding tower runs first; its pooled embeddings guide the other tower's pruning, and its
output is handed back, not recomputed, when upstream ``forward`` asks for it) and the
``hf_clip`` adapter. Importing it registers ``hf_clip_vision``, ``hf_clip_text`` and
``hf_clip``, in that order.

transformers is imported lazily: ``import vlprune`` does not need it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...config import ReductionConfig
from ..base import (
    Adapter,
    PatchContext,
    RootMixin,
    UnsupportedModelError,
    class_path_in_mro,
    device_dtype,
    hf_image_input_size,
    register_adapter,
    swap_class,
    upstream_arguments,
)
from ..call import scoped
from ..text import random_ids
from .layers import CLIP, SIGLIP
from .text import (
    TEXT_SUPPORTED,
    HFClipTextAdapter,
    TextTowerMixin,
    check_hf_text_tower,
    patch_hf_text_tower,
    text_layout,
    text_tower,
)
from .vision import (
    SUPPORTED,
    HFClipVisionAdapter,
    VisionTowerMixin,
    check_hf_vision_tower,
    patch_hf_vision_tower,
    vision_tower,
)

__all__ = [
    "SUPPORTED",
    "TEXT_SUPPORTED",
    "HFClipAdapter",
    "HFClipTextAdapter",
    "HFClipVisionAdapter",
    "TextTowerMixin",
    "TwoTowerMixin",
    "VisionTowerMixin",
    "check_hf_text_tower",
    "check_hf_vision_tower",
    "patch_hf_text_tower",
    "patch_hf_vision_tower",
    "text_layout",
    "text_tower",
    "vision_tower",
]

_TWO_TOWERS = (f"{CLIP}.CLIPModel", f"{SIGLIP}.SiglipModel")

# registered here, in this order (first match wins; errors list them in this order)
register_adapter(HFClipVisionAdapter)
register_adapter(HFClipTextAdapter)


class TwoTowerMixin(RootMixin):
    """Patched ``CLIPModel`` / ``SiglipModel``: with guidance and both inputs, the guiding tower
    runs first; its pooled embeddings guide the other tower's pruning and its output is handed
    back (not recomputed) when upstream ``forward`` asks for it."""

    def forward(self, *args, **kwargs):
        ctx: PatchContext = self._vlprune
        guided = next((c for c in ctx.children.values() if c.guided_by), None)
        if guided is None or not guided.reduces:
            return super().forward(*args, **kwargs)
        kwargs = upstream_arguments(self, "forward", args, kwargs) if args else kwargs
        input_ids, pixel_values = kwargs.pop("input_ids", None), kwargs.pop("pixel_values", None)
        attention_mask, position_ids = kwargs.pop("attention_mask", None), kwargs.pop("position_ids", None)
        if input_ids is None or pixel_values is None:
            return super().forward(input_ids=input_ids, pixel_values=pixel_values,
                                   attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        tower_kw = {k: v for k, v in kwargs.items() if k != "return_loss"}
        if guided.tower == "image":
            key = (input_ids, attention_mask)
            out = self.text_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, **tower_kw)
            embeds = out.pooler_output
            if hasattr(self, "text_projection"):
                embeds = self.text_projection(embeds)
            leader = ctx.children["text"]
        else:
            key = (pixel_values,)
            out = self.vision_model(pixel_values=pixel_values, **{
                k: v for k, v in tower_kw.items() if k == "interpolate_pos_encoding"})
            embeds = out.pooler_output
            if hasattr(self, "visual_projection"):
                embeds = self.visual_projection(embeds)
            leader = ctx.children["image"]
        # this call's guide and the leading tower's output, in this thread only
        with scoped([guided.key], "guide", embeds.detach()), \
                scoped([leader.key], "cached", [(key, out)]):
            return super().forward(input_ids=input_ids, pixel_values=pixel_values,
                                   attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    def _vlprune_project_text(self, x: Tensor) -> Tensor:
        x = self.text_model._vlprune_project(x)
        return self.text_projection(x) if hasattr(self, "text_projection") else x

    def _vlprune_project_image(self, x: Tensor) -> Tensor:
        x = self.vision_model.post_layernorm(x)
        if hasattr(self, "visual_projection"):
            return self.visual_projection(x)
        head = self.vision_model.head  # SigLIP: the pooling head applied to each token alone
        B, N, C = x.shape
        return head(x.reshape(B * N, 1, C)).reshape(B, N, -1)


@register_adapter
class HFClipAdapter(Adapter):
    name = "hf_clip"
    supported = (
        "transformers>=5 CLIPModel and SiglipModel: image and text towers as in hf_clip_vision "
        "and hf_clip_text, cross-modal guidance"
    )
    towers = ("image", "text")

    def matches(self, model: nn.Module) -> bool:
        return any(p in _TWO_TOWERS for p in class_path_in_mro(model))

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        check_hf_vision_tower(model.vision_model, config.for_tower("image", True), config.guide == "text")
        check_hf_text_tower(model.text_model, config.for_tower("text", True))
        if config.guide == "text" and not hasattr(model, "visual_projection") and not getattr(
            model.vision_model, "use_head", False
        ):
            raise UnsupportedModelError("guide='text' needs the image tower's head (visual_projection or a pooling head)")

    def num_layers(self, model: nn.Module) -> int:
        return self.tower_layers(model, "image") + self.tower_layers(model, "text")

    def tower_layers(self, model: nn.Module, tower: str) -> int:
        return len((model.vision_model if tower == "image" else model.text_model).encoder.layers)

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        image, text = ctx.children["image"], ctx.children["text"]
        swap_class(model, TwoTowerMixin, ctx)
        model.__dict__["_vlprune"] = ctx
        patch_hf_vision_tower(model.vision_model, image)
        patch_hf_text_tower(model.text_model, text)
        image.project = model._vlprune_project_image
        text.project = model._vlprune_project_text

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        return hf_image_input_size(model.vision_model.config)

    def example_input(self, model, batch_size=1, input_size=None):
        device, dtype = device_dtype(model)
        size = input_size or self.default_input_size(model)
        tower = model.text_model
        ids = random_ids(batch_size, tower.config.max_position_embeddings, tower.config.vocab_size,
                         text_layout(tower), device)
        return {
            "input_ids": ids,
            "pixel_values": torch.randn(batch_size, *size, device=device, dtype=dtype),
        }
