"""Load a local checkpoint file into a model, without any download.

Handles the formats that ViT weights are shipped in: ``.npz`` holding either timm
``state_dict`` keys or an original big_vision / JAX layout (``Transformer/encoderblock_0/...``,
converted by timm's own loader), ``.safetensors``, and torch pickles (``.pth``, ``.pt``,
``.bin``, read with ``weights_only=True`` so loading a file cannot run code).

A strict load checks names and shapes before copying anything, so a mismatch leaves the
model untouched and the error names the offending keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["SUFFIXES", "CheckpointError", "load_weights", "read_state_dict"]

SUFFIXES = (".npz", ".safetensors", ".pth", ".pt", ".bin")

# what a file of each suffix must be, for the errors
_EXPECTED = {
    ".npz": "a numpy .npz archive of numeric arrays (timm state_dict names or a big_vision / "
            "JAX layout)",
    ".safetensors": "a safetensors file of tensors (safetensors.torch.save_file(state_dict, "
                    "path))",
    ".pth": "a torch.save file of a state_dict (names -> tensors) that torch.load can read "
            "with weights_only=True",
}


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint file that cannot be read (not the format its suffix names, or not a
    state_dict), or that does not fit the model. A ValueError (bad input); also a
    RuntimeError, which a mismatch was before."""

# Training scripts save the weights under one of these keys next to optimizer state etc.
_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
_SHOWN_KEYS = 5


def _is_big_vision(keys: list[str]) -> bool:
    return any(k.endswith("embedding/kernel") or k.startswith("Transformer/") for k in keys)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} does not hold a state_dict (a mapping of names to tensors, optionally "
            f"under one of {list(_WRAPPER_KEYS)})"
        )
    sd = dict(obj)
    # Checkpoints saved from DataParallel / DDP prefix every key with "module.".
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"unsupported checkpoint suffix {p.suffix!r} for {p}; allowed: {', '.join(SUFFIXES)}"
        )
    return p


def _unreadable(path: Path, reason: str) -> CheckpointError:
    expected = _EXPECTED.get(path.suffix.lower(), _EXPECTED[".pth"])
    return CheckpointError(f"cannot read {path}: {reason}; expected {expected}")


def _npz_arrays(path: Path, keys_only: bool = False) -> dict[str, Any]:
    """The arrays of an ``.npz`` file as numpy arrays, never unpickling anything (with
    ``keys_only``: the names, mapped to ``None``, without reading the arrays)."""
    import zipfile

    import numpy as np

    if not zipfile.is_zipfile(path):
        raise _unreadable(path, "it is not an .npz archive (a zip of .npy arrays)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: None if keys_only else np.array(z[k]) for k in z.files}
    except ValueError as e:
        if "allow_pickle" in str(e):  # numpy's advice (unpickling) is not taken here
            raise _unreadable(path, "it holds object arrays (pickled Python objects), which "
                              "are never unpickled here") from None
        raise _unreadable(path, f"{e}") from None
    except Exception as e:  # a damaged archive
        raise _unreadable(path, f"{type(e).__name__}: {e}") from None


def _torch_reason(path: Path, error: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in one line."""
    import re
    import zipfile

    with open(path, "rb") as f:
        magic = f.read(2)
    if not zipfile.is_zipfile(path) and magic[:1] != b"\x80":  # neither format torch writes
        return "it is not a torch checkpoint (neither torch.save's zip format nor a pickle)"
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (f"it holds {found.group(1)}, which torch.load(weights_only=True) does not "
                "load (it could run code): save the state_dict alone, "
                "torch.save(model.state_dict(), path)")
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    detail = found.group(1) if found else (text.splitlines() or [""])[0]
    return f"{type(error).__name__}: {' '.join(detail.split())[:200]}"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a ``{name: tensor}`` dict (no model needed).

    A big_vision ``.npz`` is returned with its original JAX names and array layouts; only
    :func:`load_weights` converts those. A file that is not what its suffix names raises
    :class:`CheckpointError` naming the file and the format expected.
    """
    p = _check_path(path)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return {k: torch.from_numpy(v) for k, v in _npz_arrays(p).items()}
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:  # safetensors' own error type (a header it cannot parse, ...)
            raise _unreadable(p, f"{type(e).__name__}: {e}") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler raises many kinds
        raise _unreadable(p, _torch_reason(p, e)) from None
    return _unwrap(obj, p)


def _mismatch_message(path: Path, missing: list[str], unexpected: list[str],
                      shapes: list[str]) -> str:
    def show(keys: list[str]) -> str:
        extra = f" ... (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
        return ", ".join(keys[:_SHOWN_KEYS]) + extra

    parts = [f"checkpoint {path} does not match the model:"]
    if missing:
        parts.append(f"  {len(missing)} missing key(s): {show(missing)}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected key(s): {show(unexpected)}")
    if shapes:
        parts.append(f"  {len(shapes)} shape mismatch(es): {show(shapes)}")
    if not shapes:
        parts.append("  pass strict=False to load the matching keys only")
    return "\n".join(parts)


def _load_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path,
                     strict: bool) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    # torch refuses shape mismatches even when strict=False, so those always fail here.
    if shapes or (strict and (missing or unexpected)):
        raise CheckpointError(_mismatch_message(path, missing, unexpected, shapes))
    model.load_state_dict(sd, strict=strict)


def _load_big_vision(model: torch.nn.Module, path: Path, keys: list[str], strict: bool) -> None:
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"{path} is a big_vision/JAX checkpoint; only timm VisionTransformer models can "
            f"load it, got {type(model).__name__}"
        )
    head = getattr(model, "head", None)
    if strict and isinstance(head, torch.nn.Linear):
        # timm's loader silently keeps a random head when the class count differs.
        head_bias = [k for k in keys if k.endswith("head/bias")]
        if not head_bias:
            raise CheckpointError(
                f"checkpoint {path} has no classifier head (head/kernel, head/bias) for the "
                f"model's {head.out_features}-class head; pass strict=False to keep it as is"
            )
        import numpy as np

        with np.load(path) as z:
            n_ckpt = z[head_bias[0]].shape[-1]
        if n_ckpt != head.out_features:
            raise CheckpointError(
                f"checkpoint {path} has a {n_ckpt}-class head but the model has "
                f"{head.out_features} classes; pass strict=False to keep the model's head"
            )
    try:
        _load_weights(model, str(path))
    except KeyError as err:
        raise CheckpointError(
            f"checkpoint {path} lacks {err} needed by {type(model).__name__} "
            f"(depth {len(model.blocks)})"
        ) from err


def load_weights(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load the checkpoint at ``path`` into ``model`` in place.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for a suffix other than
    those in :data:`SUFFIXES`, and :class:`CheckpointError` (a ValueError and a RuntimeError)
    for a file that is not what its suffix names, or naming the keys when the checkpoint and
    the model disagree (missing or unexpected keys when ``strict``, wrong shapes always).
    """
    p = _check_path(path)
    if p.suffix.lower() == ".npz":
        keys = list(_npz_arrays(p, keys_only=True))
        if _is_big_vision(keys):
            _load_big_vision(model, p, keys, strict)
            return
    _load_state_dict(model, read_state_dict(p), p, strict)
