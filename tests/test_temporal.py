"""Temporal merging of (B, T, N, D) frame streams: repeated frames collapse, moving content
stays, chains end in their survivor, sizes and sources add up."""

from __future__ import annotations

import pytest
import torch

import vlprune
from vlprune.merging import bipartite_soft_matching

B, T, N, D = 2, 5, 16, 8


def _frames(seed=0, b=B, t=T, n=N, d=D):
    return torch.randn(b, t, n, d, generator=torch.Generator().manual_seed(seed))


def _repeated(seed=0):
    """Each row is one frame repeated T times."""
    return _frames(seed, t=1).expand(B, T, N, D).contiguous()


def _moving(seed=0):
    """A static textured background; one distinct patch at position 2 * t in frame t."""
    x = _frames(seed, t=1).expand(B, T, N, D).clone()
    obj = 10 * torch.ones(D)
    for t in range(T):
        x[:, t, 2 * t] = obj
    return x


def _check_partition(res, x, sizes=None):
    """Every input token is held by exactly one output token; outputs are the size-weighted
    means of what they hold; sizes add up."""
    b, t, n, _ = x.shape
    src = res.source
    assert src.shape == (b, res.tokens.shape[1], t, n)
    assert torch.equal(src.sum(dim=1), torch.ones(b, t, n, dtype=torch.long))
    w = torch.ones(b, t, n) if sizes is None else sizes
    for r in range(b):
        for k in range(res.counts[r]):
            held = src[r, k]
            mean = (x[r][held] * w[r][held][:, None]).sum(0) / w[r][held].sum()
            torch.testing.assert_close(res.tokens[r, k], mean)
            torch.testing.assert_close(res.size[r, k], w[r][held].sum())
    torch.testing.assert_close(res.size.sum(), w.sum())


def test_repeated_frames_collapse_to_one_frame():
    x = _repeated()
    res = vlprune.temporal_merge(x, keep=1)
    # frame 0 keeps all; every later frame keeps its one budgeted token
    assert res.counts == [N + T - 1] * B and res.valid is None
    _check_partition(res, x)
    # sizes per spatial position sum to T (each position's T copies end up in one place)
    per_pos = torch.zeros(B, N)
    for r in range(B):
        for k in range(res.counts[r]):
            pos = res.source[r, k].any(dim=0)
            per_pos[r] += res.size[r, k] * pos / pos.sum()
    assert torch.equal(per_pos, torch.full((B, N), float(T)))
    # threshold mode collapses to exactly one frame's tokens, all of frame 0
    res = vlprune.temporal_merge(x, threshold=0.99)
    assert res.counts == [N] * B
    assert torch.equal(res.frame, torch.zeros(B, N, dtype=torch.long))
    torch.testing.assert_close(res.tokens, x[:, 0])
    assert torch.equal(res.size, torch.full((B, N), float(T)))
    assert res.coverage().all()


def test_moving_object_keeps_a_token_in_every_frame():
    x = _moving()
    res = vlprune.temporal_merge(x, keep=2)
    _check_partition(res, x)
    for r in range(B):
        for t in range(T):
            k = int(res.assign[r, t, 2 * t])  # the output token holding the object in frame t
            assert int(res.frame[r, k]) == t
            assert int(res.size[r, k]) == 1
            torch.testing.assert_close(res.tokens[r, k], 10 * torch.ones(D))
    # threshold mode: the object's place and the place it left survive, the rest collapses
    res = vlprune.temporal_merge(x, threshold=0.9)
    assert res.counts == [N + 2 * (T - 1)] * B
    # global matching finds the object in the previous frame: it merges, as documented
    res = vlprune.temporal_merge(x, keep=1, match="global")
    for t in range(T):
        assert int(res.frame[0, res.assign[0, t, 2 * t]]) == 0


def test_no_reduction_is_identical():
    x = _frames(1)
    res = vlprune.temporal_merge(x, keep=1.0)
    assert torch.equal(res.tokens, x.reshape(B, T * N, D))
    assert torch.equal(res.size, torch.ones(B, T * N))
    assert torch.equal(res.frame, torch.arange(T).repeat_interleave(N).expand(B, -1))
    assert torch.equal(res.assign.view(B, -1), torch.arange(T * N).expand(B, -1))
    res = vlprune.temporal_merge(x, keep=N)
    assert torch.equal(res.tokens, x.reshape(B, T * N, D))
    # one frame: nothing to compare with
    res = vlprune.temporal_merge(x[:, :1], keep=1)
    assert torch.equal(res.tokens, x[:, 0])


def test_budget_sizes_coverage_and_row_independence():
    x = _frames(2) + 3 * _frames(3, t=1)  # correlated frames
    sizes = torch.rand(B, T, N, generator=torch.Generator().manual_seed(4)) + 0.5
    res = vlprune.temporal_merge(x, keep=0.25, sizes=sizes)
    assert res.counts == [N + (T - 1) * 4] * B
    _check_partition(res, x, sizes)
    cov = res.coverage()
    # a token covers its own frame and, if it holds more, later frames only
    assert cov[torch.arange(B)[:, None], torch.arange(res.tokens.shape[1])[None], res.frame].all()
    first = cov.float().argmax(dim=-1)
    assert torch.equal(first, res.frame)
    # each row on its own gives the same
    for r in range(B):
        alone = vlprune.temporal_merge(x[r : r + 1], keep=0.25, sizes=sizes[r : r + 1])
        assert torch.equal(alone.tokens[0], res.tokens[r])
        assert torch.equal(alone.assign[0], res.assign[r])


