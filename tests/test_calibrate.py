"""Budgets: ``vlprune.calibrate`` / ``search``, ``patch(model, flops=)`` with presets, saved
configs (``ReductionConfig.save`` / ``load``, every CLI's ``--config``) and ``vlprune
calibrate``. Expected values are computed here independently: FLOPs with torch's own
``FlopCounterMode`` (not the search's counts), KL and agreement from plain forwards."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlprune
from vlprune import ReductionConfig
from vlprune.calibration import candidates, compare, prune_structures, search

timm = pytest.importorskip("timm")

IMG = 96  # 36 patches + class token, 6 blocks


def _vit(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", img_size=IMG).eval()


def _images(n: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _flops(model, x) -> int:
    """Torch's counter with fused CPU attention counted (the unfused reference of the ops)."""
    from torch.utils.flop_counter import sdpa_flop_count

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu:
               lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


def _kl_agree(model, cfg, x, per_image=False):
    with torch.no_grad():
        ref = model(x).double()
        vlprune.patch(model, cfg)
        out = model(x).double()
        vlprune.unpatch(model)
    p = ref.softmax(-1)
    kl = (p * (ref.log_softmax(-1) - out.log_softmax(-1))).sum(-1)
    if per_image:
        return kl
    return float(kl.mean()), float((ref.argmax(-1) == out.argmax(-1)).double().mean())


@pytest.fixture(scope="module")
def result():
    model = _vit()
    x = _images()
    cal = search(model, x, flops=0.6, screen=6, finalists=3, progress=False)
    return model, x, cal


# ------------------------------------------------------------------------------ search


def test_search_fits_the_budget_by_an_independent_count(result):
    model, x, cal = result
    base = _flops(model, x[:1])
    vlprune.patch(model, cal.config)
    try:
        reduced = _flops(model, x[:1])
    finally:
        vlprune.unpatch(model)
    assert reduced <= 0.6 * base
    assert cal.flops_ratio == pytest.approx(reduced / base, rel=1e-6)


def test_search_scores_equal_plain_forwards(result):
    """Every candidate scored on all images carries the KL and agreement of a plain forward
    of its config; the chosen one has the lowest KL of them."""
    model, x, cal = result
    sel, conf = cal.select_images, cal.confirm_images
    assert sorted(sel + conf) == list(range(len(x))) and len(conf) == len(x) // 2
    full = [c for c in cal.candidates if c.full is not None]
    assert len(full) >= 3
    for c in full:
        kl, agree = _kl_agree(model, ReductionConfig(**c.settings), x[sel])
        assert c.full.divergence == pytest.approx(kl, rel=1e-6, abs=1e-9)
        assert c.full.agreement == pytest.approx(agree)
    kl, _ = _kl_agree(model, cal.config, x[sel])
    assert cal.score.divergence == pytest.approx(kl, rel=1e-6, abs=1e-9)
    # the lowest KL on the selection half wins when it beats merging alone on the other half
    # by > 2 standard errors of the paired per-image difference, else merging alone stays
    best = min(full, key=lambda c: c.full.divergence)
    mo = cal.merge_only
    gain = (_kl_agree(model, ReductionConfig(**mo.settings), x[conf], True)
            - _kl_agree(model, ReductionConfig(**best.settings), x[conf], True))
    wins = best is mo or float(gain.mean()) > 2 * float(gain.std()) / len(conf) ** 0.5
    expected = best if wins else mo
    assert cal.config == ReductionConfig(**expected.settings)


def test_better_beyond_noise():
    from vlprune.calibration import Score, better_beyond_noise

    def score(kl):
        kl = torch.tensor(kl, dtype=torch.float64)
        return Score(float(kl.mean()), 1.0, len(kl), (kl, torch.ones(len(kl))))

    base = score([0.5, 0.5, 0.5, 0.5])
    assert better_beyond_noise(score([0.4, 0.41, 0.39, 0.4]), base, "divergence")  # steady gain
    assert not better_beyond_noise(score([0.1, 0.9, 0.1, 0.8]), base, "divergence")  # noise
    assert not better_beyond_noise(base, score([0.4, 0.41, 0.39, 0.4]), "divergence")


