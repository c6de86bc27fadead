"""The reduction step every adapter runs at a reduction point: prune, then merge.

Family-agnostic: an adapter hands over the tokens after the attention branch and the
attention inputs of that block; the configured score ranks tokens, the selection rule builds
a Plan, ToMe matching merges what is left, and the token state follows every compaction.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor
from torch.nn import functional as F

from ..core.attention import AttnSpec, uses_flex
from ..core.plan import take_tokens
from ..core.ragged import ragged_bipartite, ragged_prune_plan
from ..core.scores import NEEDS_CLASS_TOKEN, AttnInputs, compute_scores
from ..core.select import FusePlan, keep_count, prune_plan
from ..merging.bipartite import bipartite_soft_matching, max_merge
from .base import PatchContext
from .call import lookup
from .recompute import next_plan


def enter_block(ctx: PatchContext, layer: int, x: Tensor) -> tuple[bool, AttnSpec | None] | None:
    """What a patched block at ``layer`` must do with tokens ``x``: ``None`` when the upstream
    forward can run untouched, else ``(reduce, spec)``: whether this layer reduces, and what
    shapes its attention (:class:`~vlprune.core.attention.AttnSpec`: the proportional-attention
    key bias, text masks; ``None`` for plain attention)."""
    call = ctx.call
    # a recomputed block replays its first run, which reduced (.recompute)
    state = call.state if call.replay is not None or ctx.enabled else None
    if state is None:
        return None
    reduce = ctx.needs_attn(layer)
    spec = state.attn_spec(ctx.config.prop_attn)
    if not reduce and spec is None:
        return None
    state.check(x)
    return reduce, spec


def block_attention(ctx: PatchContext, x: Tensor, spec: AttnSpec | None) -> tuple[Tensor | None, AttnSpec | None]:
    """How a patched block hands ``spec`` to its attention module: ``(mask, None)`` with the
    dense float mask for an upstream (SDPA / eager) attention call, or ``(None, spec)`` when
    the configured ``attn_backend`` runs FlexAttention (the patched attention module then
    computes the attention itself with :func:`~vlprune.core.attention.attend`)."""
    if spec is None:
        return None, None
    if uses_flex(ctx.config.attn_backend, x.device, spec):
        return None, spec
    return spec.dense(x.dtype), None


def scoring_bias(spec: AttnSpec | None, dtype: torch.dtype) -> Tensor | None:
    """The dense additive mask the scores read (``AttnInputs.bias``), built only when asked."""
    return None if spec is None else spec.dense(dtype)


def pool_sizes(ctx: PatchContext, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """Sizes for a size-weighted pooling of ``x`` (B, N, C), the tokens a patched model's
    pooling step got: ``(size, attn_size)``, both ``(B, N, 1)`` float32 (``attn_size`` is the
    size proportional attention uses: a fused token counts once), or ``None`` when every token
    has size 1 (reduction disabled, or nothing merged in the latest forward).

    The sizes are those of the latest forward of this model in the calling thread; tokens of
    another shape cannot be the output of that forward (e.g. ``forward_head`` on features kept
    from an earlier call), so that raises instead of pooling with wrong weights."""
    if not ctx.reduces:  # settings that reduce nothing pool exactly as upstream (torch.fx too)
        return None
    state = ctx.state
    if state is None or x.shape[1] == 1:  # one token per sequence: weights cannot matter
        return None  # (a guided tower maps each token alone through its pooling head)
    count = state.num_tokens if state.size is None else state.size.shape[1]
    if count is None:
        return None
    batch = x.shape[0] if state.size is None else state.size.shape[0]
    if (batch, count) != tuple(x.shape[:2]):
        raise RuntimeError(
            f"size-weighted pooling got {x.shape[0]} x {x.shape[1]} tokens, but the latest forward "
            f"of this patched model (in this thread) left {batch} x {count} tokens, whose sizes "
            "weigh the pooling: pool the output of the latest forward (call forward_head on the "
            "features of the forward_features call just before it), or run both inside "
            "`with vlprune.disabled(model):` to pool unreduced tokens"
        )
    if state.size is None:
        return None
    return state.size, (state.size if state.attn_size is None else state.attn_size)


def weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    """``(B, C)`` size-weighted mean of ``x`` (B, N, C) with ``size`` (B, N, 1), summed in
    float32 (at least) and returned in ``x``'s dtype."""
    s = size.to(torch.promote_types(x.dtype, torch.float32))
    return ((x.to(s.dtype) * s).sum(dim=1) / s.sum(dim=1)).to(x.dtype)


