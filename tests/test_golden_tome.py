"""vlprune's ToMe merging against the original implementation, on real ViT-Ti/16 weights.

The golden logits in ``tests/golden/tome_vit_ti.npz`` were produced by the reference code
(facebookresearch/ToMe, ``tome.patch.timm``; commit, versions and command in
``tests/golden/tome_vit_ti.json``) with ``benchmarks/fidelity/make_golden_tome.py``, on the
first 20 images (file names sorted) of the shared ImageNet sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fidelity_report import report

pytestmark = pytest.mark.realdata

GOLDEN = Path(__file__).parent / "golden"
ATOL = 1e-4  # float32 logits; the reference uses an explicit softmax, timm's fused attention


@pytest.fixture(scope="module")
def golden():
    np = pytest.importorskip("numpy")
    with np.load(GOLDEN / "tome_vit_ti.npz", allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    data["meta"] = json.loads((GOLDEN / "tome_vit_ti.json").read_text())
    return data


@pytest.fixture(scope="module")
def golden_inputs(vit_tiny_real, assets_dir, golden):
    """The golden images, preprocessed as the evaluation preprocesses them."""
    import torch

    from vlprune.eval.image_data import eval_transform, open_rgb

    model, _ = vit_tiny_real
    root = assets_dir / "imagenet-sample"
    folder = root / "images" if (root / "images").is_dir() else root
    transform = eval_transform(model)
    return torch.stack([transform(open_rgb(folder / str(name))) for name in golden["files"]])


def test_golden_file_describes_its_source(golden):
    meta = golden["meta"]
    assert meta["reference"]["repository"] == "https://github.com/facebookresearch/ToMe"
    assert len(meta["reference"]["commit"]) == 40
    assert len(golden["files"]) == 20
    assert list(golden["files"]) == sorted(golden["files"])
    for r in (0, 8, 16):
        assert golden[f"logits_r{r}"].shape == (20, 1000)


def test_unpatched_model_matches_golden_r0(vit_tiny_real, golden, golden_inputs):
    """Same weights and inputs as the reference run: ToMe's patch at r = 0 is the plain ViT."""
    import torch

    model, _ = vit_tiny_real
    with torch.no_grad():
        logits = model(golden_inputs)
    ref = torch.from_numpy(golden["logits_r0"])
    assert torch.allclose(logits, ref, rtol=0, atol=ATOL), float((logits - ref).abs().max())


@pytest.mark.parametrize("r", [8, 16])
def test_merge_logits_match_reference_tome(vit_tiny_real, golden, golden_inputs, r):
    import torch

    import vlprune

    model, _ = vit_tiny_real
    vlprune.patch(model, merge_r=r)
    try:
        seen = []
        hook = model.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
        try:
            with torch.no_grad():
                logits = model(golden_inputs)
        finally:
            hook.remove()
    finally:
        vlprune.unpatch(model)
    ref = torch.from_numpy(golden[f"logits_r{r}"])
    diff = (logits - ref).abs().amax(dim=1)
    report("ToMe", f"r={r} max |logit diff| over {len(diff)} images", float(diff.max()))
    assert bool((diff <= ATOL).all()), {
        str(f): round(float(d), 6) for f, d in zip(golden["files"], diff) if d > ATOL
    }
    assert torch.equal(logits.argmax(dim=1), ref.argmax(dim=1))
    # the same number of tokens leaves the last block
    assert seen == [int(golden[f"tokens_r{r}"])]