def test_merge_fit_is_the_smallest_r_within_the_budget(result):
    """Merging alone: r fits (independent count) and r - 1 does not."""
    model, x, cal = result
    r = cal.merge_only.settings["merge_r"]
    base = _flops(model, x[:1])

    def ratio(r):
        vlprune.patch(model, merge_r=r)
        try:
            return _flops(model, x[:1]) / base
        finally:
            vlprune.unpatch(model)

    assert r >= 1
    assert ratio(r) <= 0.6 < ratio(r - 1)


def test_finalists_spend_the_rest_of_the_budget(result):
    """A finalist's filled schedule (r - 1 in the last k layers) fits the budget and easing
    one layer more does not (independent counts)."""
    model, x, cal = result
    base = _flops(model, x[:1])
    filled = [c for c in cal.candidates if isinstance(c.settings.get("merge_r"), list)]
    assert filled, "no finalist was filled"
    for c in filled:
        sched = c.settings["merge_r"]
        r, k = max(sched), sched.count(min(sched))
        assert sched == [r] * (len(sched) - k) + [r - 1] * k and 0 < k < len(sched)
        more = dict(c.settings, merge_r=[r] * (len(sched) - k - 1) + [r - 1] * (k + 1))
        for settings, fits in ((c.settings, True), (more, False)):
            vlprune.patch(model, ReductionConfig(**settings))
            try:
                assert (_flops(model, x[:1]) <= 0.6 * base) == fits
            finally:
                vlprune.unpatch(model)


def test_search_leaves_the_model_as_it_was(result):
    model, x, _ = result
    assert not vlprune.is_patched(model)
    patched = _vit()
    vlprune.patch(patched, merge_r=2, attn_backend="sdpa")
    search(patched, x[:4], flops=0.8, space=[{"merge_r": 3}], screen=2, finalists=1,
           progress=False)
    assert vlprune.get_config(patched).merge_r == 2
    assert vlprune.get_config(patched).attn_backend == "sdpa"


SMALL_SPACE = [{"prune_keep": [0.8], "prune_layers": (1,), "prune_recycle": True},
               {"prune_keep": [0.8], "prune_layers": (1,), "prune_fuse": True},
               {"_inflection": 0.5}]


def test_search_is_reproducible():
    x = _images(8)
    a = search(_vit(), x, flops=0.7, space=SMALL_SPACE, screen=4, finalists=2, progress=False)
    b = search(_vit(), x, flops=0.7, space=SMALL_SPACE, screen=4, finalists=2, progress=False)
    assert a.config == b.config and a.score == b.score


def test_last_layer_trick_keeps_class_token_logits():
    """Pruning all but one patch after the last attention leaves the class token's output
    exactly: the last MLP is per token. The space holds those candidates."""
    model, x = _vit(), _images(4)
    with torch.no_grad():
        ref = model(x)
        vlprune.patch(model, prune_keep=0.01, prune_layers=(5,), prune_recycle=True)
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert any(s.get("prune_layers", ())[-1:] == (5,) for s in prune_structures(6))


def test_space_scales_with_depth():
    for depth in (6, 12, 24):
        for s in prune_structures(depth):
            assert all(0 <= i < depth for i in s.get("prune_layers", ()))
    assert {"_inflection": 0.5} in candidates(12)


def test_open_clip_image_encoder_is_scored_by_embeddings():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    cfg = dict(embed_dim=32, vision_cfg=dict(image_size=IMG, patch_size=16, width=64, layers=4,
                                             head_width=32),
               text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2))
    model = open_clip.CLIP(**cfg).eval()
    x = _images(6)
    cal = search(model, x, flops=0.7, space=SMALL_SPACE, screen=3, finalists=2, progress=False)
    assert cal.kind == "embedding"
    assert cal.config.text_merge_r == 0  # the text tower stays unreduced
    x = x[cal.select_images]  # the images the score is over
    with torch.no_grad():
        ref = model.encode_image(x)
        vlprune.patch(model, cal.config)
        out = model.encode_image(x)
    cos = torch.nn.functional.cosine_similarity(ref.double(), out.double(), dim=-1)
    assert cal.score.divergence == pytest.approx(float((1 - cos).mean()), rel=1e-5, abs=1e-9)


