"""Token importance scores: one batched function each, higher means keep.

Every score takes what a self-attention block already has (per-head queries, keys and values
of shape ``(B, H, N, D)``, the softmax scale and the additive key bias of proportional
attention) and returns ``(B, N)``. None of them builds the full ``N x N`` attention matrix
except :func:`attn_entropy`, which needs every row and works through them in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AttnInputs:
    """What a patched attention module hands to the scoring code (references, no copies)."""

    q: Tensor  # (B, H, N, D), after any q-norm
    k: Tensor  # (B, H, N, D), after any k-norm
    v: Tensor  # (B, H, N, D)
    scale: float
    bias: Tensor | None = None  # additive mask (B, 1, 1, N) e.g. log(size), or (B, 1, N, N)

    def metric(self) -> Tensor:
        """Keys summed over heads ``(B, N, D)``: ToMe's similarity metric (the head mean up to
        a factor; every user of it compares directions, so the division is skipped)."""
        return head_sum(self.k)


def head_sum(k: Tensor) -> Tensor:
    """``k.sum(dim=1)`` of ``(B, H, N, D)`` keys. For float32 / float64 keys it adds one head
    after the other: keys are usually a strided view of the fused qkv projection, where
    torch's reduction over the head axis is several times slower than ``H - 1`` elementwise
    adds (the sums agree up to the order of the additions, i.e. in the last bit at most).
    Low-precision keys go through ``sum``, which accumulates in float32 and rounds once."""
    if k.dtype not in (torch.float32, torch.float64) or k.shape[1] < 2:
        return k.sum(dim=1)
    out = k[:, 0] + k[:, 1]
    for h in range(2, k.shape[1]):
        out += k[:, h]
    return out


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 when it is float16 / bfloat16 (scores rank tokens: low-precision
    softmax rows tie far more often), else as is."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _row_attention(a: AttnInputs, rows: slice | Tensor, k: Tensor | None = None) -> Tensor:
    """Softmax attention of the query rows ``rows`` to all keys: ``(B, H, R, N)``, in float32
    for low-precision inputs (``k``: the keys already widened, when the caller has them)."""
    k = _wide(a.k) if k is None else k
    logits = (_wide(a.q[:, :, rows]) * a.scale) @ k.transpose(-2, -1)
    if a.bias is not None:
        bias = a.bias if a.bias.shape[-2] == 1 else a.bias[:, :, rows]
        logits = logits + bias.to(logits.dtype)
    return logits.softmax(dim=-1)


def cls_attn(a: AttnInputs, cls_index: int = 0) -> Tensor:
    """Attention from the class token to every token, averaged over heads (EViT)."""
    return _row_attention(a, slice(cls_index, cls_index + 1))[:, :, 0].mean(dim=1)


def cls_attn_vnorm(a: AttnInputs, cls_index: int = 0) -> Tensor:
    """Class attention times the value norm, per head, normalised over tokens (ATS's
    significance score; ATS then samples an adaptive count, the callers here take a top-k)."""
    attn = _row_attention(a, slice(cls_index, cls_index + 1))[:, :, 0]  # (B, H, N)
    s = (attn * _wide(a.v).norm(dim=-1)).mean(dim=1)
    return s / s.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


def key_norm(a: AttnInputs) -> Tensor:
    """L2 norm of each token's key, averaged over heads."""
    return _wide(a.k).norm(dim=-1).mean(dim=1)


def attn_entropy(a: AttnInputs, chunk: int = 64) -> Tensor:
    """Negative entropy of each token's own attention row (focused tokens score high).

    Rows are computed ``chunk`` queries at a time so memory stays ``O(chunk x N)``.
    """
    N = a.q.shape[2]
    k = _wide(a.k)
    out = []
    for start in range(0, N, chunk):
        p = _row_attention(a, slice(start, min(start + chunk, N)), k)  # float32 at least
        ent = -(p * p.clamp_min(1e-12).log()).sum(dim=-1)  # (B, H, R)
        out.append(ent.mean(dim=1))
    return -torch.cat(out, dim=1)


