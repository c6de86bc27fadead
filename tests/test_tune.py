"""`vlprune.tune` and `vlprune tune`: label-free self-distillation of a patched model, on
timm's tiny test_vit (random weights, 64 px: 16 patches + the class token) and generated
images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vlprune
from vlprune.cli import main
from vlprune.tune import TuneStep, tuned_parameter_names

timm = pytest.importorskip("timm")

torch.set_num_threads(1)  # tiny ops: a second thread only waits on a busy machine

SIZE = 64
CLASSES = 5


def _fresh(num_classes: int = CLASSES, seed: int = 0) -> torch.nn.Module:
    """test_vit with weights spread enough (std 0.3) that reduction changes the outputs."""
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", num_classes=num_classes, img_size=SIZE)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


def _patched(**settings) -> torch.nn.Module:
    return vlprune.patch(_fresh(**settings), merge_r=2)


def _batch(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _clean_out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unreduced output (the teacher's function)."""
    with torch.no_grad(), vlprune.disabled(model):
        return model(x)


LR = {"norms-biases": 1e-2, "lora": 1e-2, "all": 2e-3}


@pytest.mark.parametrize("params", ["norms-biases", "lora", "all"])
def test_loss_falls_on_a_fixed_batch(params):
    if params == "lora":
        pytest.importorskip("peft")
    model = _patched()
    x = _batch()
    result = vlprune.tune(model, x, steps=12, params=params, lr=LR[params], batch_size=8,
                          augment=False, schedule="constant")
    assert result.loss == "kl" and len(result.losses) == 12
    assert result.losses[0] > 1e-3  # reduction changes the outputs: something to learn
    assert sum(result.losses[-3:]) / 3 < 0.5 * result.losses[0], result.losses
    # the model is tuned in place and stays patched; flags and mode are given back
    assert vlprune.is_patched(model) and not model.training
    assert all(p.requires_grad for p in model.parameters())


def test_norms_biases_changes_only_norms_and_biases():
    model = _patched()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = vlprune.tune(model, _batch(), steps=4, params="norms-biases", lr=1e-2,
                          batch_size=8, augment=False)
    allowed = set(tuned_parameter_names(model, "norms-biases"))
    assert allowed and all(n.endswith("bias") or "norm" in n for n in allowed)
    assert "blocks.0.norm1.weight" in allowed and "blocks.0.attn.qkv.bias" in allowed
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= allowed, sorted(changed - allowed)
    assert set(result.tuned) == allowed
    assert result.num_trained == sum(p.numel() for n, p in model.named_parameters()
                                     if n in allowed)


def test_lora_acts_in_the_patched_attention():
    """The patched attention calls its projections as modules, so an adapter on qkv changes
    the reduced forward (where the block runs vlprune's copy of the attention) too."""
    peft = pytest.importorskip("peft")
    model = _patched()
    x = _batch(2)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["qkv"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        on = model(x)
        with wrapped.disable_adapter():
            off = model(x)
    assert not torch.allclose(on, off, atol=1e-3)
    wrapped.unload()


def test_lora_merges_back_into_the_original_keys():
    pytest.importorskip("peft")
    model = _patched()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = _batch(4, seed=7)
    seen = {}

    def last_step(info: TuneStep) -> None:
        if info.step == info.steps:  # adapters still separate: the tuned function
            with torch.no_grad():
                seen["reduced"] = info.model(x)
            seen["full"] = _clean_out(info.model, x)

    result = vlprune.tune(model, _batch(), steps=6, params="lora", lr=1e-2, batch_size=8,
                          augment=False, lora_rank=2, callback=last_step)
    sd = result.state_dict
    assert list(sd) == list(original)
    assert all(sd[k].shape == original[k].shape for k in sd)
    assert not any("lora" in name for name, _ in model.named_modules())
    # every adapted weight moved, qkv included (gradient through the patched attention)
    for i in range(len(model.blocks)):
        for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            key = f"blocks.{i}.{part}.weight"
            assert not torch.equal(sd[key], original[key]), key
            assert f"blocks.{i}.{part}.weight" in result.tuned
    assert torch.equal(sd["blocks.0.norm1.weight"], original["blocks.0.norm1.weight"])
    # merged weights give the tuned function, reduced and unreduced, patched or not
    with torch.no_grad():
        torch.testing.assert_close(model(x), seen["reduced"], atol=2e-5, rtol=1e-4)
    fresh = timm.create_model("test_vit", num_classes=CLASSES, img_size=SIZE).eval()
    fresh.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), seen["full"], atol=2e-5, rtol=1e-4)
    vlprune.unpatch(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), seen["full"], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("params", ["norms-biases", "lora", "all"])
