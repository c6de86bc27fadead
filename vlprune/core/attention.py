"""Attention of the current tokens with a fused kernel: SDPA with a float mask, or FlexAttention.

Proportional attention (ToMe): a token that stands for ``s`` input tokens should receive ``s``
times the attention mass, which is the same as adding ``log(s)`` to its key's logits. Text
towers also mask padding keys and attend causally by position (a merged token keeps the latest
input position it holds). :class:`AttnSpec` describes all of that per key, ``(B, N)`` each,
without an ``N x N`` tensor, and :func:`attend` runs one attention call with it:

* ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` with the float mask
  :meth:`AttnSpec.dense` builds (``log(size)`` plus ``-inf`` where a key is masked). A float
  mask rules out the FlashAttention kernel on CUDA; on the CPU it is the fused kernel.
* ``"flex"``: :func:`torch.nn.attention.flex_attention.flex_attention` with a ``score_mod``
  adding ``log(size)[b, kv]`` and a block mask for padding and causality, so the GPU keeps a
  fused kernel. On CUDA it runs compiled (``torch.compile(flex_attention)``, compiled once and
  reused; token counts differ per layer, so torch marks the lengths dynamic after the second
  one). On the CPU it runs flex's unfused reference implementation (it materialises the
  scores: for tests and checks, not for speed); ``"auto"`` never picks it there.
* ``"auto"``: flex on CUDA when the spec has a bias or a mask, SDPA otherwise.

Where flex cannot run (no FlexAttention in the installed torch, dropout, a CPU backward, a
head dim under 16 on the GPU), :func:`attend` computes the same attention with SDPA; a
forced ``"flex"`` warns once per reason. Under a ``TorchDispatchMode`` (``FlopCounterMode``,
as in :func:`vlprune.describe`) SDPA runs too, silently: it counts the same FLOPs. A query row whose every key is masked gives zeros on
both paths (SDPA on the CPU and flex both return 0 there); the masks vlprune builds never have
such rows (BOS / [CLS] / the first real token is visible to every query).
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

BACKENDS = ("auto", "sdpa", "flex")


def size_bias(size: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``log(size)`` of ``(B, N, 1)`` token sizes as an additive key bias of shape ``(B, 1, 1, N)``."""
    bias = size.log().transpose(1, 2).unsqueeze(1)
    return bias if dtype is None else bias.to(dtype)


