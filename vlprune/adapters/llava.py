"""Hugging Face LLaVA-style models (transformers >= 5): fewer visual tokens reach the
language model, and fewer prompt tokens too.

Families: ``LlavaForConditionalGeneration`` (LLaVA-1.5), ``LlavaNextForConditionalGeneration``
(anyres: a base image, unpadded crops and row-end ``image_newline`` tokens),
``LlavaOnevisionForConditionalGeneration`` (SigLIP tower, ``anyres_max`` packing) and
``LlavaNextVideoForConditionalGeneration`` (images, and videos with temporal merging).

Reduction points, combinable:

* **before the LLM** (``visual_keep``/``visual_score``): each image keeps ``visual_keep`` of its
  projected tokens (a count, or a ratio of that image's tokens), and its placeholder span in
  the prompt shrinks to match. Scores per token come from the vision tower's feature layer
  (class-token attention, recomputed for that one query row from the layer's own projections;
  on a tower without a class token, the mean attention each token receives), from the prompt
  (``text``), or from the features (``diversity``, ``random``). On anyres images the per-crop
  scores are packed by the model's own ``pack_image_features`` (recorded during the forward),
  so they line up with the packed features; row-end ``image_newline`` tokens are kept first.
* **prompt dropping** (``text_keep``): droppable prompt tokens of a row with images are ranked
  by their best cosine similarity to the row's kept visual tokens.
* **inside the LLM** (``llm_layer``/``llm_keep``, FastV): see :mod:`vlprune.adapters.llava_llm`.
* **videos** (``temporal_keep``/``temporal_threshold``, NeXT-Video and OneVision): each video's
  frame tokens (``get_video_features``, reshaped to ``(1, frames, tokens, D)``; OneVision's
  trailing ``image_newline`` token set aside and kept) go through
  :func:`~vlprune.merging.temporal_merge`: tokens repeating the same place of the frame before
  merge into it, and the video's placeholder span shrinks to the merged count. Without temporal
  reduction, videos next to reduced images are encoded unchanged.

How it is wired: the patched ``forward`` encodes the images itself (``get_image_features``,
once), selects the kept tokens, removes the dropped positions from ``input_ids``,
``attention_mask``, ``position_ids`` and ``labels`` with one keep mask (rows re-padded on the
side they were padded on, left when unknown) and calls upstream with ``mm_encoder_outputs``
holding the kept features. ``generate`` does the same rewrite once, then runs upstream
``generate`` on the shorter prompt (so the KV cache holds the shorter sequence) and returns the
caller's prompt followed by the generated tokens.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DEFAULT_TEXT_PROTECT_LAST, ReductionConfig
from ..core.select import count_of
from ..core.visual import (
    dominant_contextual,
    image_text_alignment,
    select_visual,
    text_attention_scores,
    visual_diversity_scores,
)
from ..merging.temporal import temporal_merge
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
from .llava_llm import FastVLayerMixin, FastVPoint, check_decoder_layers
from .llava_tower import (
    TOWER_OPTIONS,
    check_llava_tower,
    llava_context,
    patch_llava_tower,
    tower_requested,
    tower_tokens_per_image,
)

_FAMILIES = {
    "transformers.models.llava.modeling_llava.LlavaForConditionalGeneration": "llava",
    "transformers.models.llava_next.modeling_llava_next.LlavaNextForConditionalGeneration":
        "llava_next",
    "transformers.models.llava_onevision.modeling_llava_onevision."
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "transformers.models.llava_next_video.modeling_llava_next_video."
    "LlavaNextVideoForConditionalGeneration": "llava_next_video",
}
_ATTN_SCORES = ("cls_attn", "dominant_contextual")
_VIDEO_FAMILIES = ("llava_onevision", "llava_next_video")
_SEQ_FILLS = {"attention_mask": 0, "position_ids": 0, "labels": -100}


def llava_family(model: nn.Module) -> str | None:
    """``llava``, ``llava_next``, ``llava_onevision``, ``llava_next_video`` or None."""
    mro = class_path_in_mro(model)
    for path, name in _FAMILIES.items():
        if path in mro:
            return name
    return None


def vision_tokens(model: nn.Module, strategy: str | None = None) -> int:
    """Projected tokens of one crop (the patch grid, plus the class token for ``full``): the
    tokens of one LLaVA-1.5 image, the base image of an anyres one."""
    vcfg = model.config.vision_config
    _, h, w = hf_image_input_size(vcfg)
    n = (h // vcfg.patch_size) * (w // vcfg.patch_size)
    strategy = strategy or model.config.vision_feature_select_strategy
    return n + (1 if strategy == "full" else 0)


def visual_keep_count(keep: int | float, num_tokens: int, name: str = "visual_keep") -> int:
    """Tokens one image keeps: an int count as is, a ratio as ``ceil(ratio * n)`` (>= 1)."""
    return count_of(keep, num_tokens, name, "an image gives only {n} visual tokens")


def _vision_inner(model: nn.Module) -> nn.Module:
    tower = getattr(model.model, "vision_tower", None)
    return getattr(tower, "vision_model", tower)


def _encoder_layers(model: nn.Module):
    """The vision tower's encoder layers (``encoder.layers``, or under ``vision_model``)."""
    layers = getattr(getattr(_vision_inner(model), "encoder", None), "layers", None)
    if layers is None:
        tower = getattr(model.model, "vision_tower", None)
        raise UnsupportedModelError(
            f"LLaVA with a {type(tower).__name__} vision tower: expected a CLIP- or SigLIP-like "
            "tower with encoder.layers"
        )
    return layers


