"""Hugging Face transformers 5.x text towers: ``CLIPTextModel``,
``CLIPTextModelWithProjection`` and ``SiglipTextModel`` (also as the ``text_model`` of a
``CLIPModel`` / ``SiglipModel``).

Owns the text tower's layout (:func:`text_layout`: CLIP causal, pooling the EOT token with
BOS protected; SigLIP bidirectional, pooling the last token), its check and patching
(:func:`check_hf_text_tower`, :func:`patch_hf_text_tower`), the patched tower
(:class:`TextTowerMixin`: when it reduces, the shared text path of
:mod:`vlprune.adapters.text` with the encoder layers and attention of :mod:`.layers`) and the
``hf_clip_text`` adapter (registered by :mod:`vlprune.adapters.hf_clip`).
"""

from __future__ import annotations

import importlib

from torch import Tensor, nn

from ...config import ReductionConfig
from ..base import (
    Adapter,
    PatchContext,
    RootMixin,
    UnsupportedModelError,
    class_path_in_mro,
    device_dtype,
    swap_class,
)
from ..hf_common import BIAS_IMPLEMENTATIONS
from ..text import TextLayout, random_ids, start_text
from .layers import (
    CLIP,
    SIGLIP,
    AttentionMixin,
    EncoderLayerMixin,
    check_encoder,
    inner_tower,
    take_cached,
    tower_family,
)

_TEXT_TOWERS = {
    f"{CLIP}.CLIPTextModel": (CLIP, "CLIP"),
    f"{SIGLIP}.SiglipTextModel": (SIGLIP, "Siglip"),
}
_TEXT_WITH_PROJECTION = (f"{CLIP}.CLIPTextModelWithProjection",)

TEXT_SUPPORTED = (
    "transformers>=5 CLIPTextModel, CLIPTextModelWithProjection, SiglipTextModel (also inside "
    "CLIPModel / SiglipModel) with the upstream encoder layers, eager or sdpa attention"
)


def text_tower(model: nn.Module) -> nn.Module:
    """The ``CLIPTextModel`` / ``SiglipTextModel`` that holds the encoder of ``model``."""
    return inner_tower(model, _TEXT_WITH_PROJECTION, "text_model")


def _text_upstream(tower: nn.Module) -> tuple[str, str]:
    return tower_family(tower, _TEXT_TOWERS, "text", TEXT_SUPPORTED)


def text_layout(tower: nn.Module) -> TextLayout:
    """CLIP: causal, pools the EOT (argmax of the ids for old configs whose eos id is 2, else
    the first ``eos_token_id``), BOS protected. SigLIP: bidirectional, pools the last token."""
    _, prefix = _text_upstream(tower)
    if prefix == "Siglip":
        return TextLayout(causal=False, pool="last", protect_first=False)
    eos = tower.eos_token_id
    return TextLayout(causal=True, pool="argmax" if eos == 2 else "eos", eos_id=eos)


def check_hf_text_tower(tower: nn.Module, config: ReductionConfig) -> None:
    """Raise unless :func:`patch_hf_text_tower` can patch ``tower`` for ``config`` (the text
    tower's own config, see :meth:`ReductionConfig.for_tower`)."""
    module_name, prefix = _text_upstream(tower)
    mod = importlib.import_module(module_name)
    check_encoder(tower, mod, prefix, "final_layer_norm", TEXT_SUPPORTED)
    impl = tower.config._attn_implementation
    if not config.is_identity and impl not in BIAS_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"a reduced text tower attends with a mask built from its token state, which the "
            f"{impl!r} attention implementation cannot take; use 'sdpa' or 'eager'"
        )
    if config.prune_fuse:
        raise ValueError("prune_fuse is not available in a text tower (padded sequences); use drop or prune_recycle")


def patch_hf_text_tower(tower: nn.Module, ctx: PatchContext) -> None:
    """Swap the classes of one CLIP / SigLIP text tower so it reduces tokens as ``ctx`` says."""
    module_name, _ = _text_upstream(tower)
    swap_class(tower, TextTowerMixin, ctx)
    for i, layer in enumerate(tower.encoder.layers):
        swap_class(layer, EncoderLayerMixin, ctx, layer=i)
        swap_class(layer.self_attn, AttentionMixin, ctx, upstream=module_name)


class TextTowerMixin(RootMixin):
    """Patched ``CLIPTextModel`` / ``SiglipTextModel``. When the tower reduces, follows their
    forward (transformers 5.23) on the shared text path (:mod:`vlprune.adapters.text`):
    ``last_hidden_state`` is the reduced sequence in canonical order (protected tokens first)
    and ``pooler_output`` the pooled token, as upstream."""

    @property
    def _vlprune(self) -> PatchContext:
        return self.__dict__["_vlprune_ctx"]

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, **kwargs):
        ctx: PatchContext = self._vlprune_ctx
        cached = take_cached(ctx, (input_ids, attention_mask))
        if cached is not None:
            return cached
        if not ctx.reduces:
            ctx.call.state = None
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        asked = [k for k in ("output_hidden_states", "output_attentions") if kwargs.get(k)]
        if asked:
            raise ValueError(
                f"{', '.join(asked)} is not available while the text tower reduces tokens; run "
                "inside `with vlprune.disabled(model):`"
            )
        if input_ids is None:
            raise ValueError("You have to specify input_ids")
        ids = input_ids.view(-1, input_ids.shape[-1])
        x = self.embeddings(input_ids=ids, position_ids=position_ids)
        padding = None if attention_mask is None else attention_mask.view(ids.shape).bool()
        x, slot = start_text(ctx, x, ids, text_layout(self), padding, training=self.training)
        for layer in self.encoder.layers:
            x = layer(x, None)  # each patched layer builds its mask from the token state
        x = self.final_layer_norm(x)
        pooled = x[:, slot]
        if hasattr(self, "head"):  # SigLIP's text head
            pooled = self.head(pooled)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)

    def _vlprune_project(self, x: Tensor) -> Tensor:
        x = self.final_layer_norm(x)
        return self.head(x) if hasattr(self, "head") else x


class HFClipTextAdapter(Adapter):
    """``hf_clip_text``: a CLIP / SigLIP text model (registered by the package)."""

    name = "hf_clip_text"
    supported = TEXT_SUPPORTED
    towers = ("text",)

    def matches(self, model: nn.Module) -> bool:
        paths = class_path_in_mro(model)
        return any(p in _TEXT_TOWERS or p in _TEXT_WITH_PROJECTION for p in paths)

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        check_hf_text_tower(text_tower(model), config.for_tower("text", False))

    def num_layers(self, model: nn.Module) -> int:
        return len(text_tower(model).encoder.layers)

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        tower = text_tower(model)
        text = ctx.children["text"]
        patch_hf_text_tower(tower, text)
        text.project = tower._vlprune_project
        model.__dict__["_vlprune"] = ctx

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        return (text_tower(model).config.max_position_embeddings,)

    def example_input(self, model, batch_size=1, input_size=None):
        tower = text_tower(model)
        length = (input_size or self.default_input_size(model))[0]
        device, _ = device_dtype(model)
        return random_ids(batch_size, length, tower.config.vocab_size, text_layout(tower), device)