def test_compare_embeddings_agreement_is_nearest_neighbour():
    ref = torch.eye(3)
    out = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 0, 1.0]])  # 2nd is nearest to the 3rd
    s = compare(ref, out, "embedding")
    assert s.agreement == pytest.approx(2 / 3)
    assert s.divergence == pytest.approx(1 / 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(flops=1.5), "flops must be a fraction"),
    (dict(flops=0.5, speedup=2.0), "exactly one budget"),
    (dict(), "exactly one budget"),
    (dict(speedup=0.5), "speedup must be > 1"),
    (dict(flops=0.5, objective="top5"), "unknown objective"),
    (dict(flops=0.5, screen=0), "screen must be an int >= 1"),
    (dict(flops=0.01), "no candidate setting fits"),
])
def test_search_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        search(_vit(), _images(4), space=SMALL_SPACE, progress=False, **kwargs)


def test_search_refuses_bad_images():
    with pytest.raises(ValueError, match=r"float \(N, C, H, W\)"):
        search(_vit(), torch.zeros(4, IMG, IMG), flops=0.5, progress=False)
    with pytest.raises(TypeError, match="images must be"):
        search(_vit(), "folder/", flops=0.5, progress=False)


# -------------------------------------------------------------------- visual-token budgets


def test_tokens_budget_picks_a_visual_score():
    pytest.importorskip("transformers")
    from test_llava import N_IMG, _batch, _build

    model = _build()
    batches = [_batch([0, 1]), _batch([2, 3])]
    cal = search(model, batches, tokens=4, progress=False)
    assert cal.config.visual_keep == 4
    assert cal.budget == {"tokens": 4}
    scored = [c for c in cal.candidates if c.full is not None]
    assert {c.settings["visual_score"] for c in scored} >= {"cls_attn", "attn"}
    # the chosen score's KL, from plain forwards of the last prompt position
    with torch.no_grad():
        ref = torch.cat([model(**b).logits[:, -1] for b in batches]).double()
        vlprune.patch(model, cal.config)
        out = torch.cat([model(**b).logits[:, -1] for b in batches]).double()
    kl = (ref.softmax(-1) * (ref.log_softmax(-1) - out.log_softmax(-1))).sum(-1).mean()
    assert cal.score.divergence == pytest.approx(float(kl), rel=1e-5, abs=1e-9)
    assert cal.score.divergence == min(c.full.divergence for c in scored)
    assert N_IMG > 4
    with pytest.raises(ValueError, match="vision-language"):
        search(_vit(), [{"x": _images(2)}], tokens=4, progress=False)


# ------------------------------------------------------------------ patch(model, flops=)


def test_patch_with_a_budget_and_no_preset_fits_merging_and_warns():
    model, x = _vit(), _images(1)
    base = _flops(model, x)
    with pytest.warns(UserWarning, match="no calibrated preset for test_vit"):
        vlprune.patch(model, flops=0.5)
    cfg = vlprune.get_config(model)
    assert cfg.prune_keep is None and cfg.merge_r >= 1
    assert _flops(model, x) <= 0.5 * base
    vlprune.configure(model, merge_r=cfg.merge_r - 1)
    assert _flops(model, x) > 0.5 * base