def _has_class_token(model: nn.Module) -> bool:
    emb = getattr(_vision_inner(model), "embeddings", None)
    return hasattr(emb, "class_embedding")


def _feature_layer_index(layer: int, num_layers: int) -> int:
    """The encoder layer whose output is ``hidden_states[layer]`` (-1: the embeddings)."""
    idx = layer % (num_layers + 1) if layer < 0 else layer
    return idx - 1


def _tower_attention(layer: nn.Module, x: Tensor, class_token: bool) -> Tensor:
    """Per-crop token scores (C, N) from the input ``x`` (C, N, D) of a CLIP/SigLIP encoder
    layer, heads averaged, recomputed from the layer's pre-norm and q/k projections: the class
    token's attention row, or (no class token) the mean attention each token receives."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    C, N, _ = h.shape
    H = attn.num_heads
    scale = getattr(attn, "scale", (h.shape[-1] // H) ** -0.5)
    k = attn.k_proj(h).view(C, N, H, -1).transpose(1, 2).float()
    if class_token:
        q = attn.q_proj(h[:, :1]).view(C, 1, H, -1).transpose(1, 2).float()
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0].mean(dim=1)
    out = []
    for c in range(C):  # one crop at a time: an (H, N, N) matrix, not (C, H, N, N)
        q = attn.q_proj(h[c]).view(N, H, -1).transpose(0, 1).float()
        out.append(((q * scale) @ k[c].transpose(-2, -1)).softmax(dim=-1).mean(dim=(0, 1)))
    return torch.stack(out)


def _special_ids(model: nn.Module) -> set[int]:
    """Token ids prompt dropping never drops: BOS/EOS/padding, image and video placeholders."""
    ids: set[int] = set()
    for cfg in (model.config, model.config.text_config, getattr(model, "generation_config", None)):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_id",
                     "video_token_id", "image_token_index", "video_token_index"):
            v = getattr(cfg, name, None)
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(i) for i in v)
    return ids


def _bind_forward(model: nn.Module, args, kwargs) -> dict:
    """Upstream ``forward``'s arguments by name (extra keyword arguments merged in)."""
    upstream = type(model).__bases__[-1].forward
    sig = inspect.signature(upstream)
    bound = sig.bind(model, *args, **kwargs).arguments
    named = {}
    for name, value in bound.items():
        param = sig.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif name != "self":
            named[name] = value
    return named


class _Encoded:
    """What one image-encoding pass gives: per image its projected tokens, their scores, the
    protected (row-end) tokens, and the tokens each image's placeholder span holds."""

    def __init__(self, feats: list[Tensor], scores: list[Tensor] | None,
                 protect: list[Tensor | None]):
        self.feats = feats
        self.scores = scores
        self.protect = protect
        self.lens = [f.shape[0] for f in feats]


