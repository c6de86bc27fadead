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

__all__ = ["SUFFIXES", "load_weights", "read_state_dict"]

SUFFIXES = (".npz", ".safetensors", ".pth", ".pt", ".bin")

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
        raise ValueError(
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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a ``{name: tensor}`` dict (no model needed).

    A big_vision ``.npz`` is returned with its original JAX names and array layouts; only
    :func:`load_weights` converts those.
    """
    p = _check_path(path)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        import numpy as np

        with np.load(p, allow_pickle=False) as z:
            return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    return _unwrap(torch.load(p, map_location="cpu", weights_only=True), p)


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
        raise RuntimeError(_mismatch_message(path, missing, unexpected, shapes))
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
            raise RuntimeError(
                f"checkpoint {path} has no classifier head (head/kernel, head/bias) for the "
                f"model's {head.out_features}-class head; pass strict=False to keep it as is"
            )
        import numpy as np

        with np.load(path) as z:
            n_ckpt = z[head_bias[0]].shape[-1]
        if n_ckpt != head.out_features:
            raise RuntimeError(
                f"checkpoint {path} has a {n_ckpt}-class head but the model has "
                f"{head.out_features} classes; pass strict=False to keep the model's head"
            )
    try:
        _load_weights(model, str(path))
    except KeyError as err:
        raise RuntimeError(
            f"checkpoint {path} lacks {err} needed by {type(model).__name__} "
            f"(depth {len(model.blocks)})"
        ) from err


def load_weights(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load the checkpoint at ``path`` into ``model`` in place.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for a suffix other than
    those in :data:`SUFFIXES`, and ``RuntimeError`` naming the keys when the checkpoint and
    the model disagree (missing or unexpected keys when ``strict``, wrong shapes always).
    """
    p = _check_path(path)
    if p.suffix.lower() == ".npz":
        import numpy as np

        with np.load(p, allow_pickle=False) as z:
            keys = list(z.files)
        if _is_big_vision(keys):
            _load_big_vision(model, p, keys, strict)
            return
    _load_state_dict(model, read_state_dict(p), p, strict)