def combine_masks(attn_mask: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Add a float ``bias`` to an SDPA-style ``attn_mask`` (bool: True = attend, or float)."""
    if bias is None:
        return attn_mask
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
            ~attn_mask, float("-inf")
        )
    return attn_mask + bias


@dataclass(eq=False)
class MaskCache:
    """The masks built from one set of positions / padding: the dense float mask (for one
    dtype) and flex's block mask (for one shape and device). Attributes, not a dict: a dict
    mutated inside a ``torch.compile`` trace breaks the graph at the next context lookup."""

    dense: Tensor | None = None
    dense_dtype: torch.dtype | None = None
    block: object | None = None
    block_key: tuple | None = None


@dataclass(eq=False)
class AttnSpec:
    """What shapes the attention of the current ``N`` tokens, per key, for a batch of ``B``.

    Attributes:
        key_bias: ``(B, N)`` float, added to every query's logit of key ``n`` (proportional
            attention: ``log(size)``, float32 or float64 like the sizes), or ``None``.
        pos: ``(B, N)`` int, each token's input position: query ``q`` sees key ``k`` only when
            ``pos[b, k] <= pos[b, q]`` (causal by position), or ``None`` (bidirectional).
        valid: ``(B, N)`` bool, False for padding keys (never attended), or ``None``.
        cache: the masks built from ``pos`` / ``valid`` (with either); specs of the same
            tokens share it.
    """

    key_bias: Tensor | None = None
    pos: Tensor | None = None
    valid: Tensor | None = None
    cache: MaskCache | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.cache is None and self.masked:
            self.cache = MaskCache()  # (called here: torch.compile cannot trace a default_factory)
        self._dense: Tensor | None = None  # dense() for one dtype
        self._dense_dtype: torch.dtype | None = None

    @property
    def masked(self) -> bool:
        """True when some keys are hidden from some queries (padding or causality)."""
        return self.pos is not None or self.valid is not None

    @property
    def empty(self) -> bool:
        """True when the attention is plain attention (no bias, no mask)."""
        return self.key_bias is None and not self.masked

    def with_bias(self, key_bias: Tensor | None) -> AttnSpec:
        """The same masks (and their cache) with ``key_bias``."""
        return AttnSpec(key_bias=key_bias, pos=self.pos, valid=self.valid, cache=self.cache)

    def allowed(self) -> Tensor | None:
        """``(B, N, N)`` bool, True where query ``q`` (dim 1) may attend key ``k`` (dim 2)."""
        allowed = None
        if self.pos is not None:
            allowed = self.pos.unsqueeze(1) <= self.pos.unsqueeze(2)  # key pos <= query pos
        if self.valid is not None:
            keys = self.valid.unsqueeze(1)
            allowed = keys if allowed is None else allowed & keys
        return allowed

    def dense(self, dtype: torch.dtype) -> Tensor | None:
        """The SDPA float mask in ``dtype``: ``key_bias`` as ``(B, 1, 1, N)``, plus, with
        masks, ``-inf`` where a key is hidden, as ``(B, 1, N, N)``; ``None`` when empty."""
        if self._dense_dtype == dtype:
            return self._dense
        bias = None
        if self.key_bias is not None:
            bias = self.key_bias.unsqueeze(1).unsqueeze(1).to(dtype)
        mask = None
        if self.masked:
            cache = self.cache
            if cache.dense_dtype != dtype:
                allowed = self.allowed()
                mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
                cache.dense = mask.masked_fill_(~allowed, float("-inf")).unsqueeze(1)
                cache.dense_dtype = dtype
            mask = cache.dense
        out = mask if bias is None else bias if mask is None else mask + bias
        self._dense, self._dense_dtype = out, dtype
        return out

    def block_mask(self, q_len: int, kv_len: int, device: torch.device):
        """Flex's ``BlockMask`` of the padding / causal masks (``None`` without masks)."""
        if not self.masked:
            return None
        key = (q_len, kv_len, str(device))
        cache = self.cache
        if cache.block_key != key:
            from torch.nn.attention.flex_attention import create_block_mask

            ref = self.pos if self.pos is not None else self.valid
            cache.block = create_block_mask(_mask_mod(self.pos, self.valid), ref.shape[0], None,
                                            q_len, kv_len, device=device)
            cache.block_key = key
        return cache.block


def _mask_mod(pos: Tensor | None, valid: Tensor | None):
    if pos is not None and valid is not None:
        def mask_mod(b, h, q, k):
            return valid[b, k] & (pos[b, k] <= pos[b, q])
    elif pos is not None:
        def mask_mod(b, h, q, k):
            return pos[b, k] <= pos[b, q]
    else:
        def mask_mod(b, h, q, k):
            return valid[b, k]
    return mask_mod


def _bias_mod(bias: Tensor):
    def score_mod(score, b, h, q, k):
        return score + bias[b, k].to(score.dtype)
    return score_mod


