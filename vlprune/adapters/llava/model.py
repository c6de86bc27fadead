"""The patched LLaVA root: its ``forward`` and ``generate`` entry points.

Owns :class:`LlavaMixin` (the class swapped onto the root model; the swapped class shows
upstream's ``forward`` signature, which ``generate`` reads to route its arguments) and the
orchestration of a call (:func:`prepare_call`): encode the images once, select, merge videos over time, drop
prompt tokens, rewrite ``input_ids`` and the aligned sequences with one keep mask, and hand
the kept features to upstream as ``mm_encoder_outputs``. ``generate`` does the rewrite once,
runs upstream ``generate`` on the shorter prompt (so the KV cache holds the shorter sequence)
and returns the caller's prompt followed by the generated tokens. With FastV on, the forward
also arms the calling thread's :class:`~vlprune.adapters.llava.llm.FastVCall` at a prefill.

Nothing a call computes is kept on the model: the selection lives in the call's arguments,
FastV's kept columns in the call state of the thread.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..base import PatchContext, RootMixin, upstream_arguments
from .detect import ATTN_SCORES, llava_family, vision_tokens
from .encode import PackRouteMixin, encode_images, group_tiles, image_kwargs
from .internvl import image_runs, image_tiles, span_neighbours
from .rewrite import rewrite_sequences, span_keep, span_rows, text_drop, text_embeds
from .select import select_images
from .video import merge_videos, video_kwargs


def _rewrites(model: nn.Module) -> bool:
    """True when the prompt must change: fewer visual tokens (in the tower or after it) or
    fewer prompt tokens."""
    ctx: PatchContext = model._vlprune
    cfg = ctx.config
    tower = ctx.children.get("image") if ctx.children else None
    return ctx.enabled and (
        not (cfg.visual_is_identity and cfg.text_keep_is_identity)
        or (tower is not None and tower.reduces)
    )


def _video_rewrites(model: nn.Module) -> bool:
    """True when videos are merged over time (their placeholder spans shrink)."""
    return model._vlprune.enabled and not model._vlprune.config.temporal_is_identity


def _llm_active(model: nn.Module) -> bool:
    return model._vlprune.enabled and not model._vlprune.config.llm_is_identity


def prepare_call(model: nn.Module, named: dict) -> None:
    """Encode the images (and, with temporal reduction, the videos) of a call, select, and
    rewrite its arguments ``named`` in place (pixels and image arguments out,
    ``mm_encoder_outputs`` in)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    ctx: PatchContext = model._vlprune
    cfg = ctx.config
    input_ids = named.get("input_ids")
    if input_ids is None:
        raise ValueError(
            "vlprune on a LLaVA model needs input_ids (to find the image placeholders), not "
            "inputs_embeds"
        )
    mm = dict(named.get("mm_encoder_outputs") or {})
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    videos = named.get("pixel_values_videos")
    merge = videos is not None and videos.shape[0] > 0 and _video_rewrites(model)
    # the tower arguments images and videos share, before images take them
    vid_kwargs = video_kwargs(model, named) if merge else {}
    pixel_values = named.pop("pixel_values", None)
    kept, rows, positions = [], [], None
    mask = named.get("attention_mask")
    if pixel_values is not None and pixel_values.shape[0] > 0:
        img_kwargs = image_kwargs(model, named)
        need_attn = not cfg.visual_is_identity and cfg.visual_score in ATTN_SCORES
        enc = encode_images(model, pixel_values, img_kwargs, need_attn)
        internvl = llava_family(model) == "internvl"
        if internvl:  # per tile -> per image: one ranking over all of an image's tiles
            tiles = image_tiles(input_ids, model.config.image_token_id, enc.lens[0],
                                len(enc.feats))
            enc = group_tiles(enc, tiles)
        tower = ctx.children.get("image") if ctx.children else None
        if tower is not None and tower.reduces:
            # merged in the tower: the prompt still holds each image's full span
            strategy = img_kwargs.get("vision_feature_select_strategy")
            enc.lens = [vision_tokens(model, strategy)] * len(enc.feats)
        rows = span_rows(input_ids, model.config.image_token_id, enc.lens)
        need_text = ((cfg.visual_score == "text" and not cfg.visual_is_identity)
                     or not cfg.text_keep_is_identity)
        positions, embs = (text_embeds(model, input_ids, mask, rows) if need_text
                           else (None, None))
        if internvl and positions is not None:  # <img> / </img> around each image stay
            marks = span_neighbours(input_ids, model.config.image_token_id)
            positions = [p[~marks[b, p]] for b, p in enumerate(positions)]
        kept = select_images(ctx, enc, [embs[r] if embs else None for r in rows])
        keep &= span_keep(input_ids, model.config.image_token_id, enc.lens,
                          [k.shape[0] for k in kept])
        # InternVL's forward takes one tensor (it scatters numel() values), LLaVA's a list
        feats = torch.cat(kept)[None] if internvl else [k.contiguous() for k in kept]
        mm["image"] = BaseModelOutputWithPooling(pooler_output=feats)
    if merge:
        named.pop("pixel_values_videos")
        vids, lens = merge_videos(model, videos, vid_kwargs)
        video_id = model.config.video_token_id
        span_rows(input_ids, video_id, lens, "video")
        keep &= span_keep(input_ids, video_id, lens, [v.shape[0] for v in vids])
        # one (1, total, D) tensor: NeXT-Video iterates and flattens it, OneVision flattens it
        mm["video"] = BaseModelOutputWithPooling(pooler_output=torch.cat(vids)[None])
    if kept and not cfg.text_keep_is_identity:
        keep &= ~text_drop(model, cfg, input_ids, mask, positions, kept, rows)
    seqs = {n: named.get(n) for n in ("attention_mask", "position_ids", "labels") if n in named}
    named.update(rewrite_sequences(model, input_ids, keep, seqs))
    named["mm_encoder_outputs"] = mm
    if named.get("pixel_values_videos") is not None:
        # upstream refuses raw video pixels next to mm_encoder_outputs: encode the videos
        # (unchanged) the way generate does, so they ride along as features too
        prepare = getattr(model, "_prepare_multimodal_encoder_kwargs_for_generation", None)
        if prepare is None:  # a base model (no generate): the same preparation, from generate's
            from transformers.generation.utils import GenerationMixin

            prepare = GenerationMixin._prepare_multimodal_encoder_kwargs_for_generation.__get__(model)
        prepare(named)


