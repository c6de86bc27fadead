"""Text-guided pruning on an image-only timm ViT (``guide="text"`` + ``set_guide(project=...)``)
and the LiT-style test bed's pieces (vlprune.eval.lit) on tiny random-init models."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import vlprune
from vlprune.eval import lit

timm = pytest.importorskip("timm")

KEEP = dict(prune_keep=0.5, prune_layers=(1,))


@pytest.fixture
def vit():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=12).eval()
    yield model
    if vlprune.is_patched(model):
        vlprune.unpatch(model)


def _image(model, batch=2):
    return torch.randn(batch, 3, *model.patch_embed.img_size)


def _block_input(model, x, layer):
    """Tokens after the attention branch of block ``layer`` (where pruning scores them)."""
    blk = model.blocks[layer]
    captured = {}

    def hook(mod, args, out):
        captured["x"] = args[0] + blk.ls1(blk.attn(blk.norm1(args[0])))

    h = blk.register_forward_hook(hook)
    with torch.no_grad(), vlprune.disabled(model):
        model(x)
    h.remove()
    return captured["x"]


def test_guide_keeps_the_tokens_aligned_with_the_guide(vit):
    x = _image(vit, 1)
    torch.manual_seed(1)
    w = torch.randn(vit.embed_dim, 16)

    def project(f):
        return f @ w

    vlprune.patch(vit, guide="text", trace_source=True, **KEEP)
    tokens = _block_input(vit, x, 1)
    feats = project(vit.fc_norm(vit.norm(tokens)))[0]  # (N, 16)
    target = 37  # a patch token; its own projected feature is the guide
    vlprune.set_guide(vit, feats[target : target + 1], project=project)
    with torch.no_grad():
        vit(x)
    source = vlprune.get_source(vit)[0]  # (N_kept, N0)
    kept = source.argmax(dim=1)
    assert target in kept.tolist()
    # the kept patches are exactly the best-aligned half (the class token is protected)
    sims = F.normalize(feats, dim=-1) @ F.normalize(feats[target], dim=-1)
    n_keep = source.shape[0] - 1
    best = sims[1:].topk(n_keep).indices + 1
    assert sorted(kept[1:].tolist()) == sorted(best.tolist())


def test_guide_without_project_uses_the_feature_space(vit):
    x = _image(vit, 3)
    vlprune.patch(vit, guide="text", **KEEP)
    vlprune.set_guide(vit, vit.head.weight[:4].detach())  # class prototypes: (4, embed_dim)
    with torch.no_grad():
        out = vit(x)
    assert out.shape == (3, 12)
    d = vlprune.describe(vit, x[:1])
    assert d.layers[1].tokens_out == d.layers[1].tokens_in // 2 + 1


def test_guide_refusals(vit):
    x = _image(vit, 1)
    vlprune.patch(vit, guide="text", **KEEP)
    with torch.no_grad(), pytest.raises(RuntimeError, match="set_guide"):
        vit(x)
    with pytest.raises(TypeError, match="callable"):
        vlprune.set_guide(vit, torch.randn(2, 7), project="W")
    vlprune.set_guide(vit, torch.randn(2, 7))  # wrong size without a project
    with torch.no_grad(), pytest.raises(ValueError, match="project="):
        vit(x)
    vlprune.set_guide(vit, None)
    assert vit._vlprune.guide_embeds is None and vit._vlprune.guide_project is None
    vlprune.unpatch(vit)
    with pytest.raises(ValueError, match="image and a text tower"):
        vlprune.patch(vit, guide="image", text_prune_keep=0.5)
    with pytest.raises(ValueError, match="not patched with guide"):
        vlprune.patch(vit, **KEEP) and vlprune.set_guide(vit, torch.randn(2, 7))


def test_guide_refused_on_map_pooling():
    model = timm.create_model("test_vit", global_pool="map").eval()
    with pytest.raises(ValueError, match="pooled features"):
        vlprune.patch(model, guide="text", **KEEP)


def test_guided_unpatch_is_exact(vit):
    x = _image(vit)
    with torch.no_grad():
        ref = vit(x)
    vlprune.patch(vit, guide="text", **KEEP)
    vlprune.set_guide(vit, torch.randn(3, vit.embed_dim))
    with torch.no_grad():
        assert not torch.allclose(vit(x), ref)
    vlprune.unpatch(vit)
    with torch.no_grad():
        assert torch.equal(vit(x), ref)


def test_fit_alignment_recovers_a_linear_map():
    torch.manual_seed(0)
    x = torch.randn(400, 8)
    w = torch.randn(8, 5)
    xn = F.normalize(x, dim=-1)
    t = (xn - xn.mean(0)) @ w
    a = lit.fit_alignment(x, t, ridge=1e-6)
    assert torch.allclose(a.weight, w, atol=1e-3)
    assert torch.allclose(a(x[:3]), F.normalize(t[:3], dim=-1), atol=1e-3)
    with pytest.raises(ValueError, match="ridge"):
        lit.fit_alignment(x, t, ridge=0.0)
    with pytest.raises(ValueError, match="targets"):
        lit.fit_alignment(x, t[:10], ridge=1.0)


def test_folds_and_training_pairs_hold_out_whole_classes():
    classes = torch.arange(10, 30)
    folds = lit.class_folds(classes, 3, seed=0)
    together = torch.cat(folds)
    assert sorted(together.tolist()) == classes.tolist()
    assert lit.class_folds(classes, 3, seed=0)[0].tolist() == folds[0].tolist()
    with pytest.raises(ValueError, match="folds"):
        lit.class_folds(classes, 1)
    labels = torch.tensor([10, 11, 12, 13, 11])
    feats = torch.randn(5, 4)
    head = torch.randn(40, 4)
    text = torch.randn(40, 6)
    held = torch.tensor([11, 25])
    x, t, c = lit.training_pairs(feats, labels, head, text, held)
    assert not torch.isin(c, held).any()
    assert len(c) == 3 + 38  # 3 images outside the held-out classes, 38 head rows
    assert torch.equal(t, text[c])


def test_classify_ranks_by_cosine():
    prompts = torch.eye(4)
    classes = torch.tensor([7, 3, 9, 1])
    emb = F.normalize(torch.tensor([[0.1, 0.0, 1.0, 0.5], [1.0, 0.2, 0.0, 0.0]]), dim=-1)
    top = lit.classify(emb, prompts, classes, k=2)
    assert top.tolist() == [[9, 1], [7, 3]]


def test_run_on_a_tiny_bed(vit):
    torch.manual_seed(0)
    n_cls = vit.num_classes
    labels = torch.arange(n_cls).repeat(2)
    bed = lit.TestBed(model=vit, images=_image(vit, len(labels)), labels=labels,
                      text=F.normalize(torch.randn(n_cls, 10), dim=-1), names=[str(i) for i in range(n_cls)])
    result = lit.run(bed=bed, budgets=(0.5,), layers=(1,), folds=2, seeds=(0, 1), progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"none", "guided", "cls_attn", "random"}
    base = rows["none"]
    assert base["agreement"] == 100.0 and base["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rows["random"]["top1_seeds"] and len(rows["random"]["top1_seeds"]) == 2
    for name in ("guided", "cls_attn", "random"):
        assert rows[name]["gflops"] < base["gflops"]
        assert 0.0 <= rows[name]["top1"] <= 100.0
    assert rows["cls_attn"]["gflops"] == pytest.approx(rows["random"]["gflops"], rel=1e-2)
    assert result["chance_top1"] == pytest.approx(100 / 6)
    assert not vlprune.is_patched(vit)
    assert "| guided | 0.5 |" in lit.table(result)
    with pytest.raises(ValueError, match="allowed"):
        lit.run(bed=bed, methods=("guided", "magic"), progress=False)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        lit.run(bed=bed, budgets=(1.5,), progress=False)


def test_assets_dir_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="VLPRUNE_ASSETS"):
        lit.assets_dir(tmp_path)