def flex_available() -> bool:
    """Whether the installed torch has FlexAttention."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


_FLEX_COMPILES: bool | None = None


def _flex_compiles() -> bool:
    """FlexAttention and Triton are installed (looked up once)."""
    global _FLEX_COMPILES
    if _FLEX_COMPILES is None:
        _FLEX_COMPILES = flex_available() and _has_triton()
    return _FLEX_COMPILES


def resolve_backend(backend: str, device: torch.device, spec: AttnSpec | None) -> str:
    """``"sdpa"`` or ``"flex"``: what :func:`attend` tries for ``backend`` on ``device``
    (before the fallbacks of :func:`flex_problem`). ``"auto"``: flex on CUDA (with FlexAttention
    and Triton installed) when ``spec`` has a bias or a mask, else SDPA."""
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {list(BACKENDS)}, got {backend!r}")
    if spec is None or spec.empty or backend == "sdpa":
        return "sdpa"
    if backend == "flex":
        return "flex"
    return "flex" if device.type == "cuda" and _flex_compiles() else "sdpa"


def flex_problem(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> str | None:
    """Why flex cannot compute this attention (then SDPA does), or ``None`` when it can."""
    if not flex_available():
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if dropout_p > 0.0:
        return "FlexAttention has no attention dropout (training with attention dropout)"
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        return f"q, k, v of shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and grad:
        return "FlexAttention has no backward on the CPU"
    if q.device.type != "cpu" and min(q.shape[-1], v.shape[-1]) < 16:
        return f"FlexAttention's GPU kernel needs a head dim of at least 16, got {q.shape[-1]}"
    return None


def _measuring() -> bool:
    """True under a ``TorchDispatchMode`` (``FlopCounterMode``: ``describe``'s FLOP count),
    which FlexAttention's eager path cannot run under: SDPA counts the same attention."""
    if torch.compiler.is_compiling():
        return False
    try:
        from torch.utils._python_dispatch import is_in_torch_dispatch_mode
    except ImportError:
        return False
    return is_in_torch_dispatch_mode()


_WARNED: set[str] = set()
_LOCK = threading.Lock()
_COMPILED: dict[str, object] = {}


def _warn_once(key: str, message: str) -> None:
    if torch.compiler.is_compiling() or key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, stacklevel=4)


def _warn_fallback(reason: str) -> None:
    _warn_once(reason, f"attn_backend='flex': {reason}; this attention runs with "
               "scaled_dot_product_attention and the same float mask instead (same result, "
               "without the fused FlexAttention kernel)")


def _flex_fn(device: torch.device):
    """The flex callable for ``device``: compiled on CUDA (once per process; torch compiles
    again per new shape, then with dynamic lengths), flex's eager reference elsewhere (the
    CPU), flex itself inside a ``torch.compile`` trace (the trace compiles it)."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling() or device.type != "cuda":
        return flex_attention
    if not _flex_compiles():
        _warn_once("no triton", "attn_backend='flex' on CUDA without Triton: FlexAttention "
                   "cannot be compiled and runs its unfused reference implementation")
        return flex_attention
    with _LOCK:
        fn = _COMPILED.get(device.type)
        if fn is None:
            fn = _COMPILED[device.type] = torch.compile(flex_attention)
    return fn


def flex_attend(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec | None, scale: float | None = None) -> Tensor:
    """``(B, H, N, D)`` attention of ``q`` over ``k``, ``v`` with FlexAttention: ``spec``'s key
    bias as a ``score_mod``, its masks as a block mask."""
    score_mod = block_mask = None
    if spec is not None:
        if spec.key_bias is not None:
            score_mod = _bias_mod(spec.key_bias)
        block_mask = spec.block_mask(q.shape[-2], k.shape[-2], q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _flex_fn(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def sdpa_attend(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec | None, scale: float | None = None,
                dropout_p: float = 0.0) -> Tensor:
    """The same attention with ``scaled_dot_product_attention`` and :meth:`AttnSpec.dense`."""
    mask = None if spec is None else spec.dense(q.dtype)
    if scale is None:  # the exact call vlprune made before it had a flex path
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def attend(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec | None, *, scale: float | None = None,
           dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """Attention of ``q`` over ``k``, ``v`` (``(B, H, N, D)`` each) shaped by ``spec`` (a key
    bias, causal positions, padding; ``None``: plain attention), with ``backend``:
    ``"auto"``, ``"sdpa"`` or ``"flex"`` (see the module docstring). ``scale`` defaults to
    ``1 / sqrt(D)``. Returns ``(B, H, N, D)``."""
    if resolve_backend(backend, q.device, spec) == "flex" and not _measuring():
        problem = flex_problem(q, k, v, dropout_p)
        if problem is None:
            return flex_attend(q, k, v, spec, scale)
        if backend == "flex":
            _warn_fallback(problem)
    return sdpa_attend(q, k, v, spec, scale, dropout_p)


def uses_flex(backend: str, device: torch.device, spec: AttnSpec | None) -> bool:
    """Whether a patched attention module should compute its attention with :func:`attend`
    (flex would run) instead of handing :meth:`AttnSpec.dense` to the upstream attention."""
    return resolve_backend(backend, device, spec) == "flex"
