"""Property tests for the compaction core and bipartite matching (pure tensor code)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlprune.config import ReductionConfig, parse_schedule
from vlprune.core import Plan, TokenState, combine_masks, identity_source, size_bias
from vlprune.merging import bipartite_soft_matching, max_merge

shapes = st.tuples(
    st.integers(1, 3),  # batch
    st.integers(2, 40),  # tokens
    st.integers(0, 3),  # protected
    st.integers(1, 8),  # channels
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, r=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_bipartite_plan_invariants(shape, r, seed):
    B, N, P, C = shape
    P = min(P, N)
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(B, N, C, generator=g)
    plan = bipartite_soft_matching(metric, r, P)
    r_eff = min(r, max_merge(N, P))
    if r_eff == 0:
        assert plan is None
        return
    assert plan.num_kept == N - r_eff
    assert plan.num_merged == r_eff
    # every input token is either kept or merged, exactly once
    all_idx = torch.cat([plan.keep, plan.src], dim=1).sort(dim=1).values
    assert torch.equal(all_idx, torch.arange(N).expand(B, N))
    # protected prefix stays first, in order, and is never a merge target or source
    assert torch.equal(plan.keep[:, :P], torch.arange(P).expand(B, P))
    assert bool((plan.dst >= P).all()) and bool((plan.src >= P).all())
    assert bool((plan.dst < plan.num_kept).all())


# Seven tokens, metric written so that the cosines are easy to check by hand. Parity split
# over all positions: A = 0, 2, 4, 6 (rows), B = 1, 3, 5 (columns).
#   row 0 -> 3: 1.0 (0 and 3 are the same vector)
#   row 2 -> 1: 3/sqrt(13) = .832, -> 3: 0, -> 5: 2/sqrt(13) = .555
#   row 4 -> 1: 0, -> 3: 1/2, -> 5: 1/sqrt(2) = .707
#   row 6 -> 1: 0, -> 3: 3/sqrt(20) = .671, -> 5: 1/sqrt(10) = .316
HAND_METRIC = torch.tensor(
    [[1, 0, 0, 1], [0, 1, 0, 0], [0, 3, 2, 0], [1, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 1, 3]],
    dtype=torch.float32,
)


@pytest.mark.parametrize(
    "P, r, keep, src, dst",
    [
        # only the class token (0, in A) protected: its row is masked, so its exact twin 3 is
        # ignored; 2 (best .832 into 1) goes first, then 4 (.707 into 5), then 6 (.671 into 3)
        (1, 1, [0, 4, 6, 1, 3, 5], [2], [3]),
        (1, 3, [0, 1, 3, 5], [2, 4, 6], [1, 3, 2]),
        (1, 9, [0, 1, 3, 5], [2, 4, 6], [1, 3, 2]),  # capped at (7 - 1) // 2 = 3
        # class (A) and distillation token (1, in B): column 1 is masked too, so 2 falls to
        # .555 (into 5) and ranks after 4 (.707) and 6 (.671)
        (2, 1, [0, 1, 2, 6, 3, 5], [4], [5]),
        (2, 2, [0, 1, 2, 3, 5], [4, 6], [4, 3]),
        (2, 5, [0, 1, 2, 3, 5], [4, 6], [4, 3]),  # capped at (7 - 2) // 2 = 2
        # three protected (class + two registers): 0 and 2 masked in A, 1 masked in B
        (3, 1, [0, 1, 2, 6, 3, 5], [4], [5]),
        (3, 2, [0, 1, 2, 3, 5], [4, 6], [4, 3]),
    ],
)
def test_bipartite_split_by_parity_by_hand(P, r, keep, src, dst):
    """ToMe's split: A/B by position parity over all tokens, protected tokens masked where
    they fall; the plan lists the protected tokens, the unmerged A tokens, then the B tokens."""
    plan = bipartite_soft_matching(HAND_METRIC[None], r, P)
    assert plan.keep.tolist() == [keep]
    assert plan.src.tolist() == [src]
    assert plan.dst.tolist() == [dst]  # positions in the output (keep)
    assert plan.src_mask is None


def test_bipartite_protected_never_merged_even_when_most_similar():
    """Protected tokens that form the closest pairs of the sequence (0 == 2 in A, 1 == 3 in B,
    and 4 == 1 across) are neither merged nor merged into, at the largest r."""
    e = torch.eye(4)
    metric = torch.stack([e[0], e[1], e[0], e[1], e[1], e[2], e[2], e[3], e[3]])[None]
    plan = bipartite_soft_matching(metric, 100, num_protected=4)
    # A = 0, 2, 4, 6, 8 (0, 2 protected), B = 1, 3, 5, 7 (1, 3 protected); r = (9 - 4) // 2 = 2.
    # 6 -> 5 and 8 -> 7 are perfect matches; 4 (= e1) matches only the masked 1 and 3: stays
    assert plan.keep.tolist() == [[0, 1, 2, 3, 4, 5, 7]]
    pairs = sorted(zip(plan.src.tolist()[0], plan.dst.tolist()[0]))
    assert pairs == [(6, 5), (8, 6)]  # dst: output positions of 5 and 7


@settings(max_examples=60, deadline=None)
@given(shape=shapes, r=st.integers(1, 20), steps=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_sizes_and_sources_conserve_tokens(shape, r, steps, seed):
    B, N, P, C = shape
    P = min(P, N)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    state = TokenState(num_protected=P, trace_source=True)
    orig = x.clone()
    for _ in range(steps):
        plan = bipartite_soft_matching(torch.randn(B, x.shape[1], C, generator=g), r, P)
        if plan is None:
            break
        x = state.compact(plan, x)
    if state.size is None:
        return
    # sizes sum to the input token count; source rows sum to sizes; each input used once
    assert torch.allclose(state.size.sum(dim=1).squeeze(-1), torch.full((B,), float(N), dtype=x.dtype))
    assert torch.allclose(state.source.sum(dim=-1, keepdim=True), state.size)
    assert torch.allclose(state.source.sum(dim=1), torch.ones(B, N, dtype=x.dtype))
    # each token is the mean of the inputs it holds (size-weighted averaging is exact)
    expected = (state.source @ orig) / state.size
    assert torch.allclose(x, expected, atol=1e-9)
    # protected tokens hold exactly themselves
    assert torch.equal(state.source[:, :P], identity_source(B, N, dtype=x.dtype)[:, :P])


def test_plan_pure_pruning_keeps_size_none():
    x = torch.randn(2, 6, 3)
    keep = torch.tensor([[0, 2, 4], [1, 3, 5]])
    out, size = Plan(keep=keep, num_tokens=6).apply(x)
    assert size is None
    assert torch.equal(out, torch.stack([x[0, [0, 2, 4]], x[1, [1, 3, 5]]]))


def test_plan_weighted_merge_and_score_weights():
    x = torch.tensor([[[1.0], [3.0], [10.0]]])
    size = torch.tensor([[[1.0], [3.0], [1.0]]])
    plan = Plan(keep=torch.tensor([[0, 2]]), src=torch.tensor([[1]]), dst=torch.tensor([[0]]), num_tokens=3)
    out, new_size = plan.apply(x, size)
    assert torch.allclose(out[0, :, 0], torch.tensor([(1 * 1 + 3 * 3) / 4, 10.0]))
    assert torch.allclose(new_size[0, :, 0], torch.tensor([4.0, 1.0]))
    # score weights change the average but not the carried size
    weight = torch.tensor([[[2.0], [0.5], [7.0]]])
    weighted = Plan(keep=plan.keep, src=plan.src, dst=plan.dst, weight=weight, num_tokens=3)
    out, new_size = weighted.apply(x, size)
    expected = (2 * 1 * 1 + 0.5 * 3 * 3) / (2 * 1 + 0.5 * 3)
    assert torch.allclose(out[0, :, 0], torch.tensor([expected, 10.0]))
    assert torch.allclose(new_size[0, :, 0], torch.tensor([4.0, 1.0]))


def test_plan_rejects_bad_shapes():
    with pytest.raises(ValueError, match="together"):
        Plan(keep=torch.zeros(1, 2, dtype=torch.long), src=torch.zeros(1, 1, dtype=torch.long))
    plan = Plan(keep=torch.zeros(1, 2, dtype=torch.long), num_tokens=5)
    with pytest.raises(ValueError, match="built for 5 tokens"):
        plan.apply(torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        plan.apply(torch.randn(5, 2))


def test_state_check_catches_stale_sizes():
    state = TokenState(size=torch.ones(1, 5, 1))
    with pytest.raises(RuntimeError, match="fresh token state"):
        state.check(torch.randn(1, 7, 4))


def test_size_bias_matches_proportional_attention():
    """log(size) as an SDPA mask equals attending to each merged token `size` times."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    size = torch.tensor([[[1.0], [3.0], [1.0], [2.0]]])
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(size))
    rep = torch.tensor([0, 1, 1, 1, 2, 3, 3])  # each key repeated `size` times
    ref = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, rep], v[:, :, rep])
    assert torch.allclose(out, ref, atol=1e-6)


