"""open_clip image tower: ``open_clip.transformer.VisionTransformer`` (``model.visual``).

Reduction point: inside each ``ResidualAttentionBlock``, between the attention branch and
the MLP branch, as for timm. open_clip 3.x attends with ``nn.MultiheadAttention``; its fused
path takes no per-key bias and hands out no keys, so at layers that reduce (and after the
first merge, for proportional attention) the patched ``nn.MultiheadAttention`` computes the
same projections itself and attends with the size bias (``scaled_dot_product_attention`` with
a float mask, or FlexAttention: ``attn_backend``). Other layers run the upstream modules
untouched.

Text towers (``CLIP``'s own text transformer, ``TextTransformer`` of ``CustomTextCLIP`` or
alone) run the shared text path of :mod:`vlprune.adapters.text` when they reduce: tokens in
canonical order (BOS and the pooled EOT/last token protected, padding after the EOT dropped
first), attention masks built from the token state (causal by position, sizes), pooling at
the protected slot. Whole ``CLIP`` / ``CustomTextCLIP`` models get both towers, and
``guide="text"`` / ``"image"`` runs the guiding tower first (see :func:`guided_forward`).
CoCa-style appended class tokens, ``attn_pool`` and HF text encoders are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import ReductionConfig
from ..core.attention import attend
from ..core.scores import AttnInputs
from .base import (
    Adapter,
    PatchContext,
    RootMixin,
    UnsupportedModelError,
    class_path_in_mro,
    device_dtype,
    register_adapter,
    swap_class,
)
from .call import scoped
from .recompute import run_block
from .step import enter_block, pool_sizes, reduce_step, scoring_bias, weighted_mean
from .text import TextLayout, random_ids, start_text

_BLOCK_PARTS = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")


class _VisionMixin(RootMixin):
    """Model-level patch of open_clip ``VisionTransformer``."""

    def _vlprune_begin(self) -> None:
        # open_clip always prepends the class embedding: one protected token
        self._vlprune_start(1)

    def forward(self, x: Tensor):
        self._vlprune_begin()
        return super().forward(x)

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        self._vlprune_begin()
        self._vlprune_check_nlc(super().forward_intermediates, x, *args, **kwargs)
        return super().forward_intermediates(x, *args, **kwargs)

    def _global_pool(self, x: Tensor):
        ctx: PatchContext = self._vlprune
        if self.pool_type != "avg":
            return super()._global_pool(x)  # 'tok', 'none': sizes do not matter
        sizes = pool_sizes(ctx, x)  # raises on tokens that are not the latest forward's
        if sizes is None:
            return super()._global_pool(x)
        return weighted_mean(x[:, 1:], sizes[0][:, 1:]), x[:, 1:]


class _BlockMixin:
    """Patched ``ResidualAttentionBlock``. Follows ``open_clip/transformer.py``
    (open_clip_torch 3.3.0) ``ResidualAttentionBlock.forward`` for self-attention."""

    def forward(self, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        # a recompute under gradient checkpointing replays the first run (.recompute)
        return run_block(self._vlprune_ctx, self._vlprune_layer, q_x,
                         lambda: self._vlprune_forward(q_x, k_x, v_x, attn_mask))

    def _vlprune_forward(self, q_x: Tensor, k_x: Tensor | None, v_x: Tensor | None,
                         attn_mask: Tensor | None) -> Tensor:
        ctx: PatchContext = self._vlprune_ctx
        layer: int = self._vlprune_layer
        todo = enter_block(ctx, layer, q_x)
        if todo is None:
            out = super().forward(q_x, k_x=k_x, v_x=v_x, attn_mask=attn_mask)
            ctx.log(layer, q_x.shape[1], out.shape[1])
            return out
        reduce, spec = todo
        if attn_mask is not None or k_x is not None or v_x is not None:
            raise ValueError(
                "attn_mask and cross-attention inputs cannot be combined with token reduction; "
                "run inside `with vlprune.disabled(model):`"
            )
        n_in = q_x.shape[1]
        call = ctx.call
        call.capture, call.pending_spec = reduce, spec
        x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x)))
        if reduce:
            x = reduce_step(ctx, layer, x, call.take_attn())
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        ctx.log(layer, n_in, x.shape[1])
        return x


class _MHAMixin:
    """Patched ``nn.MultiheadAttention`` (batch-first self-attention with packed in-proj).

    When its block asks for q, k, v or passes an :class:`~vlprune.core.attention.AttnSpec`
    (size bias, text masks), follows ``torch.nn.functional.multi_head_attention_forward`` with
    one fused attention call (:func:`~vlprune.core.attention.attend`: SDPA with the float mask,
    or FlexAttention, as ``attn_backend`` says); otherwise the upstream forward (and its fast
    path) runs.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):
        ctx: PatchContext = self._vlprune_ctx
        call = ctx.call
        spec, capture = call.pending_spec, call.capture
        if spec is None and not capture:
            return super().forward(query, key, value, *args, **kwargs)
        call.pending_spec, call.capture = None, False
        if key is not query or value is not query:
            raise ValueError("vlprune's patched attention handles self-attention only")
        B, N, C = query.shape
        H = self.num_heads
        D = C // H
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        if capture:
            call.attn = AttnInputs(q=q, k=k, v=v, scale=D**-0.5, bias=scoring_bias(spec, q.dtype))
        out = attend(q, k, v, spec, dropout_p=self.dropout if self.training else 0.0,
                     backend=ctx.config.attn_backend)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C)), None