def test_frozen_teacher_stays_the_original_model(params):
    if params == "lora":
        pytest.importorskip("peft")
    model = _patched()
    x = _batch(4, seed=3)
    before = _clean_out(model, x)
    seen = {}

    def last_step(info: TuneStep) -> None:
        if info.step == info.steps:
            seen["teacher"] = info.teacher(x)
            seen["now"] = _clean_out(info.model, x)

    vlprune.tune(model, _batch(), steps=3, params=params, lr=LR[params], batch_size=8,
                 augment=False, callback=last_step)
    assert not seen["teacher"].requires_grad
    torch.testing.assert_close(seen["teacher"], before, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(seen["now"], before, atol=1e-4)  # the weights did move


def test_shared_teacher_is_the_current_weights():
    model = _patched()
    x = _batch(4, seed=3)
    before = _clean_out(model, x)
    seen = {}

    def last_step(info: TuneStep) -> None:
        if info.step == info.steps:
            seen["teacher"] = info.teacher(x)
            seen["now"] = _clean_out(info.model, x)

    vlprune.tune(model, _batch(), steps=3, params="all", lr=2e-3, batch_size=8,
                 augment=False, teacher="shared", callback=last_step)
    torch.testing.assert_close(seen["teacher"], seen["now"])
    assert not torch.allclose(seen["teacher"], before, atol=1e-4)


def test_embedding_output_takes_the_cosine_loss_and_the_same_seed_repeats():
    model = vlprune.patch(_fresh(num_classes=0), merge_r=2)  # pooled features, no head
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = []
    for _ in range(2):
        model.load_state_dict(state)
        runs.append(vlprune.tune(model, _batch(12), steps=4, lr=1e-2, batch_size=6, seed=5))
    assert runs[0].loss == "cosine"
    assert runs[0].losses == runs[1].losses  # augmentation and order from the seed


def _open_clip_tower() -> torch.nn.Module:
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, width=32, layers=3, heads=2,
                             mlp_ratio=2.0, output_dim=16)


def _hf_clip_tower() -> torch.nn.Module:
    import transformers as tf

    return tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=16))