class _LlavaMixin(RootMixin):
    """A LLaVA-style model that feeds its language model fewer visual (and prompt) tokens."""

    def _vlprune_cfg(self) -> ReductionConfig:
        return self._vlprune.config

    def _vlprune_rewrites(self) -> bool:
        """True when the prompt must change: fewer visual tokens (in the tower or after it) or
        fewer prompt tokens."""
        ctx: PatchContext = self._vlprune
        cfg = ctx.config
        tower = ctx.children.get("image") if ctx.children else None
        return ctx.enabled and (
            not (cfg.visual_is_identity and cfg.text_keep_is_identity)
            or (tower is not None and tower.reduces)
        )

    def _vlprune_video_rewrites(self) -> bool:
        """True when videos are merged over time (their placeholder spans shrink)."""
        return self._vlprune.enabled and not self._vlprune_cfg().temporal_is_identity

    def _vlprune_llm_active(self) -> bool:
        return self._vlprune.enabled and not self._vlprune_cfg().llm_is_identity

    # -- encoding and scoring ------------------------------------------------------------

    def _vlprune_image_kwargs(self, named: dict) -> dict:
        """The arguments of ``get_image_features`` besides the pixels, taken out of ``named``."""
        params = inspect.signature(self.model.get_image_features).parameters
        out = {}
        for name in params:
            if name not in ("pixel_values", "kwargs", "self") and name in named:
                value = named.pop(name)
                if value is not None:
                    out[name] = value
        return out

    def _vlprune_encode(self, pixel_values: Tensor, image_kwargs: dict, need_attn: bool) -> _Encoded:
        """Run the vision tower and projector once; record what scoring needs."""
        mcfg = self.config
        layer = image_kwargs.get("vision_feature_layer", mcfg.vision_feature_layer)
        strategy = image_kwargs.get("vision_feature_select_strategy",
                                    getattr(mcfg, "vision_feature_select_strategy", "default"))
        captured: dict[str, Tensor] = {}
        handle = None
        if need_attn:
            if not isinstance(layer, int):
                raise ValueError(
                    f"visual_score={self._vlprune_cfg().visual_score!r} reads the tower's attention "
                    f"at one vision_feature_layer, got a list {list(layer)}; use visual_score "
                    "'text', 'diversity' or 'random'"
                )
            layers = _encoder_layers(self)
            idx = _feature_layer_index(layer, len(layers))
            if idx < 0:
                raise ValueError("attention scores need a vision_feature_layer after the embeddings")

            def hook(module, args, kwargs):
                captured["x"] = args[0] if args else kwargs["hidden_states"]

            handle = layers[idx].register_forward_pre_hook(hook, with_kwargs=True)
        inner = self.model
        packs: list[tuple] = []
        pack = getattr(inner, "pack_image_features", None)
        if pack is not None:
            def record(*a, **kw):
                packs.append((a, kw))
                return pack(*a, **kw)

            inner.pack_image_features = record
        try:
            out = inner.get_image_features(pixel_values=pixel_values, **image_kwargs, return_dict=True)
        finally:
            if handle is not None:
                handle.remove()
            if pack is not None:
                del inner.pack_image_features
        feats = list(out.pooler_output)
        protect: list[Tensor | None] = [None] * len(feats)
        scores = None
        if packs:
            row_end = self._vlprune_pack(pack, packs[0], None, feats)
            protect = [r.bool() for r in row_end]
        if need_attn:
            crop = _tower_attention(layers[idx], captured["x"], _has_class_token(self))
            if strategy == "default" and _has_class_token(self):
                crop = crop[:, 1:]
            scores = self._vlprune_pack(pack, packs[0], crop, feats) if packs else list(crop)
        return _Encoded(feats, scores, protect)

    def _vlprune_pack(self, pack, call: tuple, per_crop: Tensor | None, feats) -> list[Tensor]:
        """Pack per-crop values (C, T) the way the recorded ``pack_image_features`` call packed
        the features; ``None`` packs zeros with ones at the row-end (``image_newline``) places."""
        a, kw = call
        sig = inspect.signature(pack)
        bound = sig.bind(*a, **kw)
        crops = bound.arguments["image_features"]
        counts = [c.shape[0] for c in crops]
        device = crops[0].device
        if per_crop is None:
            per_crop = torch.zeros(sum(counts), crops[0].shape[1], device=device)
            newline = torch.ones(1, device=device)
        else:
            newline = torch.full((1,), float("inf"), device=device)
        bound.arguments["image_features"] = list(per_crop.float()[..., None].split(counts))
        if "image_newline" in sig.parameters:
            bound.arguments["image_newline"] = newline
        packed, _ = pack(*bound.args, **bound.kwargs)
        packed = [p[:, 0] for p in packed]
        if [p.shape[0] for p in packed] != [f.shape[0] for f in feats]:
            raise RuntimeError("packed scores do not line up with the packed features")
        return packed

    def _vlprune_select(self, enc: _Encoded, texts: list[Tensor]) -> list[Tensor]:
        """The kept tokens of every image, ``texts[j]``: the prompt embeddings of image j's row."""
        ctx: PatchContext = self._vlprune
        cfg = ctx.config
        score = cfg.visual_score
        kept = []
        for j, f in enumerate(enc.feats):
            n = f.shape[0]
            prot = enc.protect[j]
            if cfg.visual_is_identity:
                kept.append(f)
                continue
            k = visual_keep_count(cfg.visual_keep, n)
            if score == "pool":
                kept.append(self._vlprune_pool(f, k))
                continue
            if score == "dominant_contextual":
                kept.append(dominant_contextual(f, enc.scores[j], k, cfg.visual_contextual, prot))
                continue
            if score == "cls_attn":
                s = enc.scores[j]
            elif score == "text":
                s = text_attention_scores(f, texts[j])
            elif score == "random":
                # seeded by position only, so an image's choice does not depend on its batch
                gen = torch.Generator().manual_seed(cfg.visual_seed)
                s = torch.rand(n, generator=gen).to(f.device)
            else:  # diversity
                s = visual_diversity_scores(f, k, prot)
            kept.append(f[select_visual(s, k, prot)])
        record = ctx.record
        if record is not None and enc.feats:
            record.append(LayerRecord(0, enc.lens[0], kept[0].shape[0], 0, None, "visual"))
        return kept

    def _vlprune_pool(self, f: Tensor, k: int) -> Tensor:
        n, D = f.shape
        side = math.isqrt(n)
        if side * side != n or side % 2:
            raise ValueError(
                f"visual_score='pool' needs an even square patch grid without the class token "
                f"(vision_feature_select_strategy='default'); got {n} tokens per image"
            )
        if k != n // 4:
            raise ValueError(
                f"visual_score='pool' averages 2x2 patches: visual_keep must be {n // 4} (or "
                f"0.25) for {n} tokens per image, got {self._vlprune_cfg().visual_keep!r}"
            )
        grid = f.view(side, side, D).permute(2, 0, 1)[None]
        return F.avg_pool2d(grid, 2)[0].flatten(1).T

    # -- the prompt rewrite --------------------------------------------------------------

    def _vlprune_span_rows(self, input_ids: Tensor, token_id: int, lens: list[int],
                           what: str = "image") -> list[int]:
        """The row of each image (or video): they fill the placeholder spans of ``token_id``
        row by row, ``lens[j]`` places each."""
        counts = (input_ids == token_id).sum(dim=1).tolist()
        if sum(counts) != sum(lens):
            raise ValueError(
                f"input_ids hold {sum(counts)} {what} tokens for {len(lens)} {what}s of "
                f"{sum(lens)} tokens ({lens}); expand each {what} placeholder to its full span "
                "(the processor does) before a patched forward"
            )
        rows, j = [], 0
        for b, c in enumerate(counts):
            while c > 0:
                rows.append(b)
                c -= lens[j]
                j += 1
            if c:
                raise ValueError(
                    f"row {b}'s {what} placeholders do not add up to whole {what}s ({lens} tokens)"
                )
        return rows

    @staticmethod
    def _vlprune_span_keep(input_ids: Tensor, token_id: int, lens: list[int],
                           n_kept: list[int]) -> Tensor:
        """(B, L) bool: ``False`` at the places of ``token_id`` spans that go. The j-th
        placeholder of the flattened batch belongs to span j (``lens[j]`` places), which keeps
        its first ``n_kept[j]`` places."""
        is_span = input_ids == token_id
        keep = torch.ones_like(is_span)
        if not lens:
            return keep
        dev = input_ids.device
        lens_t = torch.tensor(lens, device=dev)
        ends = lens_t.cumsum(0)
        flat = torch.arange(int(ends[-1]), device=dev)
        span = torch.searchsorted(ends, flat, right=True)
        keep[is_span.nonzero(as_tuple=True)] = (flat - (ends - lens_t)[span]) < torch.tensor(
            n_kept, device=dev)[span]
        return keep

    def _vlprune_videos(self, videos: Tensor, video_kwargs: dict) -> tuple[list[Tensor], list[int]]:
        """Encode ``videos`` (V, T, C, H, W) and merge each over time; returns each video's
        kept tokens and the length of its placeholder span."""
        cfg = self._vlprune_cfg()
        out = self.model.get_video_features(pixel_values_videos=videos, **video_kwargs,
                                            return_dict=True)
        pooled = out.pooler_output  # (V, T * N [+ 1 image_newline], D)
        V, T = videos.shape[:2]
        newline = llava_family(self) == "llava_onevision"
        frames = pooled[:, :-1] if newline else pooled
        if frames.shape[1] % T:
            raise RuntimeError(f"{frames.shape[1]} video tokens do not split into {T} frames")
        n = frames.shape[1] // T
        keep = cfg.temporal_keep
        if isinstance(keep, int) and keep > n:
            raise ValueError(
                f"temporal_keep={keep} but each video frame gives only {n} tokens; give a count "
                f"<= {n} or a ratio in (0, 1]"
            )
        res = temporal_merge(frames.reshape(V, T, n, frames.shape[-1]), keep=keep,
                             threshold=cfg.temporal_threshold)
        kept = res.rows()
        if newline:
            kept = [torch.cat([k, pooled[v, -1:]]) for v, k in enumerate(kept)]
        lens = [pooled.shape[1]] * V
        ctx: PatchContext = self._vlprune
        record = ctx.record
        if record is not None and kept:
            record.append(LayerRecord(0, lens[0], kept[0].shape[0], 0, None, "video"))
        return kept, lens

    def _vlprune_text_embeds(self, input_ids: Tensor, attention_mask: Tensor | None,
                             rows: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Per row: the positions of its prompt text tokens and their input embeddings."""
        special = torch.tensor(sorted(_special_ids(self)), device=input_ids.device)
        text = ~torch.isin(input_ids, special)
        if attention_mask is not None:
            text &= attention_mask.bool()
        emb = self.get_input_embeddings()
        pos, embs = [], []
        for b in range(input_ids.shape[0]):
            p = text[b].nonzero()[:, 0]
            pos.append(p)
            embs.append(emb(input_ids[b, p]) if b in rows else None)
        return pos, embs

    def _vlprune_text_drop(self, input_ids, attention_mask, positions, kept, rows) -> Tensor:
        """(B, L) bool: prompt tokens dropped by ``text_keep``."""
        cfg = self._vlprune_cfg()
        protect_last = DEFAULT_TEXT_PROTECT_LAST if cfg.text_protect_last is None else cfg.text_protect_last
        B, L = input_ids.shape
        drop = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
        emb = self.get_input_embeddings()
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(drop)
        for b in range(B):
            mine = [kept[j] for j, r in enumerate(rows) if r == b]
            if not mine:
                continue  # no image to be guided by
            row_real = real[b].nonzero()[:, 0]
            tail = set(row_real[-protect_last:].tolist()) if protect_last else set()
            cand = torch.tensor([p for p in positions[b].tolist() if p not in tail],
                                dtype=torch.long, device=input_ids.device)
            if cand.numel() == 0:
                continue
            k = math.ceil(cfg.text_keep * cand.numel())
            score = image_text_alignment(emb(input_ids[b, cand]), torch.cat(mine))
            keep = torch.zeros(cand.numel(), dtype=torch.bool, device=drop.device)
            keep[score.topk(k).indices] = True
            drop[b, cand[~keep]] = True
        return drop

    def _vlprune_rewrite(self, input_ids: Tensor, keep: Tensor, seqs: dict) -> dict:
        """Remove the positions ``~keep`` (B, L) from ``input_ids`` and the aligned (B, L)
        tensors of ``seqs``, re-padding each row on the side it was padded on."""
        lengths = keep.sum(dim=1)
        L = int(lengths.max())
        mask = seqs.get("attention_mask")
        right = mask is not None and bool((mask[:, -1] == 0).any()) and not bool((mask[:, 0] == 0).any())
        if mask is None and bool((lengths != L).any()):
            seqs["attention_mask"] = torch.ones_like(input_ids)
        image_id = self.config.image_token_id
        pad_id = self.config.text_config.pad_token_id
        if pad_id is None or pad_id == image_id:
            pad_id = 0 if image_id != 0 else 1
        fills = {"input_ids": pad_id, **_SEQ_FILLS}
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

    def _vlprune_prepare(self, named: dict) -> None:
        """Encode the images (and, with temporal reduction, the videos) of a call, select, and
        rewrite its arguments ``named`` in place (pixels and image arguments out,
        ``mm_encoder_outputs`` in)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        cfg = self._vlprune_cfg()
        input_ids = named.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "vlprune on a LLaVA model needs input_ids (to find the image placeholders), not "
                "inputs_embeds"
            )
        mm = dict(named.get("mm_encoder_outputs") or {})
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        videos = named.get("pixel_values_videos")
        merge_videos = videos is not None and videos.shape[0] > 0 and self._vlprune_video_rewrites()
        video_kwargs = {}
        if merge_videos:  # the tower arguments images and videos share, before images take them
            params = inspect.signature(self.model.get_video_features).parameters
            video_kwargs = {n: named[n] for n in params if n not in ("pixel_values_videos", "kwargs")
                            and named.get(n) is not None}
        pixel_values = named.pop("pixel_values", None)
        kept, rows, positions = [], [], None
        mask = named.get("attention_mask")
        if pixel_values is not None and pixel_values.shape[0] > 0:
            image_kwargs = self._vlprune_image_kwargs(named)
            need_attn = not cfg.visual_is_identity and cfg.visual_score in _ATTN_SCORES
            enc = self._vlprune_encode(pixel_values, image_kwargs, need_attn)
            tower = self._vlprune.children.get("image") if self._vlprune.children else None
            if tower is not None and tower.reduces:
                # merged in the tower: the prompt still holds each image's full span
                strategy = image_kwargs.get("vision_feature_select_strategy")
                enc.lens = [vision_tokens(self, strategy)] * len(enc.feats)
            rows = self._vlprune_span_rows(input_ids, self.config.image_token_id, enc.lens)
            need_text = ((cfg.visual_score == "text" and not cfg.visual_is_identity)
                         or not cfg.text_keep_is_identity)
            positions, embs = (self._vlprune_text_embeds(input_ids, mask, rows) if need_text
                               else (None, None))
            kept = self._vlprune_select(enc, [embs[r] if embs else None for r in rows])
            keep &= self._vlprune_span_keep(input_ids, self.config.image_token_id, enc.lens,
                                            [k.shape[0] for k in kept])
            mm["image"] = BaseModelOutputWithPooling(pooler_output=[k.contiguous() for k in kept])
        if merge_videos:
            named.pop("pixel_values_videos")
            vids, lens = self._vlprune_videos(videos, video_kwargs)
            video_id = self.config.video_token_id
            self._vlprune_span_rows(input_ids, video_id, lens, "video")
            keep &= self._vlprune_span_keep(input_ids, video_id, lens, [v.shape[0] for v in vids])
            # one (1, total, D) tensor: NeXT-Video iterates and flattens it, OneVision flattens it
            mm["video"] = BaseModelOutputWithPooling(pooler_output=torch.cat(vids)[None])
        if kept and not cfg.text_keep_is_identity:
            keep &= ~self._vlprune_text_drop(input_ids, mask, positions, kept, rows)
        seqs = {n: named.get(n) for n in ("attention_mask", "position_ids", "labels") if n in named}
        named.update(self._vlprune_rewrite(input_ids, keep, seqs))
        named["mm_encoder_outputs"] = mm
        if named.get("pixel_values_videos") is not None:
            # upstream refuses raw video pixels next to mm_encoder_outputs: encode the videos
            # (unchanged) the way generate does, so they ride along as features too
            self._prepare_multimodal_encoder_kwargs_for_generation(named)

    # -- entry points --------------------------------------------------------------------

    def _vlprune_llm_begin(self, named: dict) -> None:
        st = self.__dict__["_vlprune_llm"].call()
        cache = named.get("cache", named.get("past_key_values"))
        if cache is not None and cache.get_seq_length():
            return  # a decode step: the prefill's selection stands
        input_ids = named.get("input_ids")
        mm = named.get("mm_encoder_outputs") or {}
        if input_ids is None or mm.get("image") is None:
            st.reset()
            return
        lens = [f.shape[0] for f in mm["image"].pooler_output]
        st.begin(input_ids, named.get("attention_mask"), self.config.image_token_id, lens)

    def forward(self, *args, **kwargs):
        named = _bind_forward(self, args, kwargs)
        cfg = self._vlprune_cfg()
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
        images_run = has_pixels and (self._vlprune_rewrites() or (llm and self._vlprune_llm_active()))
        if images_run or (has_videos and self._vlprune_video_rewrites()):
            if named.get("inputs_embeds") is not None:
                raise ValueError("vlprune on a LLaVA model needs input_ids (to find the image "
                                 "and video placeholders), not inputs_embeds")
            mm = named.get("mm_encoder_outputs") or {}
            if (has_pixels and mm.get("image") is not None) or (has_videos and mm.get("video") is not None):
                raise ValueError("pass either pixel_values (pixel_values_videos) or "
                                 "mm_encoder_outputs, not both")
            self._vlprune_prepare(named)
        if llm:
            st = self.__dict__["_vlprune_llm"].call()
            if not self._vlprune_llm_active():
                st.reset()
            else:
                if named.get("labels") is not None:
                    raise ValueError(
                        "llm_keep drops visual tokens inside the language model, so the logits "
                        "no longer line up with labels; compute the loss unpatched or without llm_keep"
                    )
                self._vlprune_llm_begin(named)
        try:
            return super().forward(**named)
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
        videos = kwargs.get("pixel_values_videos")
        has_pixels = pixel_values is not None and pixel_values.shape[0] > 0
        has_videos = videos is not None and videos.shape[0] > 0
        if not ((has_pixels and self._vlprune_rewrites())
                or (has_videos and self._vlprune_video_rewrites())):
            return super().generate(inputs, *args, **kwargs)
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("vlprune on a LLaVA model needs input_ids (to find the image and "
                             "video placeholders)")
        mm = kwargs.get("mm_encoder_outputs") or {}
        if (has_pixels and mm.get("image") is not None) or (has_videos and mm.get("video") is not None):
            raise ValueError("pass either pixel_values (pixel_values_videos) or mm_encoder_outputs, "
                             "not both")
        named = dict(kwargs, input_ids=input_ids)
        with torch.no_grad():
            self._vlprune_prepare(named)
        new_ids = named.pop("input_ids")
        named = {k: v for k, v in named.items() if v is not None or k in kwargs}
        out = super().generate(new_ids, *args, **named)
        # give back the caller's prompt, followed by what was generated
        seq = out if isinstance(out, Tensor) else out.sequences
        n_ret = seq.shape[0] // input_ids.shape[0]
        prompt = input_ids.repeat_interleave(n_ret, dim=0).to(seq.device)
        full = torch.cat([prompt, seq[:, new_ids.shape[1]:]], dim=1)
        if isinstance(out, Tensor):
            return full
        out.sequences = full
        return out


