"""ImageNet-style top-1 / top-5 evaluation of a classifier on a local folder of images.

The folder holds a ``labels.csv`` (header with at least ``filename,class_index``) and the
images, in an ``images/`` subfolder or next to the csv. Images go through timm's eval
transform for the model (resize, center crop, normalize with the model's mean/std), which
must match the weights' training preprocessing or accuracy drops by tens of points.

Decoding JPEGs dominates the cost of a small evaluation, so :func:`load_eval_tensors` decodes
once into tensors that :func:`evaluate_top1` can reuse across many model settings.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "ImageFolderCSV",
    "resolve_eval_config",
    "eval_transform",
    "evaluate_top1",
    "load_eval_tensors",
    "preload",
]

_REQUIRED_COLUMNS = ("filename", "class_index")


class ImageFolderCSV(Dataset):
    """Images listed in ``<root>/labels.csv``; items are ``(transform(image), class_index)``.

    ``transform`` receives an RGB ``PIL.Image``; without one the image is returned as a
    float tensor in [0, 1] at its own size. ``limit`` keeps the first ``limit`` rows.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Any], Any] | None = None,
                 *, limit: int | None = None, csv_name: str = "labels.csv") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        csv_path = self.root / csv_name
        if not csv_path.is_file():
            raise FileNotFoundError(f"label file not found: {csv_path}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        images_dir = self.root / "images"
        self.image_dir = images_dir if images_dir.is_dir() else self.root
        self.transform = transform

        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            absent = [c for c in _REQUIRED_COLUMNS if c not in columns]
            if absent:
                raise ValueError(
                    f"{csv_path} lacks column(s) {absent}; its header is {columns}, "
                    f"required: {list(_REQUIRED_COLUMNS)}"
                )
            rows = []
            for row in reader:
                if limit is not None and len(rows) >= limit:
                    break
                rows.append((row["filename"], int(row["class_index"])))

        missing = [name for name, _ in rows if not (self.image_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in {csv_path} are not in {self.image_dir}, "
                f"e.g. {missing[0]}"
            )
        self.samples: list[tuple[Path, int]] = [(self.image_dir / n, c) for n, c in rows]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            img = img.convert("RGB")
        if self.transform is not None:
            return self.transform(img), label
        from torchvision.transforms.functional import to_tensor

        return to_tensor(img), label


def resolve_eval_config(model: torch.nn.Module | str,
                        override: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """timm's resolved eval data config for a model or a model name (``arch.tag`` allowed).

    A model built with ``pretrained=False`` still carries its pretrained_cfg, so this gives
    the preprocessing its published weights were trained with. ``override`` replaces keys
    (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``).
    """
    from timm.data import resolve_data_config

    if isinstance(model, str):
        from timm.models import get_pretrained_cfg

        pretrained = get_pretrained_cfg(model)
        if pretrained is None:
            raise ValueError(f"timm has no pretrained config for {model!r}")
        cfg = resolve_data_config({}, pretrained_cfg=pretrained.to_dict())
    else:
        cfg = resolve_data_config({}, model=model)
    if override:
        cfg.update(override)
    return cfg


def eval_transform(model: torch.nn.Module | str,
                   data_config: Mapping[str, Any] | None = None) -> Callable[[Any], Any]:
    """timm's eval transform (PIL image -> normalized tensor) for ``model``.

    ``data_config`` overrides keys of the resolved config (see :func:`resolve_eval_config`).
    """
    from timm.data import create_transform

    return create_transform(**resolve_eval_config(model, data_config), is_training=False)


def preload(dataset: Dataset, *, batch_size: int = 50,
            num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and transform a whole dataset once: ``(images[N, ...], labels[N])``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(torch.as_tensor(y))
    if not images:
        raise ValueError("dataset is empty")
    return torch.cat(images), torch.cat(labels).long()


def load_eval_tensors(root: str | os.PathLike, model: torch.nn.Module | str, *,
                      limit: int | None = None,
                      data_config: Mapping[str, Any] | None = None,
                      num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``root`` (see :class:`ImageFolderCSV`) preprocessed for ``model``, as tensors.

    The result can be passed to :func:`evaluate_top1` as often as needed; 500 images at
    224 px take about 300 MB.
    """
    dataset = ImageFolderCSV(root, eval_transform(model, data_config), limit=limit)
    return preload(dataset, num_workers=num_workers)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected logits as a tensor")


def _batches(data: Any, batch_size: int,
             num_workers: int) -> tuple[Iterable[tuple[torch.Tensor, Any]], int]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
        isinstance(t, torch.Tensor) for t in data
    ):
        images, labels = data
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        starts = range(0, len(images), batch_size)
        return ((images[i:i + batch_size], labels[i:i + batch_size]) for i in starts), len(starts)
    if isinstance(data, DataLoader):
        return data, len(data)
    if isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        return loader, len(loader)
    raise TypeError(
        f"expected a DataLoader, a Dataset or an (images, labels) tensor pair, "
        f"got {type(data).__name__}"
    )


def evaluate_top1(model: torch.nn.Module, data: Any, *, batch_size: int = 50,
                  num_workers: int = 0, progress: bool = True,
                  max_batches: int | None = None) -> dict[str, float | int]:
    """Top-1 and top-5 accuracy (percent) of ``model`` on ``data``.

    ``data`` is a DataLoader, a Dataset (batched here) or an ``(images, labels)`` pair from
    :func:`load_eval_tensors`. The model is called as ``model(images)`` in eval mode under
    ``torch.inference_mode()`` (its train/eval mode is restored afterwards), so a patched
    model is measured as it is. Returns ``{"top1", "top5", "n", "seconds"}``; ``seconds``
    covers the whole loop, data loading included.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches, total = _batches(data, batch_size, num_workers)
    if max_batches is not None:
        total = min(total, max_batches)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")

    was_training = model.training
    model.eval()
    n = correct1 = correct5 = 0
    start = time.perf_counter()
    try:
        with torch.inference_mode(), tqdm(total=total, disable=not progress,
                                          desc="eval", unit="batch") as bar:
            for i, (images, labels) in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                labels = torch.as_tensor(labels).to(device)
                logits = _logits(model(images.to(device)))
                k = min(5, logits.shape[-1])
                topk = logits.topk(k, dim=-1).indices
                hits = topk == labels[:, None]
                correct1 += int(hits[:, 0].sum())
                correct5 += int(hits.any(dim=-1).sum())
                n += len(labels)
                bar.update(1)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    if n == 0:
        raise ValueError("no images were evaluated (empty data or max_batches=0)")
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "n": n,
            "seconds": seconds}
