"""Checkpoint loading: every supported format round-trips, and mismatches fail clearly."""

from __future__ import annotations

import copy
import functools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vlprune.eval.weights import SUFFIXES, CheckpointError, load_weights, read_state_dict

timm = pytest.importorskip("timm")

TINY_NPZ = "vit_tiny_patch16_224.augreg_in21k_ft_in1k/vit_tiny_patch16_224.augreg_in21k_ft_in1k.npz"


@functools.cache
def _built(seed: int, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=num_classes).eval()


def _model(seed: int, num_classes: int = 1000) -> torch.nn.Module:
    # timm's weight init dominates the cost of these tests: build each model once.
    return copy.deepcopy(_built(seed, num_classes))


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def _assert_different_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert not torch.equal(a.patch_embed.proj.weight, b.patch_embed.proj.weight)


def _to_big_vision(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Write a timm ViT in the original JAX AugReg layout (the inverse of timm's loader)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d = model.embed_dim
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i, block in enumerate(model.blocks):
        h = block.attn.num_heads
        p, bp = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = bp + "MultiHeadDotProductAttention_1/"
        qkv_w = np.split(sd[p + "attn.qkv.weight"], 3)
        qkv_b = np.split(sd[p + "attn.qkv.bias"], 3)
        for name, w, b in zip(("query", "key", "value"), qkv_w, qkv_b):
            out[mha + name + "/kernel"] = w.T.reshape(d, h, d // h)
            out[mha + name + "/bias"] = b.reshape(h, d // h)
        out[mha + "out/kernel"] = sd[p + "attn.proj.weight"].reshape(d, h, d // h).transpose(1, 2, 0)
        out[mha + "out/bias"] = sd[p + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[bp + ln + "/scale"] = sd[p + norm + ".weight"]
            out[bp + ln + "/bias"] = sd[p + norm + ".bias"]
        for r in range(2):
            out[bp + f"MlpBlock_3/Dense_{r}/kernel"] = sd[p + f"mlp.fc{r + 1}.weight"].T
            out[bp + f"MlpBlock_3/Dense_{r}/bias"] = sd[p + f"mlp.fc{r + 1}.bias"]
    return out


def _save(sd: dict[str, torch.Tensor] | dict, path: Path) -> Path:
    if path.suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in sd.items()})
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_each_format(tmp_path: Path, suffix: str) -> None:
    src, dst = _model(0), _model(1)
    _assert_different_weights(src, dst)
    path = _save(dict(src.state_dict()), tmp_path / f"ckpt{suffix}")
    load_weights(dst, path)
    _assert_same_weights(src, dst)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize("wrap", ["state_dict", "model", "state_dict_ema", "module."])
def test_unwraps_training_checkpoints(tmp_path: Path, wrap: str) -> None:
    src, dst = _model(0), _model(1)
    sd = dict(src.state_dict())
    if wrap == "module.":
        ckpt = {"module." + k: v for k, v in sd.items()}
    else:
        ckpt = {wrap: sd, "epoch": 3}
    load_weights(dst, _save(ckpt, tmp_path / "ckpt.pth"))
    _assert_same_weights(src, dst)


class _Payload:
    pass


def test_pickles_with_code_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _model(0).state_dict(), "obj": _Payload()}, path)
    # refused by torch's weights-only unpickler, named in one line (the class it would run)
    with pytest.raises(CheckpointError, match=r"evil.pth: it holds .*_Payload, which "
                       r"torch.load\(weights_only=True\) does not load") as info:
        load_weights(_model(1), path)
    assert isinstance(info.value.__context__, pickle.UnpicklingError)


def test_big_vision_npz(tmp_path: Path) -> None:
    src, dst = _model(0), _model(1)
    path = tmp_path / "jax.npz"
    np.savez(path, **_to_big_vision(src))
    assert "Transformer/encoderblock_0/LayerNorm_0/scale" in read_state_dict(path)
    load_weights(dst, path)
    _assert_same_weights(src, dst)


def test_big_vision_npz_head_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "jax.npz"
    np.savez(path, **_to_big_vision(_model(0)))
    dst = _model(1, num_classes=10)
    head_before = dst.head.weight.clone()
    with pytest.raises(RuntimeError, match="1000-class head"):
        load_weights(dst, path)
    load_weights(dst, path, strict=False)  # body loads, the 10-class head is kept
    assert torch.equal(dst.head.weight, head_before)
    torch.testing.assert_close(dst.norm.weight, _model(0).norm.weight, rtol=0, atol=0)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_weights(_model(0), path)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.ckpt"
    torch.save(_model(0).state_dict(), path)
    with pytest.raises(ValueError, match=r"\.safetensors") as err:
        load_weights(_model(0), path)
    assert all(s in str(err.value) for s in SUFFIXES)


def test_strict_mismatch_names_keys_and_leaves_model_untouched(tmp_path: Path) -> None:
    src, dst = _model(0), _model(1)
    sd = dict(src.state_dict())
    del sd["norm.weight"]
    sd["extra.thing"] = torch.zeros(3)
    path = _save(sd, tmp_path / "ckpt.safetensors")
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError) as err:
        load_weights(dst, path)
    msg = str(err.value)
    assert "norm.weight" in msg and "extra.thing" in msg and "strict=False" in msg
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k

    load_weights(dst, path, strict=False)
    assert torch.equal(dst.pos_embed, src.pos_embed)
    assert torch.equal(dst.norm.weight, before["norm.weight"])


def test_shape_mismatch_fails_even_when_not_strict(tmp_path: Path) -> None:
    path = _save(dict(_model(0).state_dict()), tmp_path / "ckpt.pt")
    dst = _model(1, num_classes=10)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"head\.weight: checkpoint \(1000, 64\)"):
            load_weights(dst, path, strict=strict)


@pytest.mark.realdata
def test_real_vit_tiny_npz(assets_dir: Path) -> None:
    path = assets_dir / TINY_NPZ
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    # These weights ship with timm's own state_dict names, not the JAX layout.
    assert "blocks.0.attn.qkv.weight" in arrays
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    load_weights(model, path)
    sd = model.state_dict()
    assert sd.keys() == arrays.keys()
    for k, v in arrays.items():
        assert np.array_equal(sd[k].numpy(), v), k
