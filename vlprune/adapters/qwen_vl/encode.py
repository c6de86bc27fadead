"""Encoding the images (or videos) of one call: the vision tower runs once, and what the
``attn`` score needs is captured on the way.

Owns :class:`Encoded` (per image or video: its merged tokens, the DeepStack features of
Qwen3-VL, the scores) and :func:`encode`, which runs upstream's ``get_image_features`` /
``get_video_features`` with a pre-hook on the scoring block (:func:`~.detect.score_block`)
recording that block's input, ``cu_seqlens`` and rotary embeddings for the call that asked
(:mod:`..call`: this thread's record only).

The score (:func:`received_attention`): the attention each patch receives in that block,
recomputed from the block's own ``norm1`` / ``qkv`` and rotary embeddings (so every block
keeps its fast attention kernel), heads and queries averaged within each attention segment
(one frame of one image or video), queries taken in chunks so no more than a
``(heads, chunk, segment)`` matrix exists at a time. Each merged token's score is the *sum*
of its 2x2 patches' scores, in the merger's output order: on Qwen2.5-VL the tower runs on
patches reordered by window (``get_vision_window_index``), and the merged tokens are put back
with ``argsort(window_index)``, as upstream does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..base import add_pre_hook
from ..call import lookup, scoped
from .detect import inner_model, score_block

# entries (heads x queries x keys) of one attention slice of the score: 4M float32 (16 MB) stays
# in a server CPU's last-level cache, twice as fast as 1024-query slices at 4096 patches
QUERY_ELEMENTS = 1 << 22


class Encoded:
    """One modality's encoding pass: per image (video) its merged tokens ``feats`` (n, D),
    its DeepStack features ``deep[layer]`` (Qwen3-VL; ``None`` otherwise), its ``scores``
    (n,) when the tower's attention was asked for, and the output upstream returned."""

    def __init__(self, output, feats: list[Tensor], deep: list[list[Tensor]] | None,
                 scores: list[Tensor] | None):
        self.output = output
        self.feats = feats
        self.deep = deep
        self.scores = scores
        self.lens = [f.shape[0] for f in feats]


class _Capture:
    def __init__(self, block: nn.Module):
        self.block = block
        self.x: Tensor | None = None
        self.cu_seqlens: Tensor | None = None
        self.rotary = None


def _capture_input(module: nn.Module, args, kwargs) -> None:
    cap = lookup(module.__dict__["_vlprune_hook_ctx"].key, "qwen_encode")
    if cap is not None and cap.block is module and cap.x is None:
        cap.x = args[0] if args else kwargs["hidden_states"]
        cap.cu_seqlens = args[1] if len(args) > 1 else kwargs["cu_seqlens"]
        cap.rotary = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)


def install_captures(model: nn.Module, ctx) -> None:
    """Patch time: a pre-hook on the scoring block; it records only into a call that asked."""
    visual = inner_model(model).visual
    add_pre_hook(visual.blocks[score_block(model)], _capture_input, ctx)


def received_attention(block: nn.Module, x: Tensor, cu_seqlens: Tensor, rotary,
                       chunk: int | None = None) -> Tensor:
    """(S,) attention each of the ``S`` patches of ``x`` (S, C) receives in ``block``,
    averaged over heads and over the queries of its own segment (``cu_seqlens``); queries in
    slices of ``chunk`` rows (default: :data:`QUERY_ELEMENTS` entries a slice)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    attn = block.attn
    h = block.norm1(x)
    S = h.shape[0]
    H = attn.num_heads
    q, k, _ = attn.qkv(h).reshape(S, 3, H, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = rotary
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # (H, S, d)
    scale = getattr(attn, "scaling", q.shape[-1] ** -0.5)
    out = torch.zeros(S, device=x.device, dtype=torch.float32)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        ks = k[:, s:e]
        total = torch.zeros(e - s, device=x.device, dtype=torch.float32)
        rows = chunk or max(1, QUERY_ELEMENTS // (H * (e - s)))
        for c in range(s, e, rows):
            probs = ((q[:, c:min(c + rows, e)] * scale) @ ks.transpose(-2, -1)).softmax(dim=-1)
            total += probs.sum(dim=(0, 1))
        out[s:e] = total / (H * (e - s))
    return out


def _merged_order(model: nn.Module, grid: Tensor, device) -> Tensor | None:
    """The window index of upstream's tower (Qwen2.5-VL), or None (no reordering)."""
    visual = inner_model(model).visual
    if getattr(visual, "fullatt_block_indexes", None) is None:
        return None
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(
        grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
        patch_size=visual.patch_size)
    return window_index.to(device)


def encode(model: nn.Module, modality: str, pixels: Tensor, grid: Tensor, need_attn: bool,
           extra: dict | None = None) -> Encoded:
    """Run upstream's ``get_{modality}_features`` once on ``pixels`` / ``grid`` (``image`` or
    ``video``); with ``need_attn`` also score every merged token (:func:`received_attention`)."""
    inner = inner_model(model)
    visual = inner.visual
    fn = inner.get_image_features if modality == "image" else inner.get_video_features
    cap = _Capture(visual.blocks[score_block(model)]) if need_attn else None
    with scoped([model._vlprune.key], "qwen_encode", cap):
        out = fn(pixels, grid, return_dict=True, **(extra or {}))
    feats = list(out.pooler_output)
    deep = getattr(out, "deepstack_features", None)
    deep = [list(layer) for layer in deep] if deep is not None else None
    scores = None
    if need_attn:
        if cap.x is None:
            raise RuntimeError(f"vision block {score_block(model)} did not run")
        patch = received_attention(cap.block, cap.x, cap.cu_seqlens, cap.rotary)
        merged = patch.view(-1, visual.spatial_merge_unit).sum(dim=1)  # tower (window) order
        window = _merged_order(model, grid, merged.device)
        if window is not None:
            merged = merged[torch.argsort(window)]
        scores = list(merged.split([f.shape[0] for f in feats]))
    return Encoded(out, feats, deep, scores)
