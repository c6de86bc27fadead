"""open_clip image tower: ``open_clip.transformer.VisionTransformer`` (``model.visual``).

Reduction point: inside each ``ResidualAttentionBlock``, between the attention branch and
the MLP branch, as for timm. open_clip 3.x attends with ``nn.MultiheadAttention``; its fused
path takes no per-key bias and hands out no keys, so at layers that reduce (and after the
first merge, for proportional attention) the patched ``nn.MultiheadAttention`` computes the
same projections itself and calls ``scaled_dot_product_attention`` with the size bias. Other
layers run the upstream modules untouched.

The text tower (causal mask, EOT pooling) is not supported yet: patching a whole ``CLIP``
is refused with a message pointing at ``model.visual``.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from ..config import ReductionConfig
from ..core.scores import AttnInputs
from .base import (
    Adapter,
    PatchContext,
    RootMixin,
    UnsupportedModelError,
    class_path_in_mro,
    register_adapter,
    swap_class,
)
from .step import enter_block, reduce_step

_BLOCK_PARTS = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")


class _VisionMixin(RootMixin):
    """Model-level patch of open_clip ``VisionTransformer``."""

    def _vlprune_begin(self) -> None:
        # open_clip always prepends the class embedding: one protected token
        self._vlprune_start(1, self.transformer.grad_checkpointing)

    def forward(self, x: Tensor):
        self._vlprune_begin()
        return super().forward(x)

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        self._vlprune_begin()
        self._vlprune_check_nlc(super().forward_intermediates, x, *args, **kwargs)
        return super().forward_intermediates(x, *args, **kwargs)

    def _global_pool(self, x: Tensor):
        ctx: PatchContext = self._vlprune
        size = ctx.state.size if ctx.enabled and ctx.state is not None else None
        if self.pool_type != "avg" or size is None or tuple(size.shape[:2]) != tuple(x.shape[:2]):
            return super()._global_pool(x)
        s = size[:, 1:]
        return (x[:, 1:] * s).sum(dim=1) / s.sum(dim=1), x[:, 1:]


class _BlockMixin:
    """Patched ``ResidualAttentionBlock``. Follows ``open_clip/transformer.py``
    (open_clip_torch 3.3.0) ``ResidualAttentionBlock.forward`` for self-attention."""

    def forward(self, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        ctx: PatchContext = self._vlprune_ctx
        layer: int = self._vlprune_layer
        todo = enter_block(ctx, layer, q_x)
        if todo is None:
            out = super().forward(q_x, k_x=k_x, v_x=v_x, attn_mask=attn_mask)
            ctx.log(layer, q_x.shape[1], out.shape[1])
            return out
        reduce, bias = todo
        if attn_mask is not None or k_x is not None or v_x is not None:
            raise ValueError(
                "attn_mask and cross-attention inputs cannot be combined with token reduction; "
                "run inside `with vlprune.disabled(model):`"
            )
        n_in = q_x.shape[1]
        ctx.capture = reduce
        ctx.pending_bias = bias
        x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x)))
        if reduce:
            x = reduce_step(ctx, layer, x, ctx.take_attn())
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        ctx.log(layer, n_in, x.shape[1])
        return x


class _MHAMixin:
    """Patched ``nn.MultiheadAttention`` (batch-first self-attention with packed in-proj).

    When its block asks for q, k, v or passes a size bias, follows
    ``torch.nn.functional.multi_head_attention_forward`` with one fused SDPA call;
    otherwise the upstream forward (and its fast path) runs.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):
        ctx: PatchContext = self._vlprune_ctx
        bias, capture = ctx.pending_bias, ctx.capture
        if bias is None and not capture:
            return super().forward(query, key, value, *args, **kwargs)
        ctx.pending_bias, ctx.capture = None, False
        if key is not query or value is not query:
            raise ValueError("vlprune's patched attention handles self-attention only")
        B, N, C = query.shape
        H = self.num_heads
        D = C // H
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        if capture:
            ctx.attn = AttnInputs(q=q, k=k, v=v, scale=D**-0.5, bias=bias)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C)), None


def _open_clip_version() -> str:
    import open_clip

    return getattr(open_clip, "__version__", "?")


@register_adapter
class OpenClipVisionAdapter(Adapter):
    name = "open_clip_vision"
    supported = (
        "open_clip_torch>=2.24 image tower (open_clip.transformer.VisionTransformer, i.e. "
        "model.visual) with ResidualAttentionBlock and nn.MultiheadAttention, tok/avg pooling"
    )

    def matches(self, model: nn.Module) -> bool:
        paths = class_path_in_mro(model)
        if any(p.startswith("open_clip.") and p.endswith((".CLIP", ".CustomTextCLIP")) for p in paths):
            raise UnsupportedModelError(
                f"{type(model).__name__}: vlprune supports the open_clip image tower for now; "
                "patch model.visual (vlprune.patch(model.visual, ...)). The text tower is not "
                "supported yet."
            )
        return "open_clip.transformer.VisionTransformer" in paths

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        from open_clip.transformer import ResidualAttentionBlock

        tr = getattr(model, "transformer", None)
        if tr is None or not getattr(tr, "batch_first", False):
            raise UnsupportedModelError(
                f"open_clip {_open_clip_version()}: expected a batch-first `transformer`; "
                + self.supported
            )
        for i, blk in enumerate(tr.resblocks):
            if type(blk).forward is not ResidualAttentionBlock.forward or hasattr(blk, "ln_1_kv") or not all(
                hasattr(blk, n) for n in _BLOCK_PARTS
            ):
                raise UnsupportedModelError(
                    f"transformer.resblocks[{i}] is {type(blk).__qualname__}; supported: "
                    f"ResidualAttentionBlock (not the custom qk-norm/scaled-cosine block). "
                    f"Supported: {self.supported}"
                )
            mha = blk.attn
            if not (
                type(mha).forward is nn.MultiheadAttention.forward
                and mha.batch_first
                and mha._qkv_same_embed_dim
                and mha.bias_k is None
                and mha.bias_v is None
                and not mha.add_zero_attn
            ):
                raise UnsupportedModelError(
                    f"transformer.resblocks[{i}].attn is {type(mha).__qualname__} with a layout "
                    "vlprune does not know (needs batch-first nn.MultiheadAttention with packed "
                    f"q/k/v projections, no bias_k/bias_v, no zero attention). {self.supported}"
                )
        if getattr(model, "attn_pool", None) is not None and not config.is_identity:
            raise UnsupportedModelError(
                "open_clip attentional pooling (CoCa) takes no key bias, so merged tokens would be "
                "weighted wrongly; reduction is not supported on this tower"
            )

    def num_layers(self, model: nn.Module) -> int:
        return len(model.transformer.resblocks)

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        swap_class(model, _VisionMixin, ctx)
        model.__dict__["_vlprune"] = ctx
        for i, blk in enumerate(model.transformer.resblocks):
            swap_class(blk, _BlockMixin, ctx, layer=i)
            swap_class(blk.attn, _MHAMixin, ctx)

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        h, w = model.image_size
        return (model.conv1.in_channels, h, w)