def _open_clip_version() -> str:
    import open_clip

    return getattr(open_clip, "__version__", "?")


@register_adapter
class OpenClipVisionAdapter(Adapter):
    name = "open_clip_vision"
    supported = (
        "open_clip_torch>=2.32 image tower (open_clip.transformer.VisionTransformer, i.e. "
        "model.visual) with ResidualAttentionBlock and nn.MultiheadAttention, tok/avg pooling"
    )

    def matches(self, model: nn.Module) -> bool:
        return "open_clip.transformer.VisionTransformer" in class_path_in_mro(model)

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        check_vision_tower(model, config, "", self.supported)

    def num_layers(self, model: nn.Module) -> int:
        return len(model.transformer.resblocks)

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        patch_vision_tower(model, ctx)

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        h, w = model.image_size
        return (model.conv1.in_channels, h, w)


def check_transformer(tr: nn.Module, where: str, supported: str) -> None:
    """Fail loudly on an open_clip ``Transformer`` whose blocks or attention we do not know
    (upstream main replaced ``nn.MultiheadAttention`` by its own ``Attention`` class)."""
    from open_clip.transformer import ResidualAttentionBlock

    if tr is None or not getattr(tr, "batch_first", False):
        raise UnsupportedModelError(
            f"open_clip {_open_clip_version()}: expected a batch-first `{where}transformer`; {supported}"
        )
    for i, blk in enumerate(tr.resblocks):
        if type(blk).forward is not ResidualAttentionBlock.forward or hasattr(blk, "ln_1_kv") or not all(
            hasattr(blk, n) for n in _BLOCK_PARTS
        ):
            raise UnsupportedModelError(
                f"{where}transformer.resblocks[{i}] is {type(blk).__qualname__}; supported: "
                f"ResidualAttentionBlock (not the custom qk-norm/scaled-cosine block). "
                f"Supported: {supported}"
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
                f"{where}transformer.resblocks[{i}].attn is {type(mha).__qualname__} with a layout "
                "vlprune does not know (needs batch-first nn.MultiheadAttention with packed "
                f"q/k/v projections, no bias_k/bias_v, no zero attention). {supported}"
            )


def check_vision_tower(model: nn.Module, config: ReductionConfig, where: str, supported: str) -> None:
    check_transformer(getattr(model, "transformer", None), where, supported)
    if getattr(model, "attn_pool", None) is not None and not config.is_identity:
        raise UnsupportedModelError(
            f"{where}attn_pool: open_clip attentional pooling (CoCa) takes no key bias, so merged "
            "tokens would be weighted wrongly; reduction is not supported on this tower"
        )


def _patch_blocks(tr: nn.Module, ctx: PatchContext) -> None:
    for i, blk in enumerate(tr.resblocks):
        swap_class(blk, _BlockMixin, ctx, layer=i)
        swap_class(blk.attn, _MHAMixin, ctx)


def patch_vision_tower(visual: nn.Module, ctx: PatchContext) -> None:
    """Patch an open_clip ``VisionTransformer`` (alone or as ``model.visual``) with ``ctx``."""
    swap_class(visual, _VisionMixin, ctx)
    visual.__dict__["_vlprune"] = ctx
    _patch_blocks(visual.transformer, ctx)


# ---- text towers ---------------------------------------------------------------------------


def _layout(causal: bool, pool_type: str, eos_id: int | None) -> TextLayout:
    # causal CLIP towers start with BOS; bidirectional ones (SigLIP) pool the last token
    return TextLayout(causal=causal, pool=pool_type, eos_id=eos_id, protect_first=causal)


