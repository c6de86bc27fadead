"""Encoding the images of one call: the vision tower and projector run once, and what the
scores need is captured on the way.

Owns :class:`Encoded` (per image: projected tokens, scores, protected row-end tokens, span
lengths) and :func:`encode_images`: ``get_image_features`` with a pre-hook on the feature
layer (its input, from which the class-token attention row or the mean received attention is
recomputed, :func:`tower_attention`) and, on anyres families, a record of the model's own
``pack_image_features`` call, replayed by :func:`pack_like` so per-crop scores and row-end
marks line up with the packed features.

Both captures are installed once, at patch time (:func:`install_captures`), and write only
into the calling thread's own record (a value scoped to this call, :mod:`..call`): other
threads encoding with the same model at the same time neither see nor disturb it.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..base import add_pre_hook, swap_class
from ..call import lookup, scoped
from .detect import attention_parts, encoder_layers, has_class_token, llava_family, vision_tokens
from .exact import EXACT_SCORES, reduce_hidden
from .internvl import shuffle_scores
from .parts import inner_model


class Encoded:
    """What one image-encoding pass gives: per image its projected tokens, their scores, the
    protected (row-end) tokens, and the tokens each image's placeholder span holds."""

    def __init__(self, feats: list[Tensor], scores: list[Tensor] | None,
                 protect: list[Tensor | None]):
        self.feats = feats
        self.scores = scores
        self.protect = protect
        self.lens = [f.shape[0] for f in feats]
        self.selected = False  # True: feats are already the kept tokens (exact rules)
        self.exact = None  # the exact rule's per-image decisions (ExactResult)


def _feature_layer_index(layer: int, num_layers: int) -> int:
    """The encoder layer whose output is ``hidden_states[layer]`` (-1: the embeddings)."""
    idx = layer % (num_layers + 1) if layer < 0 else layer
    return idx - 1


def tower_attention(layer: nn.Module, x: Tensor, class_token: bool) -> Tensor:
    """Per-crop token scores (C, N) from the input ``x`` (C, N, D) of a CLIP/SigLIP (or
    InternViT) encoder layer, heads averaged, recomputed from the layer's pre-norm and q/k
    projections: the class token's attention row, or (``class_token`` False) the mean
    attention each token receives."""
    norm, q_fn, k_fn, H, scale = attention_parts(layer)
    h = norm(x)
    C, N, _ = h.shape
    scale = (h.shape[-1] // H) ** -0.5 if scale is None else scale
    k = k_fn(h).view(C, N, H, -1).transpose(1, 2).float()
    if class_token:
        q = q_fn(h[:, :1]).view(C, 1, H, -1).transpose(1, 2).float()
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0].mean(dim=1)
    out = []
    for c in range(C):  # one crop at a time: an (H, N, N) matrix, not (C, H, N, N)
        q = q_fn(h[c]).view(N, H, -1).transpose(0, 1).float()
        out.append(((q * scale) @ k[c].transpose(-2, -1)).softmax(dim=-1).mean(dim=(0, 1)))
    return torch.stack(out)


def image_kwargs(model: nn.Module, named: dict) -> dict:
    """The arguments of ``get_image_features`` besides the pixels, taken out of ``named``."""
    params = inspect.signature(inner_model(model).get_image_features).parameters
    out = {}
    for name in params:
        if name not in ("pixel_values", "kwargs", "self") and name in named:
            value = named.pop(name)
            if value is not None:
                out[name] = value
    return out


class _Capture:
    """What one call's encoding records: the input of one encoder layer, the pack calls."""

    def __init__(self, layer: nn.Module | None):
        self.layer = layer
        self.x: Tensor | None = None
        self.packs: list[tuple] = []


def _capture_input(module: nn.Module, args, kwargs) -> None:
    cap = lookup(module.__dict__["_vlprune_hook_ctx"].key, "encode")
    if cap is not None and cap.layer is module:
        cap.x = args[0] if args else kwargs["hidden_states"]


class PackRouteMixin:
    """The inner LLaVA model whose ``pack_image_features`` calls are recorded for the call
    that asked (the upstream method runs unchanged). A base model patched as the root
    (``LlavaNextModel``, ...) has it in its root mixin."""

    def pack_image_features(self, *args, **kwargs):
        cap = lookup(self._vlprune_ctx.key, "encode")
        if cap is not None:
            cap.packs.append((args, kwargs))
        return super().pack_image_features(*args, **kwargs)


def install_captures(model: nn.Module, ctx) -> None:
    """Patch time: a pre-hook on every vision encoder layer, and (anyres families) the inner
    model's ``pack_image_features`` routed through a hooked module; both record only into a
    call that asked (:func:`encode_images`)."""
    for layer in encoder_layers(model):
        add_pre_hook(layer, _capture_input, ctx)
    inner = inner_model(model)
    pack = getattr(inner, "pack_image_features", None)
    if pack is not None and inner is not model:  # a base model's root mixin routes it
        swap_class(inner, PackRouteMixin, ctx)


