"""Scores against slow references, and the selection rules' invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlprune.core import Plan, TokenState
from vlprune.core.scores import (
    AttnInputs,
    attn_entropy,
    cls_attn,
    cls_attn_vnorm,
    compute_scores,
    diversity_order,
    key_norm,
)
from vlprune.core.select import keep_count, prune_plan


def _inputs(B=2, H=3, N=11, D=8, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, B, H, N, D, generator=g, dtype=torch.float64).unbind(0)
    size = torch.randint(1, 5, (B, 1, 1, N), generator=g).double()
    return AttnInputs(q=q, k=k, v=v, scale=D**-0.5, bias=size.log() if bias else None)


def _full_attention(a: AttnInputs) -> torch.Tensor:
    """The slow way: the whole (B, H, N, N) eager attention matrix."""
    logits = torch.einsum("bhnd,bhmd->bhnm", a.q, a.k) * a.scale
    if a.bias is not None:
        logits = logits + a.bias
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("bias", [True, False])
def test_scores_match_eager_reference(bias):
    a = _inputs(bias=bias)
    full = _full_attention(a)  # (B, H, N, N)
    torch.testing.assert_close(cls_attn(a), full[:, :, 0].mean(1))
    ref_vnorm = (full[:, :, 0] * a.v.norm(dim=-1)).mean(1)
    torch.testing.assert_close(cls_attn_vnorm(a), ref_vnorm / ref_vnorm.sum(-1, keepdim=True))
    ref_entropy = -(full * full.log()).sum(-1).mean(1)
    torch.testing.assert_close(attn_entropy(a, chunk=4), -ref_entropy)  # chunked == whole
    torch.testing.assert_close(key_norm(a), a.k.norm(dim=-1).mean(1))


def test_cls_index_selects_the_row():
    a = _inputs()
    torch.testing.assert_close(cls_attn(a, cls_index=1), _full_attention(a)[:, :, 1].mean(1))


def _naive_fps(m: torch.Tensor, picks: int) -> list[int]:
    """Farthest-point selection one sample at a time, the obvious way: first the token
    farthest from its nearest neighbour (DivPrune's first pick)."""
    m = m / m.norm(dim=-1, keepdim=True)
    d = 1 - m @ m.T
    d.fill_diagonal_(float("inf"))
    first = int(d.min(dim=1).values.argmax())
    chosen = [first]
    while len(chosen) < picks:
        d = 1 - m @ m[chosen].T  # (n, len(chosen))
        d[chosen] = -float("inf")
        chosen.append(int(d.min(dim=1).values.argmax()))
    return chosen


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(3, 30), P=st.integers(0, 2), seed=st.integers(0, 999))
def test_diversity_matches_naive_farthest_point(B, N, P, seed):
    N = max(N, P + 3)  # two tokens tie exactly on the first pick
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(B, N, 6, generator=g, dtype=torch.float64)
    picks = max(1, (N - P) // 2)
    scores = diversity_order(metric, P, picks=picks)
    assert torch.isinf(scores[:, :P]).all() and (scores[:, :P] > 0).all()
    for b in range(B):
        order = scores[b, P:].argsort(descending=True)[:picks].tolist()
        assert order == _naive_fps(metric[b, P:], picks)


def test_random_scores_are_seeded():
    a = _inputs()
    s1 = compute_scores("random", a, num_protected=1, n_keep=3, key=5)
    s2 = compute_scores("random", a, num_protected=1, n_keep=3, key=5)
    s3 = compute_scores("random", a, num_protected=1, n_keep=3, key=6)
    s4 = compute_scores("random", a, num_protected=1, n_keep=3, key=5, stream=1)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3) and not torch.equal(s1, s4)
    with pytest.raises(ValueError, match="known scores"):
        compute_scores("nope", a, num_protected=1, n_keep=3)