def test_patch_with_a_budget_uses_the_measured_preset(tmp_path, monkeypatch):
    from vlprune import budget

    table = {"models": {"test_vit": {
        "status": "measured", "weights": "random", "source": "a test table",
        "budgets": {"0.7": {"merge_r": 1, "prune_keep": [0.8], "prune_layers": [1],
                            "prune_recycle": True}},
    }}}
    path = tmp_path / "presets.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(budget, "PRESETS_FILE", path)
    model, x = _vit(), _images(1)
    base = _flops(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vlprune.patch(model, speedup=2.0)  # flops=0.5: the 0.7 preset's pruning, r refitted
    cfg = vlprune.get_config(model)
    assert cfg.prune_layers == (1,) and cfg.prune_recycle and cfg.prune_keep == [0.8]
    assert _flops(model, x) <= 0.5 * base


def test_shipped_presets_are_valid_configs():
    from vlprune.budget import load_presets

    presets = load_presets()
    assert presets, "the preset table is empty"
    for name, entry in presets.items():
        assert entry["status"] in ("measured", "not yet measured"), name
        if entry["status"] == "measured":
            assert entry["source"] and entry["weights"]
            for b, cfg in entry["budgets"].items():
                assert 0 < float(b) < 1
                ReductionConfig.from_dict(cfg)
        else:
            assert not entry.get("budgets"), f"{name}: not measured but has budgets"


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(flops=0.5, merge_r=4), TypeError, "chooses"),
    (dict(flops=2.0), ValueError, "flops must be"),
    (dict(flops=0.5, speedup=2.0), ValueError, "exactly one budget"),
])
def test_patch_budget_refusals_leave_the_model_unpatched(kwargs, err, match):
    model = _vit()
    with pytest.raises(err, match=match):
        vlprune.patch(model, **kwargs)
    assert not vlprune.is_patched(model)


# ------------------------------------------------------------------------- saved configs


@pytest.mark.parametrize("cfg", [
    ReductionConfig(merge_r=(8, 0.5)),
    ReductionConfig(merge_r=[4, 4, 2], prune_keep=[0.8, 0.01], prune_layers=(3, 11),
                    prune_recycle=True),
    ReductionConfig(visual_keep=64, visual_score="dominant_contextual", visual_contextual=16),
    ReductionConfig(),
])
def test_config_json_round_trip(cfg, tmp_path):
    path = tmp_path / "c.json"
    cfg.save(path)
    assert ReductionConfig.load(path) == cfg
    # a calibration file holds it under "config"
    path.write_text(json.dumps({"config": json.loads(path.read_text()), "calibration": {}}))
    assert ReductionConfig.load(path) == cfg


def test_config_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        ReductionConfig.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{merge_r: 8")
    with pytest.raises(ValueError, match="is not JSON"):
        ReductionConfig.load(bad)
    bad.write_text(json.dumps({"merge": 8}))
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['merge'\]"):
        ReductionConfig.load(bad)
    bad.write_text(json.dumps({"merge_r": {"r": 8}}))
    with pytest.raises(ValueError, match="inflection"):
        ReductionConfig.load(bad)


# ------------------------------------------------------------------------------- the CLI


def _image_folder(path, n=6):
    from PIL import Image

    path.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(IMG, IMG, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(path / f"img{i}.png")
    return path


def test_cli_calibrate_then_config_in_describe_and_bench(tmp_path, capsys):
    from vlprune.cli.main import main

    data = _image_folder(tmp_path / "imgs")
    out = tmp_path / "cal.json"
    with pytest.warns(UserWarning, match="random weights"):
        rc = main(["calibrate", "--model", "test_vit", "--data", str(data), "--flops", "0.7",
                   "--screen", "3", "--finalists", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "chosen:" in text and "| setting |" in text
    saved = json.loads(out.read_text())
    assert saved["calibration"]["flops_ratio"] <= 0.7
    cfg = ReductionConfig.load(out)
    assert not cfg.is_identity
    assert main(["describe", "--model", "test_vit", "--config", str(out)]) == 0
    assert "FLOPs" in capsys.readouterr().out
    assert main(["describe", "--model", "test_vit", "--config", str(out), "--merge-r", "2"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--flops", "1.2"], "--flops must be in"),
    (["--speedup", "0.5"], "--speedup must be > 1"),
    (["--flops", "0.5", "--screen", "0"], "--screen must be >= 1"),
])
def test_cli_calibrate_refusals(argv, match, tmp_path, capsys):
    from vlprune.cli.main import main

    data = _image_folder(tmp_path / "imgs", n=2)
    assert main(["calibrate", "--model", "test_vit", "--data", str(data), *argv]) == 2
    assert match in capsys.readouterr().err


def test_cli_config_file_errors(tmp_path, capsys):
    from vlprune.cli.main import main

    with pytest.raises(SystemExit) as e:  # argparse refuses the option's value
        main(["describe", "--model", "test_vit", "--config", str(tmp_path / "x.json")])
    assert e.value.code == 2
    assert "config file not found" in capsys.readouterr().err
