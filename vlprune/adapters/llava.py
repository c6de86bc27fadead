"""Hugging Face LLaVA (``LlavaForConditionalGeneration``): "before the LLM" visual token
reduction.

Each image keeps ``visual_keep`` of its projected visual tokens (ranked by ``visual_score``,
kept in their original order) and the prompt's image placeholder span shrinks to match, so
the language model runs on a shorter sequence at prefill and every decode step.

How it is wired (transformers >= 5):

* ``forward`` with ``pixel_values``: the patched model computes the image features itself
  (``model.get_image_features``; a temporary hook on the vision layer at
  ``vision_feature_layer`` captures its input when the score is ``cls_attn``), selects the
  tokens, removes the dropped placeholder positions from ``input_ids``, ``attention_mask``,
  ``position_ids`` and ``labels`` (rows re-padded on the side they were padded on, left when
  unknown) and calls upstream with ``mm_encoder_outputs`` holding the kept features, so the
  vision tower runs once.
* ``generate`` with ``pixel_values``: the same rewrite once, then upstream ``generate`` with
  the shorter prompt and ``mm_encoder_outputs``; generate forwards ``mm_encoder_outputs`` at
  prefill only, so the KV cache holds the shorter sequence. The returned sequences start with
  the caller's original prompt, followed by the generated tokens, as without patching.
* ``llm_layer``/``llm_keep`` (FastV, :mod:`vlprune.adapters.llava_llm`): the decoder layers
  from ``llm_layer`` on are patched; a forward with an empty cache is a prefill whose image
  placeholder positions (after the rewrite above) the root hands to them. A patched
  ``forward`` then returns logits for the kept positions only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ReductionConfig
from ..core.plan import take_tokens
from ..core.scores import diversity_order
from .base import (
    Adapter,
    LayerRecord,
    PatchContext,
    RootMixin,
    UnsupportedModelError,
    class_path_in_mro,
    device_dtype,
    hf_image_input_size,
    register_adapter,
    swap_class,
)
from .llava_llm import FastVLayerMixin, LLMState, check_decoder_layers

_LLAVA = "transformers.models.llava.modeling_llava.LlavaForConditionalGeneration"
_GEN_VISION_KEYS = ("vision_feature_layer", "vision_feature_select_strategy")


def _vision_tokens(model: nn.Module, strategy: str | None = None) -> int:
    """Projected tokens one image gives (patch grid, plus the class token for ``full``)."""
    vcfg = model.config.vision_config
    _, h, w = hf_image_input_size(vcfg)
    n = (h // vcfg.patch_size) * (w // vcfg.patch_size)
    strategy = strategy or model.config.vision_feature_select_strategy
    return n + (1 if strategy == "full" else 0)


def visual_keep_count(keep: int | float, num_tokens: int) -> int:
    """Tokens one image keeps: an int count as is, a ratio as ``ceil(ratio * n)`` (>= 1)."""
    if isinstance(keep, float):
        return min(num_tokens, max(1, math.ceil(keep * num_tokens)))
    if keep > num_tokens:
        raise ValueError(f"visual_keep={keep} but an image gives only {num_tokens} visual tokens")
    return keep


def _encoder_layers(model: nn.Module):
    """The vision tower's encoder layers (``encoder.layers``, or under ``vision_model``)."""
    tower = getattr(model.model, "vision_tower", None)
    inner = getattr(tower, "vision_model", tower)
    layers = getattr(getattr(inner, "encoder", None), "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"LLaVA with a {type(tower).__name__} vision tower: expected a CLIP-like tower with "
            "encoder.layers"
        )
    return layers


def _feature_layer_index(layer: int, num_layers: int) -> int:
    """The encoder layer whose output is ``hidden_states[layer]`` (-1: the embeddings)."""
    idx = layer % (num_layers + 1) if layer < 0 else layer
    return idx - 1