def guided_scores(ctx: PatchContext, x: Tensor) -> Tensor:
    """Cross-modal alignment of each token of ``x`` (B, N, C): the cosine between the token
    mapped through its tower's own head (``ctx.project``) and each guiding embedding of the
    other modality, maximised over those embeddings: ``(B, N)``."""
    guide = ctx.guide_embeds
    tower = ctx.tower or "image"
    if guide is None:
        other = ctx.guided_by
        how = (
            "call the two-tower model with both inputs, or set one with "
            f"vlprune.set_guide(model, {other}_embeddings)" if ctx.tower else
            f"set one with vlprune.set_guide(model, {other}_embeddings, project=...)"
        )
        raise RuntimeError(
            f"the {tower} tower's pruning is guided by the {other} (guide={other!r}) but this "
            f"forward has no {other} embedding: {how}"
        )
    with torch.no_grad():
        e = ctx.project(x)
        if ctx.guide_project is not None:
            e = ctx.guide_project(e)
        e = F.normalize(e.float(), dim=-1)
        if guide.shape[-1] != e.shape[-1]:
            raise ValueError(
                f"guide embeddings have size {guide.shape[-1]} but the {tower} tower's head "
                f"gives {e.shape[-1]}: pass the other tower's (projected) features, or map the "
                "tower's features to the guide's space with set_guide(..., project=...)"
            )
        g = F.normalize(guide.to(device=e.device, dtype=e.dtype), dim=-1)
        return (e @ g.transpose(0, 1)).amax(dim=-1)


# (context key, schedule) pairs already warned about: warn once per patched model and schedule
_WARNED: set[tuple[int, tuple[int, ...]]] = set()


def effective_merges(ctx: PatchContext, start: int, num_tokens: int,
                     num_protected: int) -> tuple[list[int], int]:
    """What each layer merges when ``num_tokens`` tokens (``num_protected`` protected) enter
    layer ``start`` (dense tokens, no padding): the tokens merged per layer (capped at half
    the mergeable ones, after the layer's pruning) and the tokens leaving the last layer."""
    merged = [0] * len(ctx.schedule)
    free = num_tokens - num_protected
    fuse = ctx.config.prune_mode == "fuse"
    for i in range(start, len(ctx.schedule)):
        keep = ctx.prune_schedule[i]
        if keep is not None and keep < 1.0:
            kept = keep_count(free + num_protected, num_protected, keep)
            if kept < free:
                free = kept + (1 if fuse else 0)  # the fused token can merge later
        merged[i] = min(ctx.schedule[i], max_merge(free + num_protected, num_protected))
        free -= merged[i]
    return merged, free + num_protected


def warn_merge_cap(ctx: PatchContext, layer: int, x: Tensor, num_protected: int) -> None:
    """Warn once per patched model (and schedule) when its merge schedule asks for more
    tokens than the input has to merge: called by the first reducing layer of a forward,
    whose input ``x`` holds every token. Not inside compiled graphs, nor on padded text
    batches, whose per-row budgets depend on each text's length."""
    if torch.compiler.is_compiling() or not any(ctx.schedule):
        return
    state = ctx.state
    if state is None or state.valid is not None:
        return
    if any(ctx.needs_attn(i) for i in range(layer)):  # not the first reducing layer
        return
    key = (ctx.key, tuple(ctx.schedule))
    n, P = x.shape[1], num_protected
    asked = sum(ctx.schedule)
    # more than the input holds in all, or more than even a layer seeing every token can merge
    if key in _WARNED or (asked <= n - P and max(ctx.schedule) <= max_merge(n, P)):
        return
    _WARNED.add(key)
    merged, left = effective_merges(ctx, layer, n, P)
    tower = f" (the {ctx.tower} tower)" if ctx.tower else ""
    warnings.warn(
        f"merge_r={ctx.config.merge_r!r}{tower} asks for more tokens than this input has to "
        f"merge: {n} tokens enter ({P} protected), a layer merges at most half of its "
        f"mergeable tokens, and the schedule asks for {asked} in all. Merged per layer for "
        f"this input: {merged} ({n} -> {left} tokens). Lower merge_r; vlprune.describe(model) "
        "shows each layer.",
        stacklevel=3,
    )