def test_chains_end_in_the_survivor():
    # frames 0, 1, 2 equal except for one token per frame; with keep=1 frame 2's copies merge
    # into frame 1's tokens, which merged into frame 0's: they must end in frame 0
    x = _repeated()[:, :3]
    x[:, 1:, 5] += 5  # changes at frame 1 and stays
    x[:, 2, 9] += 5
    res = vlprune.temporal_merge(x, keep=1)
    assert res.counts == [N + 2] * B
    for r in range(B):
        for n in range(N):
            if n in (5, 9):
                continue
            assert int(res.frame[r, res.assign[r, 2, n]]) == 0
        # frame 2 at 5 matches frame 1's changed token (kept): it joins that one, in frame 1
        assert int(res.frame[r, res.assign[r, 2, 5]]) == 1
        assert int(res.frame[r, res.assign[r, 2, 9]]) == 2
        assert res.coverage()[r, res.assign[r, 0, 0]].all()


def test_threshold_mode_pads_rows():
    x = _repeated()
    x[1, 2:] += 5 * _frames(5, b=1, t=1)[0]  # row 1 changes at frame 2
    res = vlprune.temporal_merge(x, threshold=0.95)
    assert res.counts == [N, 2 * N]
    assert res.valid is not None and res.valid.sum(dim=1).tolist() == [N, 2 * N]
    assert not res.valid[0, N:].any() and (res.frame[0, N:] == -1).all()
    assert torch.equal(res.size[0, N:], torch.zeros(N))
    _check_partition(res, x)
    assert [r.shape[0] for r in res.rows()] == [N, 2 * N]
    # threshold -1 merges everything into frame 0, threshold 1 (nearly) nothing on noise
    assert vlprune.temporal_merge(_frames(6), threshold=-1.0).counts == [N] * B
    assert vlprune.temporal_merge(_frames(6), threshold=1.0).counts == [T * N] * B


def test_spatial_merging_first():
    # a background of identical neighbour pairs (what ToMe merges first) and the moving object
    x = _frames(7, t=1, n=N // 2).repeat_interleave(2, dim=2).expand(B, T, N, D).clone()
    for t in range(T):
        x[:, t, 2 * t] = 10 * torch.ones(D)
    res = vlprune.temporal_merge(x, keep=2, spatial_r=4)
    n = N - 4
    assert res.counts == [n + (T - 1) * 2] * B
    _check_partition(res, x)
    # without temporal merging, frame 0 is ToMe on frame 0 alone
    plan = bipartite_soft_matching(x[:, 0], 4)
    ref, _ = plan.apply(x[:, 0])
    torch.testing.assert_close(vlprune.temporal_merge(x, keep=1.0, spatial_r=4).tokens[:, :n], ref)
    # the object still has a token of its own in every frame
    for r in range(B):
        for t in range(T):
            k = res.assign[r, t, 2 * t]
            assert int(res.frame[r, k]) == t and float(res.size[r, k]) == 1.0
            torch.testing.assert_close(res.tokens[r, k], 10 * torch.ones(D))
    # spatial_r is capped at half the tokens
    assert vlprune.temporal_merge(x, keep=1.0, spatial_r=100).counts == [T * N // 2] * B


def test_metric_and_dtype():
    x = _repeated().to(torch.bfloat16)
    metric = torch.randn(B, T, N, 4)  # unrelated metric: nothing is redundant by it
    res = vlprune.temporal_merge(x, threshold=0.999, metric=metric)
    assert res.counts == [T * N] * B and res.tokens.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=torch.zeros(2, 3, 4)), r"\(B, T, N, D\)"),
    (dict(), "exactly one of keep"),
    (dict(keep=0.5, threshold=0.5), "exactly one of keep"),
    (dict(keep=0), "keeps no token"),
    (dict(keep=N + 1), f"each frame has only {N} tokens"),
    (dict(keep=1.5), r"float ratio in \(0, 1\]"),
    (dict(keep=0.0), r"float ratio in \(0, 1\]"),
    (dict(keep=True), "int count >= 1 or a float ratio"),
    (dict(keep=N // 2 + 1, spatial_r=N // 2), f"each frame has only {N - N // 2} tokens"),
    (dict(threshold=1.5), r"\[-1, 1\]"),
    (dict(threshold=-2), r"\[-1, 1\]"),
    (dict(keep=1, spatial_r=-1), "spatial_r"),
    (dict(keep=1, match="nearest"), "unknown match"),
    (dict(keep=1, metric=torch.zeros(B, T, N + 1, 3)), "metric"),
    (dict(keep=1, sizes=torch.ones(B, T)), "sizes"),
])
def test_errors(kwargs, match):
    kwargs.setdefault("x", _frames())
    with pytest.raises(ValueError, match=match):
        vlprune.temporal_merge(**kwargs)