def _llm_begin(model: nn.Module, named: dict) -> None:
    """Arm FastV for a prefill (a forward with an empty cache) of ``named``; a decode step
    keeps the prefill's selection."""
    st = model.__dict__["_vlprune_llm"].call()
    cache = named.get("cache", named.get("past_key_values"))
    if cache is not None and cache.get_seq_length():
        return  # a decode step: the prefill's selection stands
    input_ids = named.get("input_ids")
    mm = named.get("mm_encoder_outputs") or {}
    if input_ids is None or mm.get("image") is None:
        st.reset()
        return
    if llava_family(model) == "internvl":  # one run of image tokens per image, tiles joined
        lens = [n for runs in image_runs(input_ids, model.config.image_token_id) for n in runs]
    else:
        lens = [f.shape[0] for f in mm["image"].pooler_output]
    st.begin(input_ids, named.get("attention_mask"), model.config.image_token_id, lens)


def _refuse_both(named: dict, has_pixels: bool, has_videos: bool) -> None:
    """Pixels and precomputed encoder outputs of the same modality cannot come together."""
    mm = named.get("mm_encoder_outputs") or {}
    if (has_pixels and mm.get("image") is not None) or (has_videos and mm.get("video") is not None):
        raise ValueError("pass either pixel_values (pixel_values_videos) or mm_encoder_outputs, "
                         "not both")