def _project(x: Tensor, proj) -> Tensor:
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def _reduced_text(ctx: PatchContext, tr: nn.Module, ln_final: nn.Module, x: Tensor, text: Tensor,
                  layout: TextLayout, padding: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The transformer and final norm of a reducing text tower on embeddings ``x``: returns
    (pooled token before projection, all tokens)."""
    x, slot = start_text(ctx, x, text, layout, padding, training=tr.training)
    x = ln_final(tr(x, attn_mask=None))
    return x[:, slot], x


class _TextTransformerMixin(RootMixin):
    """Patched open_clip ``TextTransformer`` (``CustomTextCLIP.text`` or alone). Follows
    ``TextTransformer.forward`` of open_clip_torch 3.3.0 when the tower reduces."""

    def forward(self, text: Tensor):
        ctx: PatchContext = self._vlprune_ctx
        if not ctx.reduces:
            ctx.call.state = None
            return super().forward(text)
        if self.cls_emb is not None:
            raise ValueError("a text tower with an appended class token (CoCa) cannot reduce tokens")
        x, _ = self._embeds(text)
        padding = text != self.pad_id if getattr(self, "use_pad_mask", False) else None
        layout = _layout(self.attn_mask is not None, self.pool_type, getattr(self, "eos_id", None))
        pooled, tokens = _reduced_text(ctx, self.transformer, self.ln_final, x, text, layout, padding)
        pooled = _project(pooled, self.text_projection)
        return (pooled, tokens) if self.output_tokens else pooled

    def _vlprune_project(self, x: Tensor) -> Tensor:
        return _project(self.ln_final(x), self.text_projection)


def check_text_transformer(text: nn.Module, config: ReductionConfig, where: str, supported: str) -> None:
    check_transformer(getattr(text, "transformer", None), where, supported)
    if getattr(text, "cls_emb", None) is not None and not config.is_identity:
        raise UnsupportedModelError(f"{where}: a text tower with an appended class token (CoCa) is not supported")
    if text.pool_type == "none":
        raise UnsupportedModelError(f"{where}: text pool_type 'none' has no pooled token to protect")
    if config.prune_fuse:
        raise ValueError("prune_fuse is not available in a text tower (padded sequences); use drop or prune_recycle")


def _text_project(model: nn.Module, x: Tensor) -> Tensor:
    return _project(model.ln_final(x), model.text_projection)


def _image_project(visual: nn.Module, x: Tensor) -> Tensor:
    x = visual.ln_post(x)
    return x if visual.proj is None else x @ visual.proj


class _ClipMixin(RootMixin):
    """Patched open_clip ``CLIP`` / ``CustomTextCLIP``: both towers, guided dropping."""

    def encode_text(self, text: Tensor, normalize: bool = False):
        if not hasattr(self, "token_embedding"):  # CustomTextCLIP: the text tower is patched
            return super().encode_text(text, normalize=normalize)
        ctx: PatchContext = self._vlprune.children["text"]
        if not ctx.reduces:
            ctx.call.state = None
            return super().encode_text(text, normalize=normalize)
        # follows CLIP.encode_text of open_clip_torch 3.3.0
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding.to(cast_dtype)
        layout = _layout(self.attn_mask is not None, self.text_pool_type, getattr(self, "text_eos_id", None))
        pooled, _ = _reduced_text(ctx, self.transformer, self.ln_final, x, text, layout)
        x = _project(pooled, self.text_projection)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, image: Tensor | None = None, text: Tensor | None = None):
        return guided_forward(self, super().forward, image, text)

    def _vlprune_project_text(self, x: Tensor) -> Tensor:
        if hasattr(self, "token_embedding"):
            return _text_project(self, x)
        return _text_project(self.text, x)

    def _vlprune_project_image(self, x: Tensor) -> Tensor:
        return _image_project(self.visual, x)


def _features(out, key: str, index: int) -> Tensor:
    return out[key] if isinstance(out, dict) else out[index]


def guided_forward(model: nn.Module, forward, image, text):
    """Two-tower forward with cross-modal guidance: the guiding tower runs first on its own
    (``forward(image=None, text=text)`` or the other way round), its normalised embeddings
    guide the other tower's pruning, then the guided tower runs; the two outputs are merged
    into the one the model returns. Without guidance, or with one modality, ``forward`` runs
    as is."""
    ctx: PatchContext = model._vlprune
    guided = next((c for c in ctx.children.values() if c.guided_by), None)
    if guided is None or not guided.reduces or image is None or text is None:
        return forward(image=image, text=text)
    inputs = {"image": image, "text": text}
    lead = "text" if guided.tower == "image" else "image"  # the guiding modality runs first
    first = forward(**{**inputs, guided.tower: None})
    embeds = _features(first, f"{lead}_features", 0 if lead == "image" else 1).detach()
    with scoped([guided.key], "guide", embeds):  # this call's guide, in this thread only
        second = forward(**{**inputs, lead: None})
    img_out, txt_out = (second, first) if lead == "text" else (first, second)
    if isinstance(img_out, dict):
        return {**img_out, "text_features": txt_out["text_features"]}
    return (img_out[0], txt_out[1], *img_out[2:])


@register_adapter
class OpenClipTextAdapter(Adapter):
    name = "open_clip_text"
    supported = (
        "open_clip_torch>=2.32 text tower (open_clip.transformer.TextTransformer) with "
        "ResidualAttentionBlock and nn.MultiheadAttention, argmax/eos/first/last pooling"
    )
    towers = ("text",)

    def matches(self, model: nn.Module) -> bool:
        return "open_clip.transformer.TextTransformer" in class_path_in_mro(model)

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        check_text_transformer(model, config.for_tower("text", False), "", self.supported)

    def num_layers(self, model: nn.Module) -> int:
        return len(model.transformer.resblocks)

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        model.__dict__["_vlprune"] = ctx
        text = ctx.children["text"]
        swap_class(model, _TextTransformerMixin, text)
        _patch_blocks(model.transformer, text)
        text.project = model._vlprune_project

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        return (model.context_length,)

    def example_input(self, model, batch_size=1, input_size=None):
        device, _ = device_dtype(model)
        length = (input_size or self.default_input_size(model))[0]
        layout = _layout(model.attn_mask is not None, model.pool_type, getattr(model, "eos_id", None))
        return random_ids(batch_size, length, model.vocab_size, layout, device)


@register_adapter
class OpenClipAdapter(Adapter):
    name = "open_clip"
    supported = (
        "open_clip_torch>=2.32 CLIP and CustomTextCLIP (image tower VisionTransformer, text tower "
        "of CLIP or TextTransformer), blocks with nn.MultiheadAttention"
    )
    towers = ("image", "text")

    def matches(self, model: nn.Module) -> bool:
        paths = class_path_in_mro(model)
        return "open_clip.model.CLIP" in paths or "open_clip.model.CustomTextCLIP" in paths

    def check(self, model: nn.Module, config: ReductionConfig) -> None:
        visual = getattr(model, "visual", None)
        if "open_clip.transformer.VisionTransformer" not in class_path_in_mro(visual):
            raise UnsupportedModelError(
                f"{type(model).__name__}.visual is {type(visual).__name__}; supported image tower: "
                f"open_clip VisionTransformer (timm and ModifiedResNet towers are not). {self.supported}"
            )
        check_vision_tower(visual, config.for_tower("image", True), "visual.", self.supported)
        text_cfg = config.for_tower("text", True)
        if hasattr(model, "token_embedding"):
            check_transformer(model.transformer, "", self.supported)
            if model.text_pool_type == "none":
                raise UnsupportedModelError("text pool_type 'none' has no pooled token to protect")
        else:
            text = getattr(model, "text", None)
            if "open_clip.transformer.TextTransformer" not in class_path_in_mro(text):
                raise UnsupportedModelError(
                    f"{type(model).__name__}.text is {type(text).__name__}; supported text tower: "
                    f"open_clip TextTransformer (HF text encoders are not). {self.supported}"
                )
            check_text_transformer(text, text_cfg, "text.", self.supported)

    def num_layers(self, model: nn.Module) -> int:
        return self.tower_layers(model, "image") + self.tower_layers(model, "text")

    def tower_layers(self, model: nn.Module, tower: str) -> int:
        if tower == "image":
            return len(model.visual.transformer.resblocks)
        tr = model.transformer if hasattr(model, "token_embedding") else model.text.transformer
        return len(tr.resblocks)

    def apply(self, model: nn.Module, ctx: PatchContext) -> None:
        image, text = ctx.children["image"], ctx.children["text"]
        swap_class(model, _ClipMixin, ctx)
        model.__dict__["_vlprune"] = ctx
        patch_vision_tower(model.visual, image)
        if hasattr(model, "token_embedding"):
            _patch_blocks(model.transformer, text)
        else:
            swap_class(model.text, _TextTransformerMixin, text)
            _patch_blocks(model.text.transformer, text)
        image.project = model._vlprune_project_image
        text.project = model._vlprune_project_text

    def default_input_size(self, model: nn.Module) -> tuple[int, ...]:
        h, w = model.visual.image_size
        return (model.visual.conv1.in_channels, h, w)

    def example_input(self, model, batch_size=1, input_size=None):
        device, dtype = device_dtype(model)
        size = input_size or self.default_input_size(model)
        if hasattr(model, "token_embedding"):
            length, vocab = model.context_length, model.vocab_size
            layout = _layout(model.attn_mask is not None, model.text_pool_type,
                             getattr(model, "text_eos_id", None))
        else:
            t = model.text
            length, vocab = t.context_length, t.vocab_size
            layout = _layout(t.attn_mask is not None, t.pool_type, getattr(t, "eos_id", None))
        return {
            "image": torch.randn(batch_size, *size, device=device, dtype=dtype),
            "text": random_ids(batch_size, length, vocab, layout, device),
        }
