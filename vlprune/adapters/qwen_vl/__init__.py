"""Hugging Face Qwen2.5-VL and Qwen3-VL (transformers >= 5): fewer visual tokens reach the
language model, and fewer prompt tokens too.

Classes: ``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration`` and
their base models ``Qwen2_5_VLModel``, ``Qwen3VLModel`` (``forward`` only; its
``last_hidden_state`` then holds the shorter sequence).

These models take images at their own resolution (``image_grid_thw``) and videos in temporal
patches (``video_grid_thw``); the vision tower (Qwen2.5-VL: windowed attention except in the
``fullatt_block_indexes`` blocks; Qwen3-VL: full attention, plus DeepStack features of some
tower layers added into the first LLM layers) ends in a 2x2 patch merger, with no class token.
The language model places every token with a 3-D (t, h, w) rotary position (M-RoPE).

Reduction points, combinable, with the option names and meanings of the LLaVA adapter:

* **before the LLM** (``visual_keep`` / ``visual_score``): each image, and each video, keeps
  ``visual_keep`` of its merged tokens (a count, or a ratio of that item's tokens). Scores:
  ``attn`` (the mean attention each token receives, what ``cls_attn`` falls back to on
  LLaVA towers without a class token; here in the tower's last full-attention block, summed
  over the 2x2 patches a merged token holds), ``text`` (the prompt), ``diversity``,
  ``random``. Every kept token stays at its own placeholder place and keeps upstream's 3-D
  position (:mod:`.positions`); on Qwen3-VL the same tokens of every DeepStack feature are
  kept.
* **prompt dropping** (``text_keep``): droppable prompt tokens of a row with images or videos
  are ranked by their best cosine similarity to the row's kept visual tokens; the kept ones
  keep their positions too.
* **inside the LLM** (``llm_layer`` / ``llm_keep``, FastV): see :mod:`.llm`.
* **videos** (``temporal_keep`` / ``temporal_threshold``): a video's tokens repeating the same
  place of the frame before merge into it (:mod:`.video`); the survivors keep their places.

Refused at ``patch()``: tower merging / pruning (``merge_r``, ``prune_*``: the tower packs all
patches of a batch into one sequence, windowed on Qwen2.5-VL, and its merger needs every 2x2
group); ``llm_renumber_positions`` (3-D positions); and the scores that make tokens with no
single position or need a class token (``cls_attn``: use ``attn``; ``dominant_contextual``,
``pool``, ``visionzip``, ``prumerge``, ``prumerge_plus``).

The package: :mod:`.detect` (families, checks), :mod:`.encode` (the tower once, the attention
score), :mod:`.select` (kept tokens), :mod:`.rewrite` (keep mask, shorter sequences),
:mod:`.positions` (upstream's M-RoPE positions, ``rope_deltas``), :mod:`.video` (temporal
merging), :mod:`.model` (the patched ``forward`` / ``generate``), :mod:`.llm` (FastV); this
module holds the adapter and its registration.
"""

from __future__ import annotations

from torch import nn

from ...config import ReductionConfig
from ..base import Adapter, PatchContext, register_adapter, swap_class
from .detect import check_qwen, inner_model, is_base_model, qwen_family
from .encode import install_captures
from .llm import check_llm, patch_llm
from .model import QwenVLBaseMixin, QwenVLMixin

__all__ = ["QwenVLAdapter", "check_qwen", "qwen_family"]


@register_adapter
class QwenVLAdapter(Adapter):
    name = "hf_qwen_vl"
    supported = (
        "transformers>=5 Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration and "
        "their base models (Qwen2_5_VLModel, Qwen3VLModel): visual tokens of images and videos "
        "reduced before the language model (visual_keep) with their M-RoPE positions kept, and "
        "inside it (llm_layer/llm_keep), prompt tokens dropped (text_keep), videos merged over "
        "time (temporal_keep/temporal_threshold)"
    )

    def matches(self, model: nn.Module) -> bool:
        return qwen_family(model) is not None

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        check_qwen(model, config)
        if config.llm_keep is not None:
            check_llm(model, config)

    def num_layers(self, model: nn.Module) -> int:
        return len(inner_model(model).visual.blocks)

    def make_context(self, model: nn.Module, config: ReductionConfig) -> PatchContext:
        self.check(model, config)
        return PatchContext(config=config, family=self.name, num_layers=self.num_layers(model))

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        swap_class(model, QwenVLBaseMixin if is_base_model(model) else QwenVLMixin, ctx)
        model.__dict__["_vlprune"] = ctx
        if ctx.config.visual_keep is not None and ctx.config.visual_score == "attn":
            install_captures(model, ctx)
        if ctx.config.llm_keep is not None:
            patch_llm(model, ctx)

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        from ...models_qwen import default_image_size

        size = default_image_size(model)
        return (model.config.vision_config.in_channels, size, size)

    def example_input(self, model, batch_size=1, input_size=None):
        """One image per row of ``input_size`` (square; default: the shape's size), prompts
        left-padded as the processor lays them out (:func:`vlprune.models_qwen.dummy_inputs`)."""
        from ...models_qwen import dummy_inputs

        size = (input_size or self.default_input_size(model))[-1]
        return dummy_inputs(model, batch_size, 8, size)
