"""The patched Qwen-VL root: its ``forward`` and ``generate`` entry points.

Owns :class:`QwenVLBaseMixin` / :class:`QwenVLMixin` (swapped onto the root; the swapped
class shows upstream's ``forward`` signature, which ``generate`` reads) and the orchestration
of a call (:func:`prepare_call`): upstream's positions of the full prompt first
(:mod:`.positions`), then each modality encoded once (:mod:`.encode`), its kept tokens chosen
(:mod:`.select`), prompt tokens dropped (``text_keep``), and ``input_ids``,
``attention_mask``, ``labels``, ``mm_token_type_ids`` and the positions shortened with one keep
mask (:mod:`.rewrite`); upstream's forward then runs with ``mm_encoder_outputs`` holding the
kept features (and on Qwen3-VL the same tokens of every DeepStack feature, which upstream adds
at the kept placeholders) and the explicit kept positions.

``generate`` does the rewrite once on the caller's prompt, with upstream's generation
positions (``_prepare_position_ids_for_generation``: a text row, then the 3-D rows), and runs
upstream ``generate`` on the shorter prompt: each decode step continues from the last kept
position as upstream continues from the last prompt position (the last real token of every
row is always kept). It returns the caller's prompt followed by the generated tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..base import PatchContext, RootMixin, upstream_arguments
from ..llava.model import generate_rewritten
from ..llava.rewrite import span_rows, text_drop
from .detect import inner_model
from .encode import encode
from .llm import llm_begin
from .positions import full_positions, reduced_deltas
from .rewrite import placeholder_keep, shorten, text_embeds
from .select import select_tokens
from .video import merge_videos

_MODALITIES = (("image", "pixel_values", "image_grid_thw", "image_token_id"),
               ("video", "pixel_values_videos", "video_grid_thw", "video_token_id"))


def _rewrites(model: nn.Module, named: dict) -> bool:
    """True when the prompt of the call ``named`` changes: fewer visual tokens (images or
    videos), fewer prompt tokens, or videos merged over time."""
    ctx: PatchContext = model._vlprune
    cfg = ctx.config
    if not ctx.enabled:
        return False
    images, videos = _has(named.get("pixel_values")), _has(named.get("pixel_values_videos"))
    return ((images or videos) and not (cfg.visual_is_identity and cfg.text_keep_is_identity)
            or videos and not cfg.temporal_is_identity)


def _has(t: Tensor | None) -> bool:
    return t is not None and t.shape[0] > 0


def _cache_len(named: dict) -> int:
    cache = named.get("cache", named.get("past_key_values"))
    return 0 if cache is None else cache.get_seq_length()


def _pad_id(model: nn.Module) -> int:
    pad = model.config.text_config.pad_token_id
    specials = {model.config.image_token_id, model.config.video_token_id}
    if pad is None or pad in specials:
        pad = next(i for i in range(3) if i not in specials)
    return pad


def prepare_call(model: nn.Module, named: dict, positions: Tensor | None = None) -> Tensor:
    """Encode, select and rewrite the arguments ``named`` of a prefill in place (pixels out,
    ``mm_encoder_outputs`` and explicit ``position_ids`` in). ``positions``: the (3, B, L)
    positions of the full prompt, when the caller computed them (``generate``). Returns the
    keep mask (B, L)."""
    ctx: PatchContext = model._vlprune
    cfg = ctx.config
    input_ids = named.get("input_ids")
    if input_ids is None or named.get("inputs_embeds") is not None:
        raise ValueError("vlprune on a Qwen-VL model needs input_ids (to find the image and "
                         "video placeholders), not inputs_embeds")
    if named.get("mm_encoder_outputs"):
        raise ValueError("pass either pixel_values (pixel_values_videos) or mm_encoder_outputs, "
                         "not both")
    if _cache_len(named):
        raise ValueError("a reduced prefill needs an empty cache: vlprune shortens the prompt "
                         "that fills it (pass the images with the first forward)")
    deltas = None
    if positions is None:
        positions, deltas = full_positions(model, named)
    mask = named.get("attention_mask")
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    reduce = not cfg.visual_is_identity
    need_text = reduce and cfg.visual_score == "text" or not cfg.text_keep_is_identity
    mm, kept_feats, kept_rows = {}, [], []
    text_pos = embs = None
    for modality, px_key, grid_key, id_key in _MODALITIES:
        pixels = named.pop(px_key, None)
        if not _has(pixels):
            continue
        token_id = getattr(model.config, id_key)
        grid = named.get(grid_key)
        enc = encode(model, modality, pixels, grid, reduce and cfg.visual_score == "attn")
        places = None
        if modality == "video" and not cfg.temporal_is_identity:
            places = merge_videos(ctx, enc, grid)  # survivors: feats and their places
        rows = span_rows(input_ids, token_id, enc.lens, modality)
        if need_text and text_pos is None:
            text_pos, embs = text_embeds(model, input_ids, mask, set(range(input_ids.shape[0])))
        if reduce:
            idx = select_tokens(ctx, enc, [embs[r] if embs else None for r in rows], modality)
        else:
            idx = [torch.arange(f.shape[0], device=input_ids.device) for f in enc.feats]
        at = idx if places is None else [p[i] for p, i in zip(places, idx)]
        keep &= placeholder_keep(input_ids, token_id, enc.lens, at)
        out = enc.output
        out.pooler_output = [f[i].contiguous() for f, i in zip(enc.feats, idx)]
        if enc.deep is not None:  # DeepStack: the same tokens of every tower layer it adds
            out.deepstack_features = [[d[i].contiguous() for d, i in zip(layer, idx)]
                                      for layer in enc.deep]
        mm[modality] = out
        kept_feats += out.pooler_output
        kept_rows += rows
    if kept_feats and not cfg.text_keep_is_identity:
        keep &= ~text_drop(model, cfg, input_ids, mask, text_pos, kept_feats, kept_rows)
    # the last real token of every row stays: decode steps continue from its position
    B, L = input_ids.shape
    last = torch.full((B,), L - 1, device=keep.device)
    if mask is not None:
        last = (torch.arange(L, device=keep.device) * mask.bool()).argmax(dim=1)
    keep[torch.arange(B, device=keep.device), last] = True
    if mask is not None:  # padding goes too: rows are re-padded to the longest kept row
        keep &= mask.bool()
    seqs = {n: named.get(n) for n in ("attention_mask", "labels", "mm_token_type_ids") if n in named}
    seqs["position_ids"] = positions
    named.update(shorten(input_ids, keep, seqs, _pad_id(model)))
    named["mm_encoder_outputs"] = mm
    inner_model(model).rope_deltas = reduced_deltas(deltas, keep, mask)
    return keep


class QwenVLBaseMixin(RootMixin):
    """A Qwen-VL model that feeds its language model fewer visual (and prompt) tokens: its
    ``forward`` (a base model has nothing else to patch)."""

    def forward(self, *args, **kwargs):
        named = upstream_arguments(self, "forward", args, kwargs)
        cfg = self._vlprune.config
        llm = self.__dict__.get("_vlprune_llm")
        if cfg.llm_keep is not None and (llm is None or llm.layer != cfg.llm_layer):
            raise ValueError(
                "llm_layer (or turning llm_keep on) cannot be changed by configure(): the decoder "
                "layers are patched at patch time; call vlprune.patch() again"
            )
        if _rewrites(self, named):
            prepare_call(self, named)
        if llm is None:
            return super().forward(**named)
        st = llm_begin(self, named)
        try:
            return super().forward(**named)
        finally:
            st.end()


class QwenVLMixin(QwenVLBaseMixin):
    """A Qwen-VL with a language-model head (``*ForConditionalGeneration``): ``forward`` and
    ``generate``."""

    def generate(self, inputs=None, *args, **kwargs):
        llm = self.__dict__.get("_vlprune_llm")
        if llm is not None and self._vlprune.enabled and not self._vlprune.config.llm_is_identity:
            gen_cfg = kwargs.get("generation_config") or self.generation_config
            if (kwargs.get("num_beams", getattr(gen_cfg, "num_beams", 1)) or 1) > 1:
                raise ValueError(
                    "llm_keep keeps per-row kept-token maps for the pruned cache layers, which beam "
                    "search would reorder; use num_beams=1"
                )
        if not _rewrites(self, kwargs):
            return super().generate(inputs, *args, **kwargs)
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("vlprune on a Qwen-VL model needs input_ids (to find the image and "
                             "video placeholders)")
        named = dict(kwargs, input_ids=input_ids)
        if named.get("attention_mask") is None:
            named["attention_mask"] = self._vlprune_generation_mask(input_ids, kwargs)
        with torch.no_grad():
            if named.get("position_ids") is None:
                # upstream's generation positions of the full prompt: (text row, t, h, w rows)
                model_kwargs = {k: v for k, v in named.items() if k != "input_ids"}
                pos = self._prepare_position_ids_for_generation(input_ids, model_kwargs)
                deltas = inner_model(self).rope_deltas
                keep = prepare_call(self, named, positions=pos[1:])
                mask = named["attention_mask"]
                text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
                named["position_ids"] = torch.cat([text[None], named["position_ids"]], dim=0)
                # a later step without position_ids lands where it would after the full prompt
                inner_model(self).rope_deltas = reduced_deltas(deltas, keep,
                                                               model_kwargs["attention_mask"])
            else:
                prepare_call(self, named)
        return generate_rewritten(super().generate, input_ids, named, kwargs, args)

    def _vlprune_generation_mask(self, input_ids: Tensor, kwargs: dict) -> Tensor:
        """The attention mask upstream ``generate`` infers for a prompt given without one:
        padding where the pad token is (when it differs from EOS), else all ones."""
        gen_cfg = kwargs.get("generation_config") or self.generation_config
        pad = kwargs.get("pad_token_id", getattr(gen_cfg, "pad_token_id", None))
        eos = kwargs.get("eos_token_id", getattr(gen_cfg, "eos_token_id", None))
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        if pad is not None and pad not in eos and bool((input_ids == pad).any()):
            return (input_ids != pad).long()
        return torch.ones_like(input_ids)

