"""What the adapter test files share: the reduction settings every image tower runs (the
shared tester, tests/adapter_tester.py, runs them), the token count each layer must give, and
small model probes."""

from __future__ import annotations

import math

import torch

# merge schedules, pruning with each rule and score, keep 1.0 and a hybrid
SETTINGS = {
    "r0": dict(merge_r=0),
    "r3": dict(merge_r=3),
    "ramp": dict(merge_r=(4, 0.5)),
    "list": dict(merge_r=[5, 0, 2]),
    "capped": dict(merge_r=100),
    "keep1": dict(prune_keep=1.0, prune_layers=(1, 2)),
    "prune": dict(prune_keep=0.6, prune_layers=(1, 3)),
    "fuse": dict(prune_keep=0.5, prune_layers=(0, 2), prune_fuse=True),
    "recycle": dict(prune_keep=0.5, prune_layers=(1,), prune_recycle=True),
    "diverse": dict(prune_keep=0.5, prune_layers=(2,), prune_score="diversity"),
    "random": dict(prune_keep=0.4, prune_layers=(1,), prune_score="random", prune_seed=3),
    "hybrid": dict(prune_keep=0.7, prune_layers=(1,), merge_r=2),
}


def expected_tokens_out(n_in: int, P: int, keep: float | None, r: int, mode: str) -> int:
    """Tokens leaving a layer, from the documented rules (README, ``prune_keep`` and
    ``merge_r``), not the library's helpers: prune first (``ceil(keep * n)`` of the ``n``
    unprotected tokens kept, at least one, plus the fused token when something was dropped),
    then merge ``r`` capped at half the unprotected tokens."""
    n = n_in
    if keep is not None and keep < 1.0:
        free = n - P
        n_keep = min(free, max(1, math.ceil(keep * free)))
        if free - n_keep > 0:
            n = P + n_keep + (1 if mode == "fuse" else 0)
    return n - min(r, (n - P) // 2)


def images(batch: int = 2, seed: int = 1, size: int = 96) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def vlprune_attrs(model) -> list[tuple[str, str]]:
    """Every ``_vlprune*`` attribute left on any submodule."""
    return [(n, k) for n, m in model.named_modules() for k in vars(m) if k.startswith("_vlprune")]


def module_calls(model, x) -> list[str]:
    """Names of the submodules a forward calls, in order (forward hooks)."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: seen.append(n))
        for n, m in model.named_modules() if n
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def model_fixtures(build, params=None):
    """A module-scoped ``model`` fixture (``build()``, or ``build(param)`` for each of
    ``params``), unpatched when the module is done, and an autouse fixture that unpatches it
    before each test. Assign both in the test module: ``model, _unpatched = model_fixtures(...)``."""
    import pytest

    import vlprune

    def _unpatch(m):
        if vlprune.is_patched(m):
            vlprune.unpatch(m)

    @pytest.fixture(scope="module", params=params)
    def model(request):
        m = build(request.param) if params is not None else build()
        yield m
        _unpatch(m)

    @pytest.fixture(autouse=True)
    def _unpatched(model):
        _unpatch(model)
        yield

    return model, _unpatched