def reduce_step(ctx: PatchContext, layer: int, x: Tensor, attn: AttnInputs, cls_index: int = 0) -> Tensor:
    """Apply layer ``layer``'s pruning and merging to ``x`` (B, N, C); returns the new ``x``.

    The decisions (scores, selection, matching) run without gradients; the tokens are
    differentiated through the compaction (size-weighted means, EViT's fused token with its
    class-attention weights). A block recomputed by gradient checkpointing takes the plans of
    its first run instead (:mod:`vlprune.adapters.recompute`)."""
    call = ctx.call
    state = call.state
    cfg = ctx.config
    P = state.num_protected
    if call.replay is None:
        warn_merge_cap(ctx, layer, x, P)
    r = ctx.schedule[layer]
    keep = ctx.prune_schedule[layer]
    valid = state.valid  # padded sequences: per-row budgets (vlprune.core.ragged)
    metric = None
    if keep is not None and keep < 1.0:
        n_keep = keep_count(x.shape[1], P, keep)
        mode = cfg.prune_mode
        # class-attention scores are EViT's fusion weights: the fused token is their weighted
        # sum, differentiated through them (so computed with gradients, in a recompute too);
        # other scores, guided ones included, fuse by a size-weighted mean
        weight = None
        if mode == "fuse" and valid is None and ctx.guided_by is None and cfg.prune_score in NEEDS_CLASS_TOKEN:
            weight = compute_scores(
                cfg.prune_score, attn, num_protected=P, n_keep=n_keep, cls_index=cls_index,
                key=call.random_key, stream=layer, valid=valid,
            )
        if call.replay is not None:
            plan = next_plan(call)
        else:
            with torch.no_grad():  # decisions only: the plan holds indices, no graph
                if weight is not None:
                    scores = weight
                elif ctx.guided_by is not None:
                    scores = guided_scores(ctx, x)
                else:
                    scores = compute_scores(
                        cfg.prune_score, attn, num_protected=P, n_keep=n_keep, cls_index=cls_index,
                        key=call.random_key, stream=layer, valid=valid,
                    )
                if mode == "recycle" or r > 0:
                    metric = attn.metric()
                if valid is not None:
                    plan = ragged_prune_plan(scores, valid, keep, P, mode=mode, metric=metric)
                else:
                    fuse = None if weight is None else weight.detach()
                    plan = prune_plan(scores, n_keep, P, mode=mode, metric=metric, fuse_weight=fuse)
            call.decided(plan)
        if weight is not None and isinstance(plan, FusePlan):
            plan = dataclasses.replace(plan, attn=weight.unsqueeze(-1))  # with its gradient
        if plan is not None:
            x = state.compact(plan, x)
            if metric is not None:
                metric = take_tokens(metric, plan.keep)
    if r > 0:
        n = x.shape[1]
        if call.replay is not None:
            plan = next_plan(call)
        else:
            with torch.no_grad():
                metric = attn.metric() if metric is None else metric
                if state.valid is not None:
                    plan = ragged_bipartite(metric, state.valid, r, P)
                else:
                    plan = bipartite_soft_matching(metric, r, P)
            call.decided(plan)
        if plan is not None:
            x = state.compact(plan, x)
        if call.replay is None and not torch.compiler.is_compiling():
            merged = lookup(ctx.key, "merged")  # describe's record of what each layer merged
            if merged is not None:
                merged[(ctx.tower, layer)] = n - x.shape[1]
    return x
