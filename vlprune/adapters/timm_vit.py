"""timm ``VisionTransformer`` (ViT, DeiT incl. distilled, AugReg, registers, LayerScale, qk-norm).

Reduction point: inside each ``Block``, between the attention branch and the MLP branch (ToMe's
place: the attention keys of this block are the merge metric). What is patched:

* the model: ``forward_features`` / ``forward_intermediates`` start a fresh token state;
  ``pool`` averages with token sizes (``avg``/``avgmax``) and gives MAP pooling proportional
  attention;
* each ``Block``: the copied two-line forward with the reduction step in between;
* each ``Attention``: only when its block needs the keys, a copy of the upstream forward that
  also hands over the head-averaged keys; otherwise the upstream forward runs untouched.

timm is imported lazily: ``import vlprune`` does not need it.
"""

from __future__ import annotations

import functools
import inspect

from torch import Tensor, nn
from torch.nn import functional as F

from ..config import ReductionConfig
from ..core.attention import attend, size_bias
from ..core.scores import NEEDS_CLASS_TOKEN, AttnInputs
from .base import (
    Adapter,
    PatchContext,
    RootMixin,
    UnsupportedModelError,
    class_path_in_mro,
    config_prunes,
    register_adapter,
    swap_class,
)
from .recompute import run_block
from .step import (
    block_attention,
    enter_block,
    pool_sizes,
    reduce_step,
    scoring_bias,
    weighted_mean,
)

MIN_TIMM = (1, 0)
_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop")


def _timm_version() -> tuple[int, ...]:
    import timm

    parts = []
    for p in timm.__version__.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class _ViTMixin(RootMixin):
    """Model-level patch of timm ``VisionTransformer``."""

    def _vlprune_begin(self) -> None:
        self._vlprune_start(self.num_prefix_tokens)

    def forward_features(self, x: Tensor, *args, **kwargs) -> Tensor:
        self._vlprune_begin()
        return super().forward_features(x, *args, **kwargs)

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        self._vlprune_begin()
        self._vlprune_check_nlc(super().forward_intermediates, x, *args, **kwargs)
        return super().forward_intermediates(x, *args, **kwargs)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        ctx: PatchContext = self._vlprune
        pool_type = self.global_pool if pool_type is None else pool_type
        if self.attn_pool is None and pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)  # 'token', 'max', '': sizes do not matter
        sizes = pool_sizes(ctx, x)  # raises on tokens that are not the latest forward's
        if sizes is None:
            return super().pool(x, pool_type)
        size, attn_size = sizes
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        if self.attn_pool is not None:
            # the attention pool weighs tokens as block attention does (a fused token is one)
            bias = size_bias(attn_size[:, start:], x.dtype) if ctx.config.prop_attn else None
            return self.attn_pool(x[:, start:], attn_mask=bias)
        xs = x[:, start:]
        avg = weighted_mean(xs, size[:, start:])
        return avg if pool_type == "avg" else 0.5 * (xs.amax(dim=1) + avg)


def _pre_logits(norm: nn.Module, fc_norm: nn.Module, x: Tensor) -> Tensor:
    """Token features mapped as the pooled feature is before the classifier head."""
    return fc_norm(norm(x))


class _BlockMixin:
    """Patched timm ``Block``. Follows ``timm/models/vision_transformer.py::Block.forward``
    (timm 1.0.31): every submodule upstream calls is still called, in the same order."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        # a recompute under gradient checkpointing replays the first run (.recompute)
        return run_block(self._vlprune_ctx, self._vlprune_layer, x,
                         lambda: self._vlprune_forward(x, attn_mask, is_causal))

    def _vlprune_forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        ctx: PatchContext = self._vlprune_ctx
        layer: int = self._vlprune_layer
        todo = enter_block(ctx, layer, x)
        if todo is None:
            out = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            ctx.log(layer, x.shape[1], out.shape[1])
            return out
        reduce, spec = todo
        if attn_mask is not None or is_causal:
            raise ValueError(
                "attn_mask / is_causal cannot be combined with token reduction (the mask would "
                "have to follow the merged tokens); run inside `with vlprune.disabled(model):`"
            )
        n_in = x.shape[1]
        call = ctx.call
        bias, call.pending_spec = block_attention(ctx, x, spec)  # flex: the attention takes spec
        call.capture = reduce
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=bias)))
        if reduce:
            x = reduce_step(ctx, layer, x, call.take_attn())
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        ctx.log(layer, n_in, x.shape[1])
        return x


class _AttentionMixin:
    """Patched timm ``Attention``: upstream forward unless the block asked for q, k, v or
    handed it an :class:`~vlprune.core.attention.AttnSpec` (the flex backend)."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        ctx: PatchContext = self._vlprune_ctx
        call = ctx.call
        capture, spec = call.capture, call.pending_spec
        if not capture and spec is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        call.capture, call.pending_spec = False, None
        # Follows timm/layers/attention.py::Attention.forward (timm 1.0.31) without the causal
        # branch (refused by the block), hands q, k, v to the block for scoring, and attends
        # with vlprune's attention (FlexAttention) when the block handed it a spec.
        B, N, _ = x.shape
        gate = getattr(self, "gate", None)
        gate = gate(x).sigmoid() if gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if capture:
            bias = attn_mask if spec is None else scoring_bias(spec, q.dtype)
            call.attn = AttnInputs(q=q, k=k, v=v, scale=self.scale, bias=bias)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if spec is not None:
            x = attend(q, k, v, spec, scale=self.scale, dropout_p=dropout_p,
                       backend=ctx.config.attn_backend)
        elif self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