def _cls_attention(layer: nn.Module, x: Tensor) -> Tensor:
    """Class-token attention to every token (B, N), heads averaged, recomputed from the
    layer's own pre-norm and q/k projections (CLIP-style encoder layer)."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    B, N, _ = h.shape
    H = attn.num_heads
    q = attn.q_proj(h[:, :1]).view(B, 1, H, -1).transpose(1, 2)
    k = attn.k_proj(h).view(B, N, H, -1).transpose(1, 2)
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    a = ((q.float() * scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)  # (B, H, 1, N)
    return a[:, :, 0].mean(dim=1)


class _LlavaMixin(RootMixin):
    """``LlavaForConditionalGeneration`` that feeds its language model fewer visual tokens."""

    def _vlprune_active(self) -> bool:
        ctx: PatchContext = self._vlprune
        return ctx.enabled and not ctx.config.visual_is_identity

    def _vlprune_llm_active(self) -> bool:
        ctx: PatchContext = self._vlprune
        return ctx.enabled and not ctx.config.llm_is_identity

    def _vlprune_llm_begin(self, input_ids, attention_mask, past_key_values, strategy) -> None:
        """Arm (prefill: empty cache) or keep (decode step) the pruning inside the LLM."""
        st: LLMState = self.__dict__["_vlprune_llm"]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past:
            return
        if input_ids is None:
            st.reset()
            return
        cfg = self._vlprune.config
        n = _vision_tokens(self, strategy)
        per_image = n if cfg.visual_is_identity else visual_keep_count(cfg.visual_keep, n)
        st.begin(input_ids, attention_mask, self.config.image_token_id, per_image)

    # -- selection -------------------------------------------------------------------------

    def _vlprune_features(self, pixel_values, vision_feature_layer, strategy, image_sizes):
        """Kept projected features (I, K, D) of every image, in original order."""
        ctx: PatchContext = self._vlprune
        cfg = ctx.config
        mcfg = self.config
        layer = mcfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = mcfg.vision_feature_select_strategy if strategy is None else strategy
        if image_sizes is not None:
            raise ValueError("visual_keep does not support image_sizes (per-image sizes) yet")
        score = cfg.visual_score
        captured: dict[str, Tensor] = {}
        handle = None
        if score == "cls_attn":
            if not isinstance(layer, int):
                raise ValueError(
                    "visual_score='cls_attn' needs one vision_feature_layer, got a list "
                    f"{list(layer)}; use another visual_score"
                )
            layers = _encoder_layers(self)
            idx = _feature_layer_index(layer, len(layers))
            if idx < 0:
                raise ValueError("visual_score='cls_attn' needs a feature layer after the embeddings")

            def hook(module, args, kwargs):
                captured["x"] = args[0] if args else kwargs["hidden_states"]

            handle = layers[idx].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            out = self.model.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, return_dict=True,
            )
        finally:
            if handle is not None:
                handle.remove()
        feats = torch.stack(list(out.pooler_output))  # (I, N, D)
        n_img, N, D = feats.shape
        K = visual_keep_count(cfg.visual_keep, N)
        if score == "pool":
            side = math.isqrt(N)
            if strategy != "default" or side * side != N or side % 2:
                raise ValueError(
                    f"visual_score='pool' needs an even square patch grid without the class token "
                    f"(vision_feature_select_strategy='default'); got {N} tokens per image"
                )
            if K != N // 4:
                raise ValueError(
                    f"visual_score='pool' averages 2x2 patches: visual_keep must be {N // 4} "
                    f"(or 0.25) for {N} tokens per image, got {cfg.visual_keep!r}"
                )
            grid = feats.view(n_img, side, side, D).permute(0, 3, 1, 2)
            kept = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
        else:
            if score == "cls_attn":
                s = _cls_attention(layers[idx], captured["x"])  # (I, 1 + patches)
                s = s[:, 1:] if strategy == "default" else s
            elif score == "random":
                # one seeded draw of patch positions, the same for every image, so an
                # image's choice does not depend on its place in the batch
                gen = torch.Generator().manual_seed(cfg.visual_seed)
                s = torch.rand(1, N, generator=gen).to(feats.device).expand(n_img, N)
            else:  # diversity
                s = diversity_order(feats, 0, picks=K)
            index = s.topk(K, dim=1).indices.sort(dim=1).values
            kept = take_tokens(feats, index)
        if ctx.record is not None:
            ctx.record.append(LayerRecord(0, N, K, 0, None, "visual"))
        return kept.contiguous()

    def _vlprune_rewrite(self, input_ids, kept_per_image: int, num_tokens: int, **seqs):
        """Drop placeholder positions so each image's span holds ``kept_per_image`` tokens.

        ``seqs`` are (B, L) tensors aligned with ``input_ids`` (attention_mask, position_ids,
        labels); returns the new ``input_ids`` and the rewritten ``seqs`` (attention_mask is
        created when rows end up of different lengths)."""
        image_id = self.config.image_token_id
        is_image = input_ids == image_id
        total = int(is_image.sum())
        if total % num_tokens:
            raise ValueError(
                f"input_ids hold {total} image tokens, not a multiple of the {num_tokens} tokens "
                "one image gives; expand each image placeholder to its full span (the processor "
                "does) before a patched forward"
            )
        # the j-th image token of the flattened batch belongs to image j // N, slot j % N
        slot = torch.zeros_like(input_ids)
        slot[is_image] = torch.arange(total, device=input_ids.device) % num_tokens
        keep = ~is_image | (slot < kept_per_image)
        lengths = keep.sum(dim=1)
        L = int(lengths.max())
        mask = seqs.get("attention_mask")
        right = mask is not None and bool((mask[:, -1] == 0).any()) and not bool((mask[:, 0] == 0).any())
        if mask is None and bool((lengths != L).any()):
            mask = torch.ones_like(input_ids)
            seqs["attention_mask"] = mask
        pad_id = self.config.text_config.pad_token_id
        if pad_id is None or pad_id == image_id:
            pad_id = 0 if image_id != 0 else 1
        fills = {"input_ids": pad_id, "attention_mask": 0, "position_ids": 0, "labels": -100}
        out = {}
        for name, t in {"input_ids": input_ids, **seqs}.items():
            if t is None:
                out[name] = None
                continue
            new = torch.full((t.shape[0], L), fills[name], dtype=t.dtype, device=t.device)
            for b in range(t.shape[0]):
                row = t[b][keep[b]]
                if right:
                    new[b, : row.shape[0]] = row
                else:
                    new[b, L - row.shape[0]:] = row
            out[name] = new
        return out

    def _vlprune_prepare(self, input_ids, pixel_values, attention_mask=None, position_ids=None,
                         labels=None, vision_feature_layer=None, vision_feature_select_strategy=None,
                         image_sizes=None):
        if input_ids is None:
            raise ValueError(
                "visual_keep needs input_ids (to find the image placeholders); got inputs_embeds"
            )
        kept = self._vlprune_features(
            pixel_values, vision_feature_layer, vision_feature_select_strategy, image_sizes
        )
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        n = _vision_tokens(self, strategy)
        if kept.shape[0] and int((input_ids == self.config.image_token_id).sum()) != kept.shape[0] * n:
            raise ValueError(
                f"input_ids hold {int((input_ids == self.config.image_token_id).sum())} image tokens "
                f"for {kept.shape[0]} images of {n} tokens each"
            )
        seqs = self._vlprune_rewrite(
            input_ids, kept.shape[1], n, attention_mask=attention_mask, position_ids=position_ids,
            labels=labels,
        )
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        seqs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(kept))}
        return seqs

    # -- entry points ----------------------------------------------------------------------

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, vision_feature_layer=None,
                vision_feature_select_strategy=None, labels=None, logits_to_keep=0,
                image_sizes=None, mm_encoder_outputs=None, **kwargs):
        if pixel_values is not None and self._vlprune_active():
            if inputs_embeds is not None:
                raise ValueError("visual_keep needs input_ids (to find the image placeholders), "
                                 "not inputs_embeds")
            seqs = self._vlprune_prepare(
                input_ids, pixel_values, attention_mask, position_ids, labels,
                vision_feature_layer, vision_feature_select_strategy, image_sizes,
            )
            input_ids, attention_mask = seqs["input_ids"], seqs["attention_mask"]
            position_ids, labels = seqs["position_ids"], seqs["labels"]
            mm_encoder_outputs, pixel_values = seqs["mm_encoder_outputs"], None
        llm = "_vlprune_llm" in self.__dict__
        cfg = self._vlprune.config
        if cfg.llm_keep is not None and (not llm or self.__dict__["_vlprune_llm"].layer != cfg.llm_layer):
            raise ValueError(
                "llm_layer (or turning llm_keep on) cannot be changed by configure(): the decoder "
                "layers are patched at patch time; call vlprune.patch() again"
            )
        if llm:
            st: LLMState = self.__dict__["_vlprune_llm"]
            if not self._vlprune_llm_active():
                st.reset()
            else:
                if labels is not None:
                    raise ValueError(
                        "llm_keep drops visual tokens inside the language model, so the logits "
                        "no longer line up with labels; compute the loss unpatched or without llm_keep"
                    )
                self._vlprune_llm_begin(
                    input_ids, attention_mask, past_key_values,
                    vision_feature_select_strategy or self.config.vision_feature_select_strategy,
                )
        try:
            return super().forward(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                position_ids=position_ids, past_key_values=past_key_values,
                inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy, labels=labels,
                logits_to_keep=logits_to_keep, image_sizes=image_sizes,
                mm_encoder_outputs=mm_encoder_outputs, **kwargs,
            )
        finally:
            if llm:
                st.end()

    def generate(self, inputs=None, *args, **kwargs):
        if self.__dict__.get("_vlprune_llm") is not None and self._vlprune_llm_active():
            gen_cfg = kwargs.get("generation_config") or self.generation_config
            beams = kwargs.get("num_beams", getattr(gen_cfg, "num_beams", 1)) or 1
            if beams > 1:
                raise ValueError(
                    "llm_keep keeps per-row kept-token maps for the pruned cache layers, which beam "
                    "search would reorder; use num_beams=1"
                )
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None or not self._vlprune_active():
            return super().generate(inputs, *args, **kwargs)
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("visual_keep needs input_ids (to find the image placeholders)")
        if kwargs.get("mm_encoder_outputs") is not None:
            raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
        kwargs.pop("pixel_values")
        with torch.no_grad():
            seqs = self._vlprune_prepare(
                input_ids, pixel_values, kwargs.pop("attention_mask", None),
                kwargs.pop("position_ids", None), None,
                *(kwargs.pop(k, None) for k in _GEN_VISION_KEYS), kwargs.pop("image_sizes", None),
            )
        new_ids = seqs["input_ids"]
        for name in ("attention_mask", "position_ids"):
            if seqs[name] is not None:
                kwargs[name] = seqs[name]
        kwargs["mm_encoder_outputs"] = seqs["mm_encoder_outputs"]
        out = super().generate(new_ids, *args, **kwargs)
        # give back the caller's prompt, followed by what was generated
        seq = out if isinstance(out, Tensor) else out.sequences
        n_ret = seq.shape[0] // input_ids.shape[0]
        prompt = input_ids.repeat_interleave(n_ret, dim=0).to(seq.device)
        full = torch.cat([prompt, seq[:, new_ids.shape[1]:]], dim=1)
        if isinstance(out, Tensor):
            return full
        out.sequences = full
        return out


def _llm_layers(model: nn.Module):
    lm = getattr(model.model, "language_model", None)
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"llm_keep needs a decoder-only language model with .layers, got {type(lm).__name__}"
        )
    return layers


def check_llava(model: nn.Module, config: ReductionConfig) -> None:
    other = [
        n for n in ReductionConfig.field_names()
        if not n.startswith(("visual_", "llm_")) and n not in ("family", "prop_attn")
        and getattr(config, n) != getattr(ReductionConfig(), n)
    ]
    if other:
        raise ValueError(
            f"{', '.join(other)} not yet supported on LLaVA; use visual_keep, visual_score and "
            "visual_seed (reduction before the language model) and llm_layer, llm_keep (pruning "
            "inside it)"
        )
    if not config.has_visual_settings:
        raise ValueError(
            "give visual_keep (an int count or a float ratio in (0, 1]) or llm_layer and llm_keep "
            "to patch LLaVA"
        )
    if config.llm_keep is not None:
        layers = _llm_layers(model)
        if not 0 < config.llm_layer < len(layers):
            raise ValueError(
                f"llm_layer={config.llm_layer} out of range: the language model has "
                f"{len(layers)} decoder layers, give 1..{len(layers) - 1}"
            )
        check_decoder_layers(layers[config.llm_layer:])
        per_image = _vision_tokens(model)
        if config.visual_keep is not None:
            per_image = visual_keep_count(config.visual_keep, per_image)
        if isinstance(config.llm_keep, int) and config.llm_keep > per_image:
            raise ValueError(
                f"llm_keep={config.llm_keep} but each image enters the language model with only "
                f"{per_image} visual tokens"
            )
    if config.visual_keep is None:
        return
    layers = _encoder_layers(model)
    if config.visual_score == "cls_attn":
        layer = layers[0]
        attn = getattr(layer, "self_attn", None)
        if not (hasattr(layer, "layer_norm1") and all(
            hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads")
        )):
            raise UnsupportedModelError(
                "visual_score='cls_attn' needs CLIP-style encoder layers (layer_norm1, "
                "self_attn.q_proj/k_proj); use another visual_score"
            )
    n = _vision_tokens(model)
    if isinstance(config.visual_keep, int) and config.visual_keep > n:
        raise ValueError(f"visual_keep={config.visual_keep} but an image gives only {n} visual tokens")
    if config.visual_score == "pool":
        grid = _vision_tokens(model, "default")
        if model.config.vision_feature_select_strategy != "default" or math.isqrt(grid) ** 2 != grid:
            raise ValueError("visual_score='pool' needs a square patch grid without the class token")
        if visual_keep_count(config.visual_keep, n) != n // 4:
            raise ValueError(
                f"visual_score='pool' averages 2x2 patches: visual_keep must be {n // 4} (or 0.25) "
                f"for {n} tokens per image, got {config.visual_keep!r}"
            )


@register_adapter
class LlavaAdapter(Adapter):
    name = "hf_llava"
    supported = (
        "transformers>=5 LlavaForConditionalGeneration: visual tokens reduced before the "
        "language model (visual_keep)"
    )

    def matches(self, model: nn.Module) -> bool:
        return _LLAVA in class_path_in_mro(model)

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        check_llava(model, config)

    def num_layers(self, model: nn.Module) -> int:
        return len(_encoder_layers(model))

    def make_context(self, model: nn.Module, config: ReductionConfig) -> PatchContext:
        check_llava(model, config)
        return PatchContext(config=config, family=self.name, num_layers=self.num_layers(model))

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        swap_class(model, _LlavaMixin, ctx)
        model.__dict__["_vlprune"] = ctx
        cfg = ctx.config
        if cfg.llm_keep is None:
            return
        lm = model.model.language_model
        state = LLMState(
            cfg.llm_layer, lambda n: visual_keep_count(ctx.config.llm_keep, n),
            getattr(lm, "rotary_emb", None),
        )
        model.__dict__["_vlprune_llm"] = state
        for i, layer in enumerate(_llm_layers(model)[cfg.llm_layer:]):
            swap_class(layer, FastVLayerMixin, ctx, llm=state, first=i == 0)

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        return hf_image_input_size(model.config.vision_config)

    def example_input(self, model, batch_size=1, input_size=None):
        """One image per row: a short text prefix, the image's placeholder span, a suffix."""
        device, dtype = device_dtype(model)
        size = input_size or self.default_input_size(model)
        n = _vision_tokens(model)
        image_id = model.config.image_token_id
        vocab = model.config.text_config.vocab_size
        text = torch.randint(0, vocab, (batch_size, 8), device=device)
        text = torch.where(text == image_id, (text + 1) % vocab, text)
        image = torch.full((batch_size, n), image_id, device=device)
        ids = torch.cat([text[:, :3], image, text[:, 3:]], dim=1)
        return {
            "input_ids": ids,
            "pixel_values": torch.randn(batch_size, *size, device=device, dtype=dtype),
        }