def received_attn(a: AttnInputs, valid: Tensor | None = None, chunk: int = 64) -> Tensor:
    """Attention each token receives, summed over the query rows and averaged over heads
    (PoWER-BERT's significance score, LTP's importance score).

    ``valid`` (B, N) bool (padded sequences): only real tokens' rows count, so a row's scores
    do not depend on how much padding its batch neighbours forced on it. Rows are computed
    ``chunk`` queries at a time so memory stays ``O(chunk x N)``.
    """
    B, _, N, _ = a.q.shape
    total = a.q.new_zeros(B, N, dtype=torch.float32)
    k = _wide(a.k)
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        p = _row_attention(a, slice(start, stop), k).float().mean(dim=1)  # (B, R, N)
        if valid is not None:
            p = p * valid[:, start:stop].unsqueeze(-1).to(p.dtype)
        total = total + p.sum(dim=1)
    return total


_M32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9  # Weyl-sequence increment (2**32 / golden ratio)


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for int64 ``x`` holding 32-bit words, in 16-bit halves: no product
    reaches 2**63, so no signed overflow (which compiled and vectorised kernels do not all
    wrap the same way)."""
    return (((x & 0xFFFF) * c) + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit words: a bijection whose
    outputs for neighbouring inputs look independent."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _key_word(key: int | Tensor, device) -> Tensor:
    """A random key as one 32-bit word (int64 tensor): an int key's high bits hashed in (a key
    below 2**32 is its own word, as a tensor key is)."""
    if isinstance(key, Tensor):
        return key.to(device=device, dtype=torch.int64) & _M32
    key = int(key)
    lo, hi = key & _M32, (key >> 32) & _M32
    return torch.tensor(lo, device=device) ^ fmix32(torch.tensor(hi, device=device))


def hash_uniform(key: int | Tensor, stream: int, shape: tuple[int, ...], device=None) -> Tensor:
    """Uniform floats in [0, 1) of ``shape``, a pure function of ``(key, stream)``: hashed
    counters (a Weyl sequence through MurmurHash3's finaliser), no generator object. The same
    numbers on every device and under ``torch.compile`` (no state, no graph break); ``key``
    may be a scalar tensor, so a compiled graph takes a new key per call without
    recompiling."""
    count = 1
    for d in shape:
        count *= d
    base = fmix32(_key_word(key, device) ^ ((stream + 1) * 0x27D4EB2F & _M32))
    i = torch.arange(1, count + 1, device=device, dtype=torch.int64)
    h = fmix32((_mul32(i, _GOLDEN32) + base) & _M32)
    return ((h >> 8).to(torch.float32) * 2.0**-24).view(shape)  # 24 bits: exact in float32


def random_scores(
    a: AttnInputs, key: int | Tensor = 0, stream: int = 0, per_position: bool = False
) -> Tensor:
    """Uniform random scores: the honest baseline, a pure function of ``key`` (the call's
    random key: the seed) and ``stream`` (one per reduction layer), see :func:`hash_uniform`.

    ``per_position``: one draw per position, shared by every row (padded sequences: a row's
    choices then do not depend on its batch neighbours or its place in the batch)."""
    B, _, N, _ = a.k.shape
    if per_position:
        return hash_uniform(key, stream, (1, N), a.k.device).expand(B, N)
    return hash_uniform(key, stream, (B, N), a.k.device)


def step_key(seed: int, step: Tensor) -> Tensor:
    """The random key of training forward ``step`` (a scalar tensor, so a compiled graph takes
    each step without recompiling): a 32-bit word, different from step to step, the same
    sequence for the same seed."""
    word = _key_word(seed, step.device)
    return fmix32((_mul32(step.to(torch.int64) & _M32, _GOLDEN32) + fmix32(word ^ 0x5BD1E995)) & _M32)


def diversity_order(
    metric: Tensor, num_protected: int = 0, picks: int | None = None, valid: Tensor | None = None
) -> Tensor:
    """Farthest-point (max-min) selection over cosine distance of ``metric`` (B, N, C), as
    DivPrune (vbdi/divprune ``LlavaMetaForCausalLM.DivPrune``) picks: first the token farthest
    from its nearest other token, then each time the token whose distance to the nearest
    picked one is largest (the first such token on ties).

    Returns scores ``(B, N)`` where a higher score means picked earlier: the first ``n``
    unprotected tokens by score are the max-min diverse subset of size ``n``.
    Only ``picks`` tokens are picked (default: all); the rest score ``-inf``. Protected tokens
    score ``+inf``. ``valid`` (B, N) bool restricts the picks to real tokens (padding scores
    ``-inf``). Vectorised over the batch; loops over picks.
    """
    B, N, _ = metric.shape
    P = num_protected
    m = metric[:, P:]
    if m.dtype in (torch.float16, torch.bfloat16):  # distances need more precision than that
        m = m.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    n = m.shape[1]
    scores = torch.full((B, N), float("-inf"), device=metric.device)
    scores[:, :P] = float("inf")
    if n == 0:
        return scores
    batch = torch.arange(B, device=metric.device)
    # One Gram matrix up front; each pick then only reads a row of it.
    gram = m @ m.transpose(1, 2)  # (B, n, n) cosine similarities
    real = None if valid is None else valid[:, P:]
    # first pick: the token whose most similar other (real) token is least similar
    others = gram.masked_fill(torch.eye(n, dtype=torch.bool, device=metric.device), float("-inf"))
    if real is not None:
        others = others.masked_fill(~real[:, None, :], float("-inf"))
    nearest = others.amax(dim=2)
    if real is not None:
        nearest = nearest.masked_fill(~real, float("inf"))
    first = nearest.argmin(dim=1)
    min_dist = torch.full((B, n), float("inf"), device=metric.device, dtype=m.dtype)
    if real is not None:
        min_dist = min_dist.masked_fill(~real, float("-inf"))  # padding: never picked
    pick = first
    for step in range(n if picks is None else min(picks, n)):
        fresh = min_dist[batch, pick] > float("-inf")  # rows out of real tokens pick nothing
        scores[batch, P + pick] = torch.where(fresh, float(n - step), scores[batch, P + pick])
        min_dist = torch.minimum(min_dist, 1.0 - gram[batch, pick])
        min_dist[batch, pick] = float("-inf")  # chosen: never again
        pick = min_dist.argmax(dim=1)
    return scores


SCORE_NAMES = (
    "cls_attn", "cls_attn_vnorm", "key_norm", "attn_entropy", "received_attn", "random", "diversity",
)
NEEDS_CLASS_TOKEN = frozenset({"cls_attn", "cls_attn_vnorm"})


def compute_scores(
    name: str,
    a: AttnInputs,
    *,
    num_protected: int,
    n_keep: int,
    cls_index: int = 0,
    key: int | Tensor = 0,
    stream: int = 0,
    valid: Tensor | None = None,
) -> Tensor:
    """Scores ``(B, N)`` of the score called ``name`` (one of :data:`SCORE_NAMES`); ``valid``
    (padded sequences) matters to ``diversity``, whose picks must skip padding, to
    ``received_attn``, which counts the attention of real query rows only, and to ``random``,
    which then draws once per position for every row."""
    if name == "cls_attn":
        return cls_attn(a, cls_index)
    if name == "cls_attn_vnorm":
        return cls_attn_vnorm(a, cls_index)
    if name == "key_norm":
        return key_norm(a)
    if name == "attn_entropy":
        return attn_entropy(a)
    if name == "received_attn":
        return received_attn(a, valid)
    if name == "random":
        return random_scores(a, key, stream, per_position=valid is not None)
    if name == "diversity":
        return diversity_order(a.metric(), num_protected, picks=n_keep, valid=valid)
    raise ValueError(f"unknown score {name!r}; known scores: {list(SCORE_NAMES)}")