class LlavaBaseMixin(RootMixin):
    """A LLaVA-style model that feeds its language model fewer visual (and prompt) tokens:
    its ``forward`` (a base model such as ``LlavaModel`` has nothing else to patch)."""

    def forward(self, *args, **kwargs):
        named = upstream_arguments(self, "forward", args, kwargs)
        cfg = self._vlprune.config
        llm = "_vlprune_llm" in self.__dict__
        if cfg.llm_keep is not None and (not llm or self.__dict__["_vlprune_llm"].layer != cfg.llm_layer):
            raise ValueError(
                "llm_layer (or turning llm_keep on) cannot be changed by configure(): the decoder "
                "layers are patched at patch time; call vlprune.patch() again"
            )
        pixels = named.get("pixel_values")
        has_pixels = pixels is not None and pixels.shape[0] > 0
        videos = named.get("pixel_values_videos")
        has_videos = videos is not None and videos.shape[0] > 0
        images_run = has_pixels and (_rewrites(self) or (llm and _llm_active(self)))
        if images_run or (has_videos and _video_rewrites(self)):
            if named.get("inputs_embeds") is not None:
                raise ValueError("vlprune on a LLaVA model needs input_ids (to find the image "
                                 "and video placeholders), not inputs_embeds")
            _refuse_both(named, has_pixels, has_videos)
            prepare_call(self, named)
        if llm:
            st = self.__dict__["_vlprune_llm"].call()
            if not _llm_active(self):
                st.reset()
            else:
                if named.get("labels") is not None:
                    raise ValueError(
                        "llm_keep drops visual tokens inside the language model, so the logits "
                        "no longer line up with labels; compute the loss unpatched or without llm_keep"
                    )
                _llm_begin(self, named)
        try:
            return super().forward(**named)
        finally:
            if llm:
                st.end()


class LlavaMixin(LlavaBaseMixin):
    """A LLaVA with a language-model head (``*ForConditionalGeneration``): ``forward`` and
    ``generate``."""

    def generate(self, inputs=None, *args, **kwargs):
        if self.__dict__.get("_vlprune_llm") is not None and _llm_active(self):
            gen_cfg = kwargs.get("generation_config") or self.generation_config
            beams = kwargs.get("num_beams", getattr(gen_cfg, "num_beams", 1)) or 1
            if beams > 1:
                raise ValueError(
                    "llm_keep keeps per-row kept-token maps for the pruned cache layers, which beam "
                    "search would reorder; use num_beams=1"
                )
        pixel_values = kwargs.get("pixel_values")
        videos = kwargs.get("pixel_values_videos")
        has_pixels = pixel_values is not None and pixel_values.shape[0] > 0
        has_videos = videos is not None and videos.shape[0] > 0
        if not ((has_pixels and _rewrites(self)) or (has_videos and _video_rewrites(self))):
            return super().generate(inputs, *args, **kwargs)
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("vlprune on a LLaVA model needs input_ids (to find the image and "
                             "video placeholders)")
        _refuse_both(kwargs, has_pixels, has_videos)
        named = dict(kwargs, input_ids=input_ids)
        with torch.no_grad():
            prepare_call(self, named)
        return generate_rewritten(super().generate, input_ids, named, kwargs, args)


def generate_rewritten(generate, input_ids: Tensor, named: dict, kwargs: dict, args: tuple):
    """Run upstream ``generate`` on the rewritten prompt (``named["input_ids"]`` and the other
    rewritten inputs; ``None`` values dropped unless the caller gave them in ``kwargs``) and
    give back the caller's prompt ``input_ids`` followed by what was generated (also in a
    ``generate`` output object, and per returned sequence with ``num_return_sequences``)."""
    new_ids = named.pop("input_ids")
    named = {k: v for k, v in named.items() if v is not None or k in kwargs}
    out = generate(new_ids, *args, **named)
    seq = out if isinstance(out, Tensor) else out.sequences
    n_ret = seq.shape[0] // input_ids.shape[0]
    prompt = input_ids.repeat_interleave(n_ret, dim=0).to(seq.device)
    full = torch.cat([prompt, seq[:, new_ids.shape[1]:]], dim=1)
    if isinstance(out, Tensor):
        return full
    out.sequences = full
    return out


class LlavaPackBaseMixin(LlavaBaseMixin, PackRouteMixin):
    """An anyres base model (``LlavaNextModel``, ...) patched as the root: its own
    ``pack_image_features`` calls are recorded as the inner model's are under a
    ``*ForConditionalGeneration`` (:func:`~vlprune.adapters.llava.encode.install_captures`)."""