_FAMILY_MIXINS: dict[type, type] = {}


def _mixin_for(cls: type) -> type:
    """:class:`_LlavaMixin` whose ``forward`` shows the signature of ``cls.forward`` (which
    ``generate`` reads to validate and route its arguments)."""
    mixin = _FAMILY_MIXINS.get(cls)
    if mixin is None:
        def forward(self, *args, **kwargs):
            return _LlavaMixin.forward(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(cls.forward)
        forward.__doc__ = cls.forward.__doc__
        mixin = type(f"_LlavaMixin_{cls.__name__}", (_LlavaMixin,),
                     {"forward": forward, "__module__": __name__})
        _FAMILY_MIXINS[cls] = mixin
    return mixin


def _llm_layers(model: nn.Module):
    lm = getattr(model.model, "language_model", None)
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"llm_keep needs a decoder-only language model with .layers, got {type(lm).__name__}"
        )
    return layers


def check_llava(model: nn.Module, config: ReductionConfig) -> None:
    family = llava_family(model)
    anyres = family != "llava"
    other = [
        n for n in ReductionConfig.field_names()
        if not n.startswith(("visual_", "llm_", "temporal_"))
        and n not in ("family", "text_keep", "text_protect_last", *TOWER_OPTIONS)
        and getattr(config, n) != getattr(ReductionConfig(), n)
    ]
    if other:
        raise ValueError(
            f"{', '.join(other)} not supported on {type(model).__name__}; use visual_keep, "
            "visual_score (reduction before the language model), text_keep (prompt dropping), "
            "llm_layer, llm_keep (pruning inside it) and temporal_keep / temporal_threshold "
            "(videos)"
        )
    temporal = [n for n in ("temporal_keep", "temporal_threshold") if getattr(config, n) is not None]
    if temporal and family not in _VIDEO_FAMILIES:
        raise ValueError(
            f"{', '.join(temporal)} merge video frames over time; {type(model).__name__} takes no "
            "videos (LlavaNextVideoForConditionalGeneration and "
            "LlavaOnevisionForConditionalGeneration do)"
        )
    check_llava_tower(model, config)  # merge_r / prune_*: refused on anyres families
    if not config.has_visual_settings and not tower_requested(config):
        raise ValueError(
            "give visual_keep (an int count or a float ratio in (0, 1]), text_keep, llm_layer "
            "and llm_keep, temporal_keep or temporal_threshold (videos), or merge_r / prune_keep "
            f"(inside the vision tower) to patch {type(model).__name__}"
        )
    n = tower_tokens_per_image(model, config)
    n = vision_tokens(model) if n is None else n
    if config.llm_keep is not None:
        layers = _llm_layers(model)
        if not 0 < config.llm_layer < len(layers):
            raise ValueError(
                f"llm_layer={config.llm_layer} out of range: the language model has "
                f"{len(layers)} decoder layers, give 1..{len(layers) - 1}"
            )
        check_decoder_layers(layers[config.llm_layer:])
        if not anyres:
            per_image = n if config.visual_keep is None else visual_keep_count(config.visual_keep, n)
            if isinstance(config.llm_keep, int) and config.llm_keep > per_image:
                raise ValueError(
                    f"llm_keep={config.llm_keep} but each image enters the language model with "
                    f"only {per_image} visual tokens"
                )
    if config.visual_keep is None:
        return
    layers = _encoder_layers(model)
    if config.visual_score in _ATTN_SCORES:
        layer = layers[0]
        attn = getattr(layer, "self_attn", None)
        if not (hasattr(layer, "layer_norm1") and all(
            hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads")
        )):
            raise UnsupportedModelError(
                f"visual_score={config.visual_score!r} needs CLIP- or SigLIP-style encoder layers "
                "(layer_norm1, self_attn.q_proj/k_proj); use 'text', 'diversity' or 'random'"
            )
    if not anyres and isinstance(config.visual_keep, int):
        visual_keep_count(config.visual_keep, n)
    if config.visual_score == "pool":
        if anyres:
            raise ValueError(
                f"visual_score='pool' pools one square patch grid; {type(model).__name__} packs "
                "crops of different shapes with row-end tokens: use another visual_score"
            )
        grid = vision_tokens(model, "default")
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
        "transformers>=5 LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, "
        "LlavaOnevisionForConditionalGeneration, LlavaNextVideoForConditionalGeneration: "
        "visual tokens reduced before the language model (visual_keep) and inside it "
        "(llm_layer/llm_keep), prompt tokens dropped (text_keep), videos merged over time "
        "(temporal_keep/temporal_threshold; NeXT-Video, OneVision)"
    )

    def matches(self, model: nn.Module) -> bool:
        return llava_family(model) is not None

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        check_llava(model, config)

    def num_layers(self, model: nn.Module) -> int:
        return len(_encoder_layers(model))

    def make_context(self, model: nn.Module, config: ReductionConfig) -> PatchContext:
        check_llava(model, config)
        return llava_context(model, config, self.name, self.num_layers(model))

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        swap_class(model, _mixin_for(type(model)), ctx)
        model.__dict__["_vlprune"] = ctx
        patch_llava_tower(model, ctx)
        cfg = ctx.config
        if cfg.llm_keep is None:
            return
        lm = model.model.language_model
        state = FastVPoint(ctx, cfg.llm_layer, getattr(lm, "rotary_emb", None), visual_keep_count)
        model.__dict__["_vlprune_llm"] = state
        for i, layer in enumerate(_llm_layers(model)[cfg.llm_layer:]):
            swap_class(layer, FastVLayerMixin, ctx, llm=state, first=i == 0)

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        return hf_image_input_size(model.config.vision_config)

    def example_input(self, model, batch_size=1, input_size=None):
        """One image per row: a short text prefix, the image's placeholder span, a suffix
        (LLaVA-1.5 layout; anyres families get one base-size image each)."""
        device, dtype = device_dtype(model)
        size = input_size or self.default_input_size(model)
        n = vision_tokens(model)
        image_id = model.config.image_token_id
        vocab = model.config.text_config.vocab_size
        text = torch.randint(0, vocab, (batch_size, 8), device=device)
        text = torch.where(text == image_id, (text + 1) % vocab, text)
        pixels = torch.randn(batch_size, *size, device=device, dtype=dtype)
        out = {"pixel_values": pixels}
        if llava_family(model) != "llava":
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
                feats = model.model.get_image_features(
                    pixel_values=out["pixel_values"][:1], image_sizes=sizes[:1], return_dict=True
                ).pooler_output
            n = feats[0].shape[0]
        image = torch.full((batch_size, n), image_id, device=device)
        out["input_ids"] = torch.cat([text[:, :3], image, text[:, 3:]], dim=1)
        return out

