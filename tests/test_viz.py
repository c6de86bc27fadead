"""vlprune.viz: source maps per layer, group maps, painting, the PNG and the viz command."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

import vlprune
from vlprune import viz
from vlprune.cli import viz as viz_cli

timm = pytest.importorskip("timm")
np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

PREFIX = 1  # test_vit: one class token
GRID = (10, 10)  # test_vit: 160 px, patch 16
DEPTH = 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = timm.create_model("test_vit", pretrained=False).eval()
    yield m
    if vlprune.is_patched(m):
        vlprune.unpatch(m)


@pytest.fixture(autouse=True)
def _unpatched(model):
    if vlprune.is_patched(model):
        vlprune.unpatch(model)
    yield


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    """A 150 x 120 RGB image: smooth colour ramps with a bright square (not a model input size)."""
    yy, xx = np.mgrid[0:120, 0:150]
    arr = np.stack([xx / 150, yy / 120, 0.5 + 0.5 * np.sin(xx / 9.0) * np.cos(yy / 7.0)], -1)
    arr[30:70, 50:100] = 1.0
    path = tmp_path_factory.mktemp("img") / "ramp.png"
    Image.fromarray((arr.clip(0, 1) * 255).astype("uint8")).save(path)
    return path


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(seed))


def _patches_of(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(row[PREFIX:] > 0).flatten().tolist())


def _dropped_by_layer(desc) -> dict[int, int]:
    """Tokens removed up to and including each layer (pure pruning: each one a patch)."""
    out, total = {}, 0
    for lr in desc.layers:
        total += lr.tokens_in - lr.tokens_out
        out[lr.index] = total
    return out


SETTINGS = {
    "merge": dict(merge_r=8),
    "prune": dict(prune_keep=0.5, prune_layers=(1, 3)),
    "fuse": dict(prune_keep=0.5, prune_layers=(1, 3), prune_fuse=True),
    "recycle": dict(prune_keep=0.5, prune_layers=(2,), prune_recycle=True),
    "hybrid": dict(prune_keep=0.6, prune_layers=(1,), merge_r=4),
}


# ---- layer_sources and group_map ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_group_map_partitions_like_get_source(model, name):
    vlprune.patch(model, trace_source=True, **SETTINGS[name])
    sources = viz.layer_sources(model, _x(), [1, DEPTH - 1])
    last = vlprune.get_source(model)  # the same forward: the hook on the last block saw it
    assert torch.equal(sources[DEPTH - 1], last)
    # checks independent of the recorded maps themselves: each map has the token count that
    # describe's records (another path) give for its layer, holds whole input tokens (0 / 1
    # entries), and each input token is held at most once (exactly once where nothing drops)
    desc = vlprune.describe(model, _x(), flops=False)
    n0 = PREFIX + GRID[0] * GRID[1]
    for layer in (1, DEPTH - 1):
        src = sources[layer][0]
        assert src.shape == (desc.layers[layer].tokens_out, n0), layer
        assert bool(((src == 0) | (src == 1)).all())
        cols = src.sum(0)
        if name == "prune":  # pure pruning: each removed token is one dropped patch
            assert int((cols == 0).sum()) == _dropped_by_layer(desc)[layer]
        elif name != "hybrid":  # merged, fused or recycled: every input token still held
            assert bool((cols == 1).all()), layer
        assert bool((cols <= 1).all())
    # layer 1's groups are nested in the last layer's: each is held whole by one last-layer
    # token, or (pruning) dropped whole
    inter = sources[1][0] @ last[0].T  # (tokens at 1, tokens at the end): patches in common
    for i, group in enumerate(sources[1][0]):
        owners = torch.nonzero(inter[i]).flatten().tolist()
        assert len(owners) <= 1, (i, owners)
        if owners:
            assert inter[i, owners[0]] == group.sum(), i
        elif name not in ("prune", "hybrid"):
            raise AssertionError(f"layer-1 token {i} lost without pruning")
    gmap = viz.group_map(last, PREFIX, GRID)
    assert gmap.shape == GRID and gmap.dtype == torch.long
    flat = gmap.flatten()
    for j in range(PREFIX, last.shape[1]):
        held = _patches_of(last[0, j])
        assert set(torch.nonzero(flat == j).flatten().tolist()) == held, f"token {j}"
    dropped = set(torch.nonzero(last[0, :, PREFIX:].sum(0) == 0).flatten().tolist())
    assert set(torch.nonzero(flat == -1).flatten().tolist()) == dropped
    assert not bool(((flat >= 0) & (flat < PREFIX)).any()), "a patch mapped to the class token"
    # earlier layers hold at least as many tokens
    assert sources[1].shape[1] >= last.shape[1]


def test_group_map_by_hand():
    # 1 prefix + 4 patches (2 x 2): token 1 holds patches 0 and 3, token 2 holds patch 1, patch 2 dropped
    source = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 1, 0, 0]])
    assert viz.group_map(source, 1, (2, 2)).tolist() == [[1, 2], [-1, 1]]
    assert viz.group_map(source.unsqueeze(0), 1, (2, 2)).tolist() == [[1, 2], [-1, 1]]


def test_sources_before_any_reduction_are_identity(model):
    vlprune.patch(model, trace_source=True, prune_keep=0.5, prune_layers=(3,))
    sources = viz.layer_sources(model, _x(), [0, 2, 3])
    n0 = PREFIX + GRID[0] * GRID[1]
    assert torch.equal(sources[0][0], torch.eye(n0))
    assert torch.equal(sources[2][0], torch.eye(n0))
    assert sources[3].shape[1] < n0
    assert viz.group_map(sources[0], PREFIX, GRID).flatten().tolist() == list(range(PREFIX, n0))


def test_layer_sources_keeps_batch_and_removes_hooks(model):
    vlprune.patch(model, trace_source=True, merge_r=8)
    x = torch.cat([_x(0), _x(1)])
    sources = viz.layer_sources(model, x, [DEPTH - 1])
    assert sources[DEPTH - 1].shape == (2, PREFIX + 100 - 8 * DEPTH, PREFIX + 100)
    assert not any(blk._forward_hooks for blk in model.blocks)
    assert model.training is False


def test_merge_only_drops_nothing(model, image_path, tmp_path):
    summary = viz.visualize(model, image_path, path=tmp_path / "m.png", layers=list(range(DEPTH)),
                            merge_r=8)
    assert not vlprune.is_patched(model)
    vlprune.patch(model, merge_r=8)
    desc = vlprune.describe(model, _x(), flops=False)
    for lr in desc.layers:
        layer = lr.index
        assert summary["tokens"][layer] == lr.tokens_out
        assert summary["dropped"][layer] == 0
        assert summary["fused"][layer] == 0
        assert summary["groups"][layer] == lr.tokens_out - PREFIX
    assert summary["grid"] == GRID and summary["num_prefix"] == PREFIX


def test_prune_drop_counts_match_describe(model, image_path, tmp_path):
    setting = SETTINGS["prune"]
    summary = viz.visualize(model, image_path, path=tmp_path / "p.png", layers=list(range(DEPTH)),
                            **setting)
    vlprune.patch(model, **setting)
    desc = vlprune.describe(model, _x(), flops=False)
    expected = _dropped_by_layer(desc)
    assert expected[DEPTH - 1] > 0
    assert summary["dropped"] == expected
    for lr in desc.layers:
        assert summary["tokens"][lr.index] == lr.tokens_out
        assert summary["groups"][lr.index] == lr.tokens_out - PREFIX  # no merging: one patch each


def test_fuse_keeps_every_patch_in_a_fused_token(model, image_path, tmp_path):
    setting = SETTINGS["fuse"]
    summary = viz.visualize(model, image_path, path=tmp_path / "f.png", layers=[0, 1, 2], **setting)
    vlprune.patch(model, **setting)
    desc = vlprune.describe(model, _x(), flops=False)
    first = desc.layers[1]
    n_fused = first.tokens_in - first.tokens_out + 1  # the fused token is one of the outputs
    assert summary["dropped"] == {0: 0, 1: 0, 2: 0}
    assert summary["fused"] == {0: 0, 1: n_fused, 2: n_fused}
    assert summary["groups"][1] == first.tokens_out - PREFIX


def test_already_patched_model_shows_its_own_patch(model, image_path, tmp_path):
    vlprune.patch(model, **SETTINGS["prune"])
    config = vlprune.get_config(model)
    summary = viz.visualize(model, image_path, path=tmp_path / "own.png", layers=[DEPTH - 1])
    assert vlprune.is_patched(model)
    assert vlprune.get_config(model) == config and not config.trace_source
    assert summary["dropped"][DEPTH - 1] > 0
    with pytest.raises(ValueError, match="already patched"):
        viz.visualize(model, image_path, path=tmp_path / "x.png", merge_r=8)


def test_tensor_input(model, tmp_path):
    summary = viz.visualize(model, _x()[0], path=tmp_path / "t.png", merge_r=4, layers=[DEPTH - 1])
    assert summary["tokens"][DEPTH - 1] == PREFIX + 100 - 4 * DEPTH
    assert (tmp_path / "t.png").is_file()


def test_default_layers():
    assert viz.default_layers(12) == [2, 5, 8, 11]
    assert viz.default_layers(6) == [1, 2, 3, 5]
    assert viz.default_layers(1) == [0]
    assert viz.default_layers(3) == [0, 1, 2]


# ---- painting and the PNG -------------------------------------------------------------------


def test_paint_groups_mean_colours_dropped_and_singletons():
    rng = np.random.default_rng(0)
    img = rng.random((20, 20, 3))
    gmap = np.array([[1, 1], [-1, 2]])  # a 2-cell group, a dropped cell, a singleton
    out = viz.paint_groups(img, gmap, colors="mean", borders=False)
    group = np.zeros((20, 20), bool)
    group[:10, :] = True
    assert np.allclose(out[group], img[group].mean(0))
    assert np.allclose(out[10:, 10:], img[10:, 10:])  # a patch holding only itself: the image
    assert out[10:, :10].max() < 0.3  # dropped: dark
    bordered = viz.paint_groups(img, gmap, colors="mean", borders=True)
    assert np.allclose(bordered[10, 3], 0.12) and np.allclose(bordered[10, 13], 0.12)
    assert np.allclose(bordered[3, 10], out[3, 10])  # inside one group: no border


def test_paint_groups_palette_separates_touching_groups():
    img = np.full((40, 40, 3), 0.5)
    gmap = np.array([[1, 1, 2, 2], [3, 3, 2, 2], [3, 4, 4, 5], [6, 6, 4, 5]])
    out = viz.paint_groups(img, gmap, colors="palette", borders=False, alpha=1.0)
    colour = {g: tuple(out[(np.argwhere(gmap == g)[0] * 10 + 5).tolist()[0],
                           (np.argwhere(gmap == g)[0] * 10 + 5).tolist()[1]]) for g in range(1, 7)}
    for a, b in [(1, 2), (1, 3), (2, 3), (2, 4), (3, 4), (4, 5), (4, 6), (3, 6), (2, 5)]:
        assert colour[a] != colour[b], (a, b)
    palette = {tuple(round(v, 6) for v in viz._hex_rgb(c)) for c in viz.PALETTE}
    assert all(tuple(round(v, 6) for v in c) in palette for c in colour.values())
    with pytest.raises(ValueError, match="allowed"):
        viz.paint_groups(img, gmap, colors="rainbow")


def _panel(png: np.ndarray, k: int, cols: int) -> np.ndarray:
    r, c = divmod(k, cols)
    top = r * (viz.PANEL_PX + viz.TITLE_PX) + viz.TITLE_PX
    return png[top + 20: top + viz.PANEL_PX - 20, c * viz.PANEL_PX + 20: (c + 1) * viz.PANEL_PX - 20]


def test_render_layout(tmp_path):
    img = np.full((32, 32, 3), 0.95)  # a bright image
    kept = torch.arange(16).reshape(4, 4) + 1
    maps = {0: kept, 3: torch.full((4, 4), -1), 5: kept.clone()}
    path = viz.render(img, maps, tmp_path / "sub" / "r.png", tokens={0: 17, 3: 1, 5: 17})
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == viz.figure_size(3) == (4 * viz.PANEL_PX, viz.PANEL_PX + viz.TITLE_PX)
        png = np.asarray(im.convert("RGB"), dtype=float) / 255
    assert _panel(png, 0, 4).mean() > 0.85  # the image
    assert _panel(png, 2, 4).mean() < 0.3  # layer 3: everything dropped
    assert _panel(png, 3, 4).mean() > 0.6  # layer 5: every patch kept
    # more panels than fit one row wrap onto a second
    many = {i: kept for i in range(6)}
    with Image.open(viz.render(img, many, tmp_path / "many.png")) as im:
        assert im.size == viz.figure_size(6) == (5 * viz.PANEL_PX, 2 * (viz.PANEL_PX + viz.TITLE_PX))


def test_visualize_png_shows_the_crop(model, image_path, tmp_path):
    out = tmp_path / "v.png"
    summary = viz.visualize(model, image_path, path=out, merge_r=8, layers=[0, DEPTH - 1])
    assert summary["path"] == str(out) and summary["layers"] == [0, DEPTH - 1]
    with Image.open(out) as im:
        assert im.size == viz.figure_size(2)
        png = np.asarray(im.convert("RGB"), dtype=float) / 255
    # the test image is bright in its middle (the white square) and varies: not a blank panel
    assert _panel(png, 0, 3).std() > 0.05


def test_missing_plotting_library_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"vlprune\[eval\]"):
        viz.render(np.zeros((8, 8, 3)), {0: torch.zeros(2, 2, dtype=torch.long)}, tmp_path / "x.png")


# ---- errors ---------------------------------------------------------------------------------


def test_errors(model, image_path, tmp_path):
    with pytest.raises(ValueError, match="not patched"):
        viz.layer_sources(model, _x(), [0])
    vlprune.patch(model, merge_r=4)
    with pytest.raises(ValueError, match="trace_source=True"):
        viz.layer_sources(model, _x(), [0])
    vlprune.configure(model, trace_source=True)
    with pytest.raises(ValueError, match=r"layer 6 is out of range.*allowed 0\.\.5"):
        viz.layer_sources(model, _x(), [0, 6])
    with pytest.raises(ValueError, match="allowed 0..5"):
        viz.layer_sources(model, _x(), [-1])
    assert not any(blk._forward_hooks for blk in model.blocks)
    vlprune.unpatch(model)
    with pytest.raises(ValueError, match="out of range"):
        viz.visualize(model, image_path, path=tmp_path / "x.png", merge_r=4, layers=[9])
    assert not vlprune.is_patched(model)
    with pytest.raises(FileNotFoundError, match="image not found"):
        viz.visualize(model, tmp_path / "nope.jpg", path=tmp_path / "x.png", merge_r=4)
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        viz.visualize(model, tmp_path / "bad.jpg", path=tmp_path / "x.png", merge_r=4)
    with pytest.raises(ValueError, match="reduction setting"):
        viz.visualize(model, image_path, path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="source\\[b\\]"):
        viz.group_map(torch.zeros(2, 3, 5), 1, (2, 2))
    with pytest.raises(ValueError, match="need 5"):
        viz.group_map(torch.zeros(3, 6), 1, (2, 2))
    assert not (tmp_path / "x.png").exists()


# ---- command line ---------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    from vlprune.cli import main

    return main(["viz", *argv])  # errors: one line and the exit status, from main


def test_cli_writes_png_and_table(image_path, tmp_path, capsys):
    out = tmp_path / "cli.png"
    rc = _run([str(image_path), "--model", "test_vit", "--prune-keep", "0.5", "--prune-layers", "1,3",
               "--layers", "0,3,5", "--colors", "palette", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    with Image.open(out) as im:
        assert im.size == viz.figure_size(3)
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "3", "5"]
    assert rows[0][3] == "0" and int(rows[2][3]) > int(rows[1][3]) - 1 > 0  # dropped patches grow


def test_cli_loads_local_weights(image_path, tmp_path, capsys):
    m = timm.create_model("test_vit", pretrained=False)
    torch.save(m.state_dict(), tmp_path / "w.pth")
    assert _run([str(image_path), "-m", "test_vit", "--weights", str(tmp_path / "w.pth"),
                 "--merge-r", "4", "--out", str(tmp_path / "w.png")]) == 0
    bad = timm.create_model("test_vit", pretrained=False, num_classes=3)
    torch.save(bad.state_dict(), tmp_path / "bad.pth")
    capsys.readouterr()
    assert _run([str(image_path), "-m", "test_vit", "--weights", str(tmp_path / "bad.pth"),
                 "--merge-r", "4", "--out", str(tmp_path / "b.png")]) == 2
    assert "does not match" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["{missing}", "-m", "test_vit", "--merge-r", "4"], "image not found"),
    (["{image}", "-m", "no_such_vit_xyz", "--merge-r", "4"], "unknown timm model 'no_such_vit_xyz'"),
    (["{image}", "-m", "test_vit", "--merge-r", "4", "--layers", "2,6"], r"allowed 0..5"),
    (["{image}", "-m", "test_vit"], "--merge-r and/or --prune-keep"),
    (["{image}", "-m", "test_vit", "--merge-r", "4", "--prune-fuse"], "without --prune-keep"),
    (["{image}", "-m", "test_vit", "--prune-keep", "1.5"], "prune_keep"),
])
def test_cli_errors(image_path, tmp_path, capsys, argv, message):
    out = tmp_path / "e.png"
    argv = [a.format(missing=tmp_path / "missing.jpg", image=image_path) for a in argv]
    assert _run([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlprune viz: error:") and message in err, err
    assert not out.exists()


def test_cli_argument_types():
    parser = argparse.ArgumentParser()
    viz_cli.add_viz_arguments(parser)
    args = parser.parse_args(["i.jpg", "--merge-r", "8:0.5", "--prune-keep", "0.7,0.5",
                              "--prune-layers", "3,6", "--prune-score", "key_norm"])
    assert args.merge_r == (8, 0.5) and args.prune_keep == (0.7, 0.5) and args.prune_layers == (3, 6)
    assert args.out == "viz.png" and args.layers is None
    for bad in (["i.jpg", "--merge-r", "x"], ["i.jpg", "--layers", "a"],
                ["i.jpg", "--prune-score", "nope"], ["i.jpg", "--weights", "w", "--pretrained"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


# ---- other image towers ---------------------------------------------------------------------


def test_hf_clip_vision_tower(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=64,
                                        intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=2, attn_implementation="sdpa")
    m = transformers.CLIPVisionModel(cfg).eval()
    vlprune.patch(m, merge_r=3, trace_source=True)
    x = torch.randn(1, 3, 64, 64)
    sources = viz.layer_sources(m, x, [0, 2])
    # ToMe's count: r = 3 patches leave at each of the 3 layers; the class token stays
    assert sources[0].shape == (1, 1 + 16 - 3, 17) and sources[2].shape == (1, 1 + 16 - 3 * 3, 17)
    for src in sources.values():  # every input token is held by exactly one token
        torch.testing.assert_close(src.sum(dim=1), torch.ones(1, 17))
        assert src[0, 0, 0] == 1 and src[0, 0, 1:].sum() == 0  # the class token holds itself
    # a group of layer 0 is still whole at layer 2: merging never splits a token
    held0, held2 = sources[0][0] > 0, sources[2][0] > 0
    assert all(any(bool((g & ~h).sum() == 0) for h in held2) for g in held0)
    assert torch.equal(sources[2], vlprune.get_source(m))
    vlprune.unpatch(m)
    summary = viz.visualize(m, x[0], path=tmp_path / "hf.png", merge_r=3, layers=[2])
    assert summary["grid"] == (4, 4) and summary["num_prefix"] == 1 and summary["groups"][2] == 7


def test_open_clip_two_towers(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    m = open_clip.CLIP(
        embed_dim=32, vision_cfg=dict(image_size=64, patch_size=16, width=64, layers=3, head_width=32),
        text_cfg=dict(context_length=12, vocab_size=50, width=32, heads=2, layers=2),
    ).eval()
    summary = viz.visualize(m, torch.randn(3, 64, 64), path=tmp_path / "oc.png",
                            prune_keep=0.5, prune_layers=(1,), layers=[0, 2])
    assert summary["dropped"] == {0: 0, 2: 8} and summary["tokens"] == {0: 17, 2: 9}
    assert not vlprune.is_patched(m)
