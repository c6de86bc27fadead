"""Source maps: the token state keeps a ``(B, N0)`` int64 index map (the current token holding
each input token, -1 once dropped) and builds the dense ``(B, N, N0)`` map only on demand. The
dense map must be the one the former formula gave: an identity map compacted by
``Plan.accumulate`` at every reduction."""

from __future__ import annotations

import pytest
import torch

import vlprune
from vlprune.core import Plan, TokenState, identity_source
from vlprune.core.plan import dense_source
from vlprune.core.ragged import ragged_bipartite, ragged_prune_plan
from vlprune.core.select import prune_plan
from vlprune.merging import bipartite_soft_matching

timm = pytest.importorskip("timm")


def _plans(kind: str, x: torch.Tensor, P: int, g: torch.Generator, valid=None) -> Plan | None:
    B, N, C = x.shape
    metric = torch.randn(B, N, C, generator=g)
    scores = torch.rand(B, N, generator=g)
    n_keep = max(1, (N - P) // 2)
    if kind == "merge":
        return bipartite_soft_matching(metric, max(1, N // 5), P)
    if kind in ("drop", "recycle"):
        return prune_plan(scores, n_keep, P, mode=kind, metric=metric)
    if kind == "fuse":
        return prune_plan(scores, n_keep, P, mode="fuse")
    if kind == "fuse_evit":
        return prune_plan(scores, n_keep, P, mode="fuse", fuse_weight=scores)
    if kind == "ragged_drop":
        return ragged_prune_plan(scores, valid, 0.6, P)
    if kind == "ragged_recycle":
        return ragged_prune_plan(scores, valid, 0.6, P, mode="recycle", metric=metric)
    if kind == "ragged_merge":
        return ragged_bipartite(metric, valid, 3, P)
    raise AssertionError(kind)


SCHEDULES = {
    "merge": ["merge", "merge", "merge"],
    "prune+merge": ["drop", "merge", "drop", "merge"],
    "prune+merge+fuse": ["fuse", "merge", "fuse_evit", "drop", "merge"],
    "recycle": ["recycle", "merge", "recycle"],
    "ragged": ["ragged_drop", "ragged_merge", "ragged_recycle", "ragged_merge"],
}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_dense_source_equals_the_accumulated_identity(name, seed):
    g = torch.Generator().manual_seed(seed)
    B, N, C, P = 3, 40, 6, 1 + seed % 2
    x = torch.randn(B, N, C, generator=g)
    state = TokenState(num_protected=P, trace_source=True)
    old = identity_source(B, N)  # the former formula
    valid = None
    if name == "ragged":
        lengths = torch.tensor([N, N - 9, N - 20])
        valid = torch.arange(N).expand(B, N) < lengths.unsqueeze(1)
        state.valid = valid
    for kind in SCHEDULES[name]:
        plan = _plans(kind, x, P, g, state.valid)
        if plan is None:
            continue
        old = plan.accumulate(old)
        x = state.compact(plan, x)
        assert state.origin.shape == (B, N) and state.origin.dtype == torch.int64
        assert torch.equal(state.source, old), kind
    # dropped input tokens are held by no token: -1 in the index map, zero columns
    dropped = state.origin < 0
    assert torch.equal(dropped, old.sum(dim=1) == 0)
    if "drop" in name or "prune" in name:
        assert bool(dropped.any())


def test_dense_source_of_index_maps():
    origin = torch.tensor([[0, 2, -1, 1, 2]])
    dense = dense_source(origin, 3)
    assert dense.dtype == torch.float32
    assert dense[0].tolist() == [[1, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 1, 0, 0, 1]]


SETTINGS = {
    "merge": dict(merge_r=5),
    "prune+merge+fuse": dict(prune_keep=0.5, prune_layers=(1, 3), prune_fuse=True, merge_r=[0, 0, 4, 0, 2, 2]),
    "prune+merge": dict(prune_keep=0.6, prune_layers=(2,), merge_r=3),
    "recycle": dict(prune_keep=0.5, prune_layers=(1,), prune_recycle=True, merge_r=2),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_get_source_on_a_model_equals_the_former_dense_map(name, monkeypatch):
    """Replay every compaction of a real forward on the former dense map (identity in the
    activations' dtype, accumulated per plan) and compare with ``get_source``."""
    replay: dict[int, torch.Tensor] = {}  # per token state (patch runs a self-check forward)
    compact = TokenState.compact

    def recording(self, plan, x):
        old = replay.get(id(self))
        if old is None:
            old = identity_source(x.shape[0], x.shape[1], dtype=x.dtype)
        replay[id(self)] = plan.accumulate(old)
        return compact(self, plan, x)

    monkeypatch.setattr(TokenState, "compact", recording)
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=64, patch_size=8).eval()
    vlprune.patch(model, trace_source=True, **SETTINGS[name])
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        model(x)
    source = vlprune.get_source(model)
    state = model._vlprune.state
    assert torch.equal(source, replay[id(state)])
    n0 = 65
    assert state.origin.shape == (3, n0)
    # the state holds no (B, N, N0) tensor: only the index map and the (B, N, 1) sizes
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            assert value.numel() <= 3 * n0, value.shape


def test_get_source_is_none_before_any_compaction_and_float32_in_bfloat16():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=64, patch_size=8).eval()
    vlprune.patch(model, trace_source=True, merge_r=[0, 0, 0, 0, 0, 3])
    with torch.no_grad():
        vlprune.configure(model, merge_r=0)
        model(torch.randn(1, 3, 64, 64))
        assert vlprune.get_source(model) is None
        vlprune.configure(model, merge_r=3)
        model.bfloat16()(torch.randn(2, 3, 64, 64).bfloat16())
    source = vlprune.get_source(model)
    assert source.dtype == torch.float32
    assert torch.equal(source.sum(dim=1), torch.ones(2, 65))
