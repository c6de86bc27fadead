"""Videos (NeXT-Video, OneVision): their frame tokens merged over time.

Owns :func:`video_kwargs` (the tower arguments ``get_video_features`` takes) and
:func:`merge_videos`: each video's frame tokens (``get_video_features``, reshaped to
``(1, frames, tokens, D)``; OneVision's trailing ``image_newline`` token set aside and kept)
go through :func:`~vlprune.merging.temporal_merge` (``temporal_keep`` /
``temporal_threshold``): tokens repeating the same place of the frame before merge into it,
and the video's placeholder span shrinks to the merged count.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ...merging.temporal import temporal_merge
from ..base import LayerRecord, PatchContext
from .detect import llava_family
from .parts import inner_model


def video_kwargs(model: nn.Module, named: dict) -> dict:
    """The arguments of ``get_video_features`` besides the pixels, read (not taken) from
    ``named``: images and videos share some tower arguments, so read them before the images
    take theirs."""
    params = inspect.signature(inner_model(model).get_video_features).parameters
    return {n: named[n] for n in params if n not in ("pixel_values_videos", "kwargs")
            and named.get(n) is not None}


def merge_videos(model: nn.Module, videos: Tensor, video_kwargs: dict) -> tuple[list[Tensor], list[int]]:
    """Encode ``videos`` (V, T, C, H, W) and merge each over time; returns each video's
    kept tokens and the length of its placeholder span."""
    ctx: PatchContext = model._vlprune
    cfg = ctx.config
    out = inner_model(model).get_video_features(pixel_values_videos=videos, **video_kwargs,
                                         return_dict=True)
    pooled = out.pooler_output  # (V, T * N [+ 1 image_newline], D)
    V, T = videos.shape[:2]
    newline = llava_family(model) == "llava_onevision"
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
    record = ctx.record
    if record is not None and kept:
        record.append(LayerRecord(0, lens[0], kept[0].shape[0], 0, None, "video"))
    return kept, lens