def test_combine_masks_bool_and_float():
    bias = torch.zeros(1, 1, 1, 3)
    mask = torch.tensor([True, False, True]).view(1, 1, 1, 3)
    out = combine_masks(mask, bias + 1.0, torch.float32)
    assert out[0, 0, 0, 1] == float("-inf") and out[0, 0, 0, 0] == 1.0
    assert combine_masks(None, bias, torch.float32) is bias
    assert combine_masks(mask, None, torch.float32) is mask


# ToMe's rule (facebookresearch/ToMe, tome/utils.py parse_r), derived by hand for each case:
# lo = int(r * (1 - inflection)), hi = 2r - lo, step = (hi - lo) / (layers - 1), and layer i
# gets int(lo + step * i) (truncation, never rounding). A single layer gets r.
@pytest.mark.parametrize(
    "merge_r, layers, expected",
    [
        (4, 3, [4, 4, 4]),  # an int: the same r everywhere
        (0, 2, [0, 0]),
        ([1, 2], 4, [1, 2, 0, 0]),  # a short list: trailing layers 0
        ([0, 3], 2, [0, 3]),
        ((8, 0.5), 3, [4, 8, 12]),  # lo 4, hi 12, step 4
        ((8, -1.0), 3, [16, 8, 0]),  # lo 16, hi 0, step -8
        ((8, 0.0), 1, [8]),
        ((8, 1.0), 1, [8]),  # one layer: r whatever the inflection
        ((5, 0.5), 4, [2, 4, 6, 8]),  # lo int(2.5) = 2, hi 8, step 2
        ((3, 1.0), 4, [0, 2, 4, 6]),  # lo 0, hi 6, step 2
        # lo int(4.9) = 4, hi 10, step 1.5: 4, 5.5, 7, 8.5, 10 truncated (mean 6.8, not 7)
        ((7, 0.3), 5, [4, 5, 7, 8, 10]),
        # lo int(3.5) = 3, hi 1, step -2/3: 3, 2.33, 1.67, 1 truncated
        ((2, -0.75), 4, [3, 2, 1, 1]),
        ((0, 0.7), 3, [0, 0, 0]),
    ],
)
def test_parse_schedule(merge_r, layers, expected):
    assert parse_schedule(merge_r, layers) == expected