def test_hash_uniform_is_uniform_and_the_same_for_int_and_tensor_keys():
    """The counter-based draws: in [0, 1), mean and spread of a uniform law (n = 2**16: the
    mean's standard error is 0.29 / 256 = 0.0011, so a 0.005 bound is > 4 sigma), no
    correlation between neighbours, and an int key gives what the same key as a tensor gives."""
    from vlprune.core.scores import hash_uniform

    u = hash_uniform(123, 0, (256, 256))
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    flat = u.flatten().double() - 0.5
    assert abs((flat[1:] * flat[:-1]).mean().item()) < 0.002  # lag-1 covariance ~ 0
    assert len(set(u.flatten().tolist())) > 0.99 * u.numel()
    torch.testing.assert_close(hash_uniform(torch.tensor(123), 0, (256, 256)), u, atol=0, rtol=0)
    assert not torch.equal(hash_uniform(124, 0, (256, 256)), u)


@pytest.mark.parametrize("keep, n, expected", [(0.7, 196, 138), (0.5, 196, 98), (1.0, 10, 10), (0.01, 10, 1)])
def test_keep_count(keep, n, expected):
    assert keep_count(n + 1, 1, keep) == expected


modes = st.sampled_from(["drop", "fuse", "recycle"])


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3), N=st.integers(2, 30), P=st.integers(0, 3), keep=st.floats(0.05, 1.0),
    mode=modes, seed=st.integers(0, 999),
)
def test_prune_plan_invariants(B, N, P, keep, mode, seed):
    P = min(P, N - 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, 4, generator=g, dtype=torch.float64)
    scores = torch.rand(B, N, generator=g, dtype=torch.float64)
    n_keep = keep_count(N, P, keep)
    plan = prune_plan(scores, n_keep, P, mode=mode, metric=x, fuse_weight=scores)
    n_drop = N - P - n_keep
    if n_drop == 0:
        assert plan is None
        return
    assert torch.equal(plan.keep[:, :P], torch.arange(P).expand(B, P))
    kept_sorted = plan.keep[:, P : P + n_keep]
    assert torch.equal(kept_sorted, kept_sorted.sort(dim=1).values)  # order preserved
    # the kept tokens are the best-scored unprotected ones
    best = scores[:, P:].topk(n_keep, dim=1).values.min(dim=1).values
    assert bool((scores.gather(1, kept_sorted) >= best[:, None]).all())
    state = TokenState(num_protected=P, trace_source=True)
    out = state.compact(plan, x)
    if mode == "drop":
        assert out.shape[1] == P + n_keep and state.size is None
        return
    # fuse and recycle account for every input token exactly once
    assert out.shape[1] == P + n_keep + (1 if mode == "fuse" else 0)
    size = state.size if state.size is not None else torch.ones(B, out.shape[1], 1, dtype=x.dtype)
    assert torch.allclose(size.sum(dim=1).squeeze(-1), torch.full((B,), float(N), dtype=x.dtype))
    assert torch.allclose(state.source.sum(dim=1), torch.ones(B, N, dtype=x.dtype))
    if mode == "fuse":  # the last token is the score-weighted sum of the dropped ones (EViT)
        dropped = state.source[:, -1] > 0
        assert dropped.sum(1).tolist() == [n_drop] * B
        expected = ((scores * dropped).unsqueeze(-1) * x).sum(1)
        torch.testing.assert_close(out[:, -1], expected)


def test_recycle_merges_into_most_similar_kept():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]]])
    scores = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # P=1: keep token 1 and the best of 2, 3
    plan = prune_plan(scores, 2, 1, mode="recycle", metric=x)
    assert plan.keep.tolist() == [[0, 1, 2]]
    assert plan.src.tolist() == [[3]] and plan.dst.tolist() == [[1]]  # 3 is closest to 1


def test_prune_plan_errors():
    with pytest.raises(ValueError, match="allowed"):
        prune_plan(torch.rand(1, 5), 2, 0, mode="nope")
    with pytest.raises(ValueError, match="metric"):
        prune_plan(torch.rand(1, 5), 2, 0, mode="recycle")