def _embedding(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.image_embeds


@pytest.mark.parametrize("family", ["open_clip", "hf_clip"])
def test_image_towers_distil_embeddings_and_merge_back(family):
    """Embedding outputs take the cosine loss; LoRA leaves nn.MultiheadAttention alone (its
    upstream forward reads out_proj.weight directly) and merges back into the tower's keys."""
    pytest.importorskip("peft")
    pytest.importorskip("open_clip" if family == "open_clip" else "transformers")
    make = _open_clip_tower if family == "open_clip" else _hf_clip_tower
    torch.manual_seed(0)
    model = vlprune.patch(make().eval(), merge_r=2)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    seen = {}

    def last_step(info: TuneStep) -> None:
        if info.step == info.steps:
            seen["full"] = _embedding(_clean_out(info.model, x))

    result = vlprune.tune(model, x, steps=4, params="lora", lr=1e-2, batch_size=4,
                          lora_rank=2, callback=last_step)
    assert result.loss == "cosine" and result.tuned
    if family == "open_clip":
        assert not any("out_proj" in n for n in result.tuned)
        with pytest.raises(ValueError, match="nn.MultiheadAttention"):
            vlprune.tune(model, x, steps=1, params="lora", lora_targets=["out_proj"])
    fresh = make().eval()
    fresh.load_state_dict(result.state_dict, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(_embedding(fresh(x)), seen["full"], atol=2e-5, rtol=1e-4)


def _write_images(folder: Path, n: int, seed: int) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (int(v) for v in torch.randint(48, 90, (2,), generator=gen))
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"img_{i}.png")


def test_folder_and_dataset_inputs(tmp_path):
    pytest.importorskip("PIL")
    _write_images(tmp_path / "flat", 5, seed=0)
    (tmp_path / "flat" / "zz_broken.jpg").write_bytes(b"not an image" * 8)
    model = _patched()
    with pytest.warns(UserWarning, match="1 image"):
        result = vlprune.tune(model, tmp_path / "flat", steps=3, batch_size=4)
    assert len(result.skipped) == 1 and "zz_broken.jpg" in result.skipped[0]
    pairs = [(x, 0) for x in _batch(5)]  # a Dataset-like list of (tensor, label)
    data = torch.utils.data.TensorDataset(torch.stack([p[0] for p in pairs]), torch.zeros(5))
    result = vlprune.tune(model, data, steps=2, batch_size=4)
    assert len(result.losses) == 2 and not result.skipped


def test_bad_input_is_refused(tmp_path):
    x = _batch(2)
    with pytest.raises(ValueError, match="not patched"):
        vlprune.tune(_fresh(), x, steps=1)
    model = _patched()
    cases = [
        (dict(params="heads"), "unknown params 'heads'; allowed: norms-biases, lora, all"),
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(steps=2.5), "steps must be an int >= 1"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(temperature=-1.0), "temperature must be a finite number > 0"),
        (dict(teacher="copy"), "unknown teacher 'copy'"),
        (dict(loss="ce"), "unknown loss 'ce'"),
        (dict(loss="cosine", temperature=2.0), "temperature applies to the kl loss only"),
        (dict(lora_rank=4), "apply to params='lora' only"),
        (dict(batch_size=0), "batch_size must be an int >= 1"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            vlprune.tune(model, x, **{"steps": 1, **kw})
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        vlprune.tune(model, tmp_path / "absent", steps=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images in"):
        vlprune.tune(model, tmp_path / "empty", steps=1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        vlprune.tune(model, torch.randn(3, SIZE, SIZE), steps=1)
    with pytest.raises(ValueError, match="reduces no tokens"):
        vlprune.tune(vlprune.patch(_fresh(), merge_r=0), x, steps=1)
    with pytest.raises(ValueError, match="unknown suffix"):
        vlprune.tune(model, x, steps=1, augment=False).save(tmp_path / "out.ckpt")


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("PIL")
    root = tmp_path_factory.mktemp("tune_cli")
    for c in range(2):
        _write_images(root / "tree" / f"n{c:08d}", 3, seed=c)
    (root / "tree" / "n00000001" / "zz_broken.jpg").write_bytes(b"not an image" * 8)
    weights = root / "test_vit.pth"
    torch.save(_fresh().state_dict(), weights)
    config = root / "calibrated.json"  # a calibration's file: the settings under "config"
    config.write_text(json.dumps({"config": {"merge_r": 1, "prune_keep": 0.75,
                                             "prune_layers": [2]}, "flops": 0.8}))
    return {"tree": root / "tree", "weights": weights, "config": config}


def _cli(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["tune", "--model", "test_vit", "--num-classes", str(CLASSES), "--img-size",
            str(SIZE), "--weights", str(data["weights"]), "--data", str(data["tree"]),
            "--steps", "3", "-b", "4", "--threads", "1", "--no-progress", "--out", str(out),
            *extra]


@pytest.mark.parametrize("out_name, extra", [
    ("tuned.safetensors", ("--merge-r", "2")),
    ("tuned.pth", ("--params", "lora", "--lora-rank", "2", "--lora-targets", "qkv,fc1")),
])
def test_cli_end_to_end(cli_data, tmp_path, capsys, out_name, extra):
    if "lora" in extra:
        pytest.importorskip("peft")
        extra = (*extra, "--config", str(cli_data["config"]))
    out = tmp_path / out_name
    with pytest.warns(UserWarning, match="1 image.* could not be read"):
        assert main(_cli(cli_data, out, *extra)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[lines.index("--result") + 1])
    assert result["steps"] == 3 and result["skipped"] == 1 and result["out"] == str(out)
    assert result["params"] == ("lora" if "lora" in extra else "norms-biases")
    if "lora" in extra:
        assert result["config"] == {"merge_r": 1, "prune_keep": 0.75, "prune_layers": [2]}
    from vlprune.eval.weights import read_state_dict

    sd = read_state_dict(out)
    fresh = timm.create_model("test_vit", num_classes=CLASSES, img_size=SIZE)
    fresh.load_state_dict(sd, strict=True)  # the unpatched class takes it as it is
    original = torch.load(cli_data["weights"], weights_only=True)
    assert any(not torch.equal(sd[k], original[k]) for k in sd)


@pytest.mark.parametrize("extra, message", [
    (("--merge-r", "2", "--steps", "0"), "--steps must be >= 1"),
    (("--merge-r", "2", "--data", "/nonexistent/folder"), "--data folder not found"),
    (("--merge-r", "2", "--config", "CONFIG"), "not both"),
    ((), "give the reduction to tune for"),
    (("--merge-r", "0"), "reduce no tokens"),
    (("--merge-r", "2", "--lora-rank", "4"), "need --params lora"),
    (("--merge-r", "2", "--out", "x.ckpt"), "unknown suffix"),
])
def test_cli_refuses_bad_input(cli_data, tmp_path, capsys, extra, message):
    extra = tuple(str(cli_data["config"]) if e == "CONFIG" else e for e in extra)
    assert main(_cli(cli_data, tmp_path / "out.pt", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlprune tune: error:") and message in err, err
    assert not (tmp_path / "out.pt").exists()


def test_cli_refuses_unknown_params_and_temperature(cli_data, tmp_path, capsys):
    for extra in (("--params", "heads"), ("--temperature", "0")):
        with pytest.raises(SystemExit) as e:
            main(_cli(cli_data, tmp_path / "out.pt", "--merge-r", "2", *extra))
        assert e.value.code == 2
    assert "invalid choice: 'heads'" in capsys.readouterr().err
