"""Videos merged over time (``temporal_keep`` / ``temporal_threshold``).

Owns :func:`merge_videos`: each video's merged tokens, ``(grid_t, tokens per frame, D)`` in
the tower's output order (frame by frame, each frame's grid row by row), go through
:func:`~vlprune.merging.temporal_merge`: a token repeating the same place of the frame before
merges into it. The surviving token keeps its own placeholder place and so its own 3-D
position (that of the earliest frame it covers); its features are the mean of the tokens it
holds, and so are its DeepStack features (Qwen3-VL) and its ``attn`` score. ``visual_keep``
then selects among the survivors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...merging.temporal import temporal_merge
from ..base import LayerRecord, PatchContext
from .encode import Encoded


def _mean_by(values: Tensor, assign: Tensor, k: int) -> Tensor:
    """Row ``i`` of the result: the mean of the rows of ``values`` with ``assign == i``."""
    shape = (k, *values.shape[1:])
    out = torch.zeros(shape, dtype=torch.float32, device=values.device)
    out.index_add_(0, assign, values.float())
    counts = torch.bincount(assign, minlength=k).clamp_min(1).to(out)
    return (out / counts.view(-1, *([1] * (values.dim() - 1)))).to(values.dtype)


def merge_videos(ctx: PatchContext, enc: Encoded, grid: Tensor) -> list[Tensor]:
    """Merge every video of ``enc`` over time, in place (its ``feats``, ``deep``, ``scores``
    become the survivors'); returns each video's survivor places (indices into its
    placeholder span, ascending). ``grid``: the ``video_grid_thw`` of the videos."""
    cfg = ctx.config
    places = []
    for j, f in enumerate(enc.feats):
        T = int(grid[j, 0])
        N = f.shape[0] // T
        keep = cfg.temporal_keep
        if isinstance(keep, int) and keep > N:
            raise ValueError(
                f"temporal_keep={keep} but each frame of video {j} gives only {N} tokens; give a "
                f"count <= {N} or a ratio in (0, 1]"
            )
        res = temporal_merge(f.view(1, T, N, f.shape[-1]), keep=keep,
                             threshold=cfg.temporal_threshold)
        k = res.counts[0]
        assign = res.assign[0].reshape(-1)
        flat = torch.arange(T * N, device=f.device)
        first = torch.full((k,), T * N, dtype=torch.long, device=f.device)
        places.append(first.scatter_reduce(0, assign, flat, reduce="amin"))
        enc.feats[j] = res.rows()[0]
        if enc.deep is not None:
            for layer in enc.deep:
                layer[j] = _mean_by(layer[j], assign, k)
        if enc.scores is not None:
            enc.scores[j] = _mean_by(enc.scores[j], assign, k)
    record = ctx.record
    if record is not None and places:
        record.append(LayerRecord(0, enc.lens[0], enc.feats[0].shape[0], 0, None, "video"))
    return places