def _four_tokens():
    """A class token and 4 tokens of 2 channels; the class attention (heads averaged) to the
    class token itself and to tokens 1..4 is 0.2, 0.4, 0.1, 0.25, 0.05."""
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [2.0, -4.0], [0.0, 1.0], [10.0, 20.0]]])
    attn = torch.tensor([[0.2, 0.4, 0.1, 0.25, 0.05]])
    return x, attn


def test_fused_token_is_evit_attention_weighted_sum_by_hand():
    x, attn = _four_tokens()
    # keep 0.5 of 4: tokens 1 (0.4) and 3 (0.25) stay, 2 (0.1) and 4 (0.05) are fused:
    # 0.1 * (2, -4) + 0.05 * (10, 20) = (0.2 + 0.5, -0.4 + 1.0) = (0.7, 0.6), not renormalised
    plan = prune_plan(attn, keep_count(5, 1, 0.5), 1, mode="fuse", fuse_weight=attn)
    state = TokenState(num_protected=1)
    out = state.compact(plan, x)
    torch.testing.assert_close(out, torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [0.7, 0.6]]]))
    assert state.size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 2.0]
    assert state.attn_size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 1.0]
    # the sizes the dropped tokens carry add to its size, not to its value
    state = TokenState(num_protected=1, size=torch.tensor([[[1.0], [1.0], [3.0], [1.0], [2.0]]]))
    out = state.compact(plan, x)
    torch.testing.assert_close(out[0, -1], torch.tensor([0.7, 0.6]))
    assert state.size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 5.0]
    assert state.attn_size[0, -1, 0].item() == 1.0
    # one dropped token: it is still scaled by its attention, 0.05 * (10, 20)
    plan = prune_plan(attn, 3, 1, mode="fuse", fuse_weight=attn)
    state = TokenState(num_protected=1)
    out = state.compact(plan, x)
    assert plan.keep.tolist() == [[0, 1, 2, 3, 4]]
    torch.testing.assert_close(out[0, -1], torch.tensor([0.5, 1.0]))
    assert state.attn_size[0, :, 0].tolist() == [1.0] * 5


def test_fused_token_without_weights_is_size_weighted_mean_by_hand():
    x, attn = _four_tokens()
    # scores that are not class attention (key norm, random, guided) fuse by a mean:
    # (1 * (2, -4) + 3 * (10, 20)) / 4 = (8, 14) with token 4 holding 3 tokens
    state = TokenState(num_protected=1, size=torch.tensor([[[1.0], [1.0], [1.0], [1.0], [3.0]]]))
    out = state.compact(prune_plan(attn, 2, 1, mode="fuse"), x)
    torch.testing.assert_close(out[0, -1], torch.tensor([8.0, 14.0]))
    assert state.size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 4.0]
    assert state.attn_size[0, -1, 0].item() == 1.0


def test_fused_token_is_fresh_for_proportional_attention():
    x = torch.randn(1, 6, 4)
    scores = torch.tensor([[9.0, 5.0, 4.0, 0.1, 0.2, 0.3]])
    plan = prune_plan(scores, 2, 1, mode="fuse", fuse_weight=scores)
    state = TokenState(num_protected=1)
    state.compact(plan, x)
    assert state.size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 3.0]  # the fused token holds 3
    assert state.attn_bias(torch.float32).flatten().tolist() == [0.0, 0.0, 0.0, 0.0]
    # a later merge adds sizes to the fresh count, not to the held count
    merge = Plan(keep=torch.tensor([[0, 1, 3]]), src=torch.tensor([[2]]), dst=torch.tensor([[2]]), num_tokens=4)
    state.compact(merge, torch.randn(1, 4, 4))
    assert state.size[0, :, 0].tolist() == [1.0, 1.0, 4.0]
    assert state.attn_size[0, :, 0].tolist() == [1.0, 1.0, 2.0]
