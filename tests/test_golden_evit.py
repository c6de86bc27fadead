"""vlprune's EViT fusion (``prune_fuse=True``) against the original implementation.

The golden files were produced by the reference code (youweiliang/evit, ``evit.py``; commit,
versions, command and adaptations in ``tests/golden/evit_*.json``) with
``benchmarks/fidelity/make_golden_evit.py``:

* ``evit_step.npz``: one reference ``Block`` at keep 0.7 with ``fuse_token=True`` on seeded
  tokens of ViT-Ti shape: the tokens the pruning sees, the reference's class attention, its
  kept indices and its fused token (the class-attention-weighted sum of the dropped tokens);
* ``evit_vit_ti.npz``: logits of the reference EViT model with the AugReg ViT-Ti/16 weights
  (keep 0.7 at layers 3, 6, 9, fusion on) on the first 20 shared images (file names sorted).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fidelity_report import report

GOLDEN = Path(__file__).parent / "golden"
STEP_ATOL = 1e-5
LOGITS_ATOL = 1e-4  # float32 logits; the reference uses an explicit softmax, timm's fused attention


def _load(name: str) -> dict:
    np = pytest.importorskip("numpy")
    with np.load(GOLDEN / f"{name}.npz", allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    data["meta"] = json.loads((GOLDEN / f"{name}.json").read_text())
    return data


@pytest.fixture(scope="module")
def step():
    return _load("evit_step")


def test_step_golden_describes_its_source(step):
    ref = step["meta"]["reference"]
    assert ref["repository"] == "https://github.com/youweiliang/evit"
    assert len(ref["commit"]) == 40
    assert step["x"].shape == (2, 197, 192)
    assert step["kept"].shape == (2, 138)  # ceil(0.7 * 196)
    assert step["fused"].shape == (2, 192)


def test_fusion_step_matches_reference_evit(step):
    """Our selection and fusion on the reference's tokens and class attention: the same kept
    tokens, and the same fused token (attention-weighted sum of the dropped tokens)."""
    import torch

    from vlprune.core.select import keep_count, prune_plan
    from vlprune.core.state import TokenState

    x = torch.from_numpy(step["x"])
    cls_attn = torch.from_numpy(step["cls_attn"])
    B, N, _ = x.shape
    # our scores cover all N tokens; the class token's own entry is protected, never used
    scores = torch.cat([torch.zeros(B, 1), cls_attn], dim=1)
    n_keep = keep_count(N, 1, float(step["keep_rate"]))
    plan = prune_plan(scores, n_keep, 1, mode="fuse", fuse_weight=scores)
    state = TokenState(num_protected=1)
    out = state.compact(plan, x)

    kept = torch.from_numpy(step["kept"])
    assert torch.equal(plan.keep[:, 1:n_keep + 1], kept)
    assert out.shape == (B, 1 + n_keep + 1, x.shape[2])
    assert torch.allclose(out[:, 0], x[:, 0], rtol=0, atol=STEP_ATOL)
    assert torch.allclose(out[:, 1:-1], x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[2])),
                          rtol=0, atol=STEP_ATOL)
    fused = torch.from_numpy(step["fused"])
    diff = float((out[:, -1] - fused).abs().max())
    report("EViT", "one block: kept indices identical; max |fused token diff|", diff)
    assert diff <= STEP_ATOL, diff
    # its size counts every token it holds; attention sees it as one fresh token
    assert state.size[:, -1, 0].tolist() == [float(N - 1 - n_keep)] * B
    assert state.attn_size[:, -1, 0].tolist() == [1.0] * B


@pytest.mark.realdata
def test_model_logits_match_reference_evit(vit_tiny_real, assets_dir):
    """``patch(vit, prune_keep=0.7, prune_layers=(3, 6, 9), prune_fuse=True)`` on the real
    ViT-Ti weights gives the reference EViT model's logits and token counts."""
    import torch

    import vlprune
    from vlprune.eval.image_data import eval_transform, open_rgb

    golden = _load("evit_vit_ti")
    assert golden["meta"]["reference"]["repository"] == "https://github.com/youweiliang/evit"
    assert list(golden["files"]) == sorted(golden["files"]) and len(golden["files"]) == 20
    model, _ = vit_tiny_real
    root = assets_dir / "imagenet-sample"
    folder = root / "images" if (root / "images").is_dir() else root
    transform = eval_transform(model)
    images = torch.stack([transform(open_rgb(folder / str(name))) for name in golden["files"]])

    with torch.no_grad():
        plain = model(images)
    assert torch.allclose(plain, torch.from_numpy(golden["logits_unpatched"]), rtol=0,
                          atol=LOGITS_ATOL)
    vlprune.patch(model, prune_keep=0.7, prune_layers=(3, 6, 9), prune_fuse=True)
    try:
        seen = []
        hook = model.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
        try:
            with torch.no_grad():
                logits = model(images)
        finally:
            hook.remove()
    finally:
        vlprune.unpatch(model)
    assert seen == [int(golden["tokens"])]
    ref = torch.from_numpy(golden["logits"])
    diff = (logits - ref).abs().amax(dim=1)
    report("EViT", f"ViT-Ti max |logit diff| over {len(diff)} images", float(diff.max()))
    assert bool((diff <= LOGITS_ATOL).all()), {
        str(f): round(float(d), 6) for f, d in zip(golden["files"], diff) if d > LOGITS_ATOL
    }
    assert torch.equal(logits.argmax(dim=1), ref.argmax(dim=1))