@settings(max_examples=50, deadline=None)
@given(r=st.integers(0, 64), inflect=st.floats(-1, 1), layers=st.integers(2, 24))
def test_parse_schedule_tuple_mean_is_r(r, inflect, layers):
    """The exact ramp lo..hi (hi = 2r - lo) has mean r; truncating each layer's value to an
    int loses less than 1 per layer and never adds, so r - 1 < mean <= r. The ramp starts at
    lo and runs one way (up for positive inflection, down for negative)."""
    sched = parse_schedule((r, inflect), layers)
    assert len(sched) == layers and min(sched) >= 0
    assert r - 1 < sum(sched) / layers <= r
    lo = int(r * (1.0 - inflect))
    assert sched[0] == lo
    steps = [b - a for a, b in zip(sched, sched[1:])]
    assert all(d >= 0 for d in steps) if lo <= r else all(d <= 0 for d in steps)


@pytest.mark.parametrize(
    "bad", [-1, 1.5, "8", (8,), (8, 2.0), (-1, 0.0), [1, -2], [1, 2.5], True, None]
)
def test_config_rejects_bad_merge_r(bad):
    with pytest.raises(ValueError, match="allowed"):
        ReductionConfig(merge_r=bad)


def test_schedule_longer_than_model_is_an_error():
    with pytest.raises(ValueError, match="at most 2"):
        parse_schedule([1, 2, 3], 2)


def test_config_replace_unknown_name():
    with pytest.raises(TypeError, match="known settings"):
        ReductionConfig().replace(merge_rr=3)


def _merge_pairs(plan, row: int) -> set[tuple[int, int]]:
    """(merged token, token it merged into) in input positions, for one row of a plan."""
    mask = plan.src_mask[row] if plan.src_mask is not None else torch.ones_like(plan.src[row], dtype=torch.bool)
    src = plan.src[row][mask].tolist()
    dst = plan.keep[row][plan.dst[row][mask]].tolist()
    return set(zip(src, dst))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=1, max_size=3), P=st.integers(0, 3),
       r=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_ragged_bipartite_matches_dense_per_row(lengths, P, r, seed):
    """Each row of a padded batch (protected prefix, real tokens, padding) merges the same
    tokens into the same partners as the dense ToMe matching of that row's unpadded tokens,
    for an odd protected prefix too (the parity split counts the protected tokens)."""
    from vlprune.core.ragged import ragged_bipartite

    N = P + max(lengths)
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(len(lengths), N, 6, generator=g)
    valid = torch.arange(N)[None] < torch.tensor([P + n for n in lengths])[:, None]
    plan = ragged_bipartite(metric, valid, r, P)
    for i, n in enumerate(lengths):
        dense = bipartite_soft_matching(metric[i:i + 1, :P + n], r, P)
        want = set() if dense is None else _merge_pairs(dense, 0)
        got = set() if plan is None else _merge_pairs(plan, i)
        assert got == want