def upstream_pack(inner: nn.Module):
    """The upstream ``pack_image_features`` of the inner model, bound (its signature is the
    one :func:`pack_like` binds against)."""
    cls = inner.__dict__.get("_vlprune_orig_class", type(inner))
    return cls.pack_image_features.__get__(inner)


def encode_images(model: nn.Module, pixel_values: Tensor, image_kwargs: dict,
                  need_attn: bool) -> Encoded:
    """Run the vision tower and projector of ``model`` once; record what scoring needs
    (InternVL: per tile, regrouped per image by the caller, :func:`group_tiles`).
    The exact pre-projector rules (``visionzip``, ``prumerge``, ``prumerge_plus``) select here
    already (:func:`~vlprune.adapters.llava.exact.encode_exact`)."""
    mcfg = model.config
    layer = image_kwargs.get("vision_feature_layer", mcfg.vision_feature_layer)
    strategy = image_kwargs.get("vision_feature_select_strategy",
                                getattr(mcfg, "vision_feature_select_strategy", "default"))
    cfg = model._vlprune.config
    if cfg.visual_score in EXACT_SCORES and not cfg.visual_is_identity:
        return encode_exact(model, pixel_values, image_kwargs, vision_tokens(model, strategy))
    layers = idx = None
    if need_attn:
        if not isinstance(layer, int):
            raise ValueError(
                f"visual_score={model._vlprune.config.visual_score!r} reads the tower's attention "
                f"at one vision_feature_layer, got a list {list(layer)}; use visual_score "
                "'text', 'diversity' or 'random'"
            )
        layers = encoder_layers(model)
        idx = _feature_layer_index(layer, len(layers))
        if idx < 0:
            raise ValueError("attention scores need a vision_feature_layer after the embeddings")
    inner = inner_model(model)
    cap = _Capture(layers[idx] if need_attn else None)
    with scoped([model._vlprune.key], "encode", cap):  # this call's record, this thread only
        out = inner.get_image_features(pixel_values=pixel_values, **image_kwargs, return_dict=True)
    feats = list(out.pooler_output)
    protect: list[Tensor | None] = [None] * len(feats)
    scores = None
    packs = cap.packs
    pack = upstream_pack(inner) if packs else None
    if packs:
        row_end = pack_like(pack, packs[0], None, feats)
        protect = [r.bool() for r in row_end]
    if need_attn:
        if cap.x is None:
            raise RuntimeError(f"encoder layer {idx} of the vision tower did not run")
        # "attn" (and a tower without a class token): the mean attention each token receives
        class_row = has_class_token(model) and cfg.visual_score != "attn"
        crop = tower_attention(layers[idx], cap.x, class_row)
        if strategy == "default" and has_class_token(model):
            crop = crop[:, 1:]
        if llava_family(model) == "internvl":  # per patch -> per pixel-shuffled token
            crop = shuffle_scores(inner, crop)
        scores = pack_like(pack, packs[0], crop, feats) if packs else list(crop)
    return Encoded(feats, scores, protect)


def group_tiles(enc: Encoded, tiles: list[int]) -> Encoded:
    """The per-tile encoding ``enc`` of an InternVL regrouped per image (``tiles[j]`` tiles
    each, :func:`~vlprune.adapters.llava.internvl.image_tiles`): the features and scores of
    an image's tiles concatenated, so one ranking covers the whole image."""
    def cat(parts: list[Tensor]) -> list[Tensor]:
        out, i = [], 0
        for n in tiles:
            out.append(torch.cat(parts[i:i + n]))
            i += n
        return out

    scores = cat(enc.scores) if enc.scores is not None else None
    return Encoded(cat(enc.feats), scores, [None] * len(tiles))


def pack_like(pack, call: tuple, per_crop: Tensor | None, feats: list[Tensor]) -> list[Tensor]:
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


def encode_exact(model: nn.Module, pixel_values: Tensor, image_kwargs: dict, span: int):
    """The tower once, the exact rule per image, then the projector: an
    :class:`Encoded` whose ``feats`` are already the kept
    projected tokens (``selected``) and whose ``lens`` are the placeholder spans."""
    cfg = model._vlprune.config
    inner = inner_model(model)
    layer = image_kwargs.get("vision_feature_layer", model.config.vision_feature_layer)
    if not isinstance(layer, int):
        raise ValueError(
            f"visual_score={cfg.visual_score!r} reads one vision_feature_layer, got {list(layer)}"
        )
    extra = {k: v for k, v in image_kwargs.items()
             if k not in ("vision_feature_layer", "vision_feature_select_strategy")}
    out = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **extra)
    res = reduce_hidden(cfg.visual_score, out.hidden_states, encoder_layers(model), layer,
                        cfg.visual_keep, cfg.visual_contextual, span)
    counts = [t.shape[0] for t in res.tokens]
    projected = inner.multi_modal_projector(torch.cat(res.tokens)[None])[0].split(counts)
    enc = Encoded(list(projected), None, [None] * len(counts))
    enc.lens = [span] * len(counts)
    enc.selected = True
    enc.exact = res
    return enc