@register_adapter
class TimmViTAdapter(Adapter):
    name = "timm_vit"
    supported = (
        "timm>=1.0 VisionTransformer / VisionTransformerDistilled with the standard Block and "
        "Attention: ViT, DeiT, AugReg, register tokens, LayerScale, qk-norm, avg/token/map pooling"
    )

    def matches(self, model: nn.Module) -> bool:
        return any(
            p.startswith("timm.") and p.endswith(".VisionTransformer") for p in class_path_in_mro(model)
        )

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        if _timm_version() < MIN_TIMM:
            import timm

            raise UnsupportedModelError(f"timm {timm.__version__} found; vlprune needs timm>=1.0")
        if not isinstance(getattr(model, "blocks", None), nn.Sequential):
            raise UnsupportedModelError("timm ViT without an nn.Sequential `blocks`; " + self.supported)
        for i, blk in enumerate(model.blocks):
            if type(blk).forward is not Block.forward or not all(hasattr(blk, n) for n in _BLOCK_PARTS):
                raise UnsupportedModelError(
                    f"blocks[{i}] is {type(blk).__qualname__}; the timm adapter supports "
                    f"timm.models.vision_transformer.Block only (not ResPostBlock, parallel or "
                    f"diff-attention blocks). Supported: {self.supported}"
                )
            attn = blk.attn
            if type(attn).forward is not Attention.forward or not all(
                hasattr(attn, n) for n in _ATTN_PARTS
            ):
                raise UnsupportedModelError(
                    f"blocks[{i}].attn is {type(attn).__qualname__}; the timm adapter supports "
                    f"timm.layers.Attention only. Supported: {self.supported}"
                )
        prunes = config_prunes(config)
        if prunes and config.prune_score in NEEDS_CLASS_TOKEN and getattr(model, "cls_token", None) is None:
            raise ValueError(
                f"prune_score={config.prune_score!r} ranks tokens by class-token attention, but this "
                "model has no class token; use one of 'key_norm', 'attn_entropy', 'diversity', 'random'"
            )
        if model.attn_pool is not None and "attn_mask" not in inspect.signature(
            model.attn_pool.forward
        ).parameters:
            raise UnsupportedModelError(
                f"{type(model.attn_pool).__qualname__} takes no attn_mask, so MAP pooling cannot "
                "weight merged tokens; upgrade timm (1.0.31 works)"
            )

    def num_layers(self, model: nn.Module) -> int:
        return len(model.blocks)

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        swap_class(model, _ViTMixin, ctx)
        model.__dict__["_vlprune"] = ctx
        for i, blk in enumerate(model.blocks):
            swap_class(blk, _BlockMixin, ctx, layer=i)
            swap_class(blk.attn, _AttentionMixin, ctx)

    def token_head(self, model: nn.Module):
        """Class-token and average pooling read the final norm's output (then ``fc_norm``):
        applied per token, it maps each token to the pooled-feature space. MAP pooling has no
        per-token equivalent."""
        if model.attn_pool is not None or model.global_pool not in ("token", "avg"):
            return None
        return functools.partial(_pre_logits, model.norm, model.fc_norm)

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        h, w = model.patch_embed.img_size
        return (model.patch_embed.proj.in_channels, h, w)
