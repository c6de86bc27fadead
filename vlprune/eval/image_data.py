"""Reading images for the evaluations: classification folders (:class:`ImageFolderCSV`,
:class:`ImageFolderTree`), tolerant decoding (:func:`decode_images`, :func:`iter_images`:
unreadable images are skipped and reported), timm's eval preprocessing
(:func:`resolve_eval_config`, :func:`eval_transform`), single images for the VQA and caption
sets (:func:`open_rgb`, :func:`image_problem`), :class:`UnreadableImagesError`, and a plain
top-1 / top-5 pass over decoded tensors (:func:`evaluate_top1`).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodedImages",
    "UnreadableImagesError",
    "ImageFolderCSV",
    "ImageFolderTree",
    "check_labels",
    "dataset_labels",
    "decode_images",
    "default_workers",
    "iter_images",
    "image_problem",
    "load_item",
    "open_rgb",
    "sample_name",
    "resolve_eval_config",
    "eval_transform",
    "evaluate_top1",
    "load_eval_tensors",
    "preload",
]

_REQUIRED_COLUMNS = ("filename", "class_index")


def default_workers(most: int = 4) -> int:
    """Data-loading worker processes to use by default: ``most``, but no more than the CPUs
    this process may run on (more makes PyTorch warn that loading may be slow or freeze)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(most, cpus))


class UnreadableImagesError(ValueError):
    """Images (or the questions / images to caption whose image) that could not be read,
    with ``strict=True``, or none readable at all."""


def open_rgb(path: str | os.PathLike) -> Any:
    """The image at ``path``, decoded, as an RGB ``PIL.Image``."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def image_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be an image (missing, empty, not an image), or None. Only the
    header is read: a truncated file shows up when decoded."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path):
            pass
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _folder(root: str | os.PathLike, limit: int | None) -> Path:
    """``root`` as a Path, refusing a missing folder or a negative ``limit``."""
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return path


class ImageFolderCSV(Dataset):
    """Images listed in ``<root>/labels.csv``; items are ``(transform(image), class_index)``.

    ``transform`` receives an RGB ``PIL.Image``; without one the image is returned as a
    float tensor in [0, 1] at its own size. ``limit`` keeps the first ``limit`` rows.
    ``missing``: ``"error"`` (default) refuses a file listed in the csv but absent from the
    folder; ``"keep"`` keeps it listed, so that loading it fails (and a tolerant loader such
    as :func:`decode_images` counts it as skipped).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Any], Any] | None = None,
                 *, limit: int | None = None, csv_name: str = "labels.csv",
                 missing: str = "error") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        csv_path = self.root / csv_name
        if not csv_path.is_file():
            raise FileNotFoundError(f"label file not found: {csv_path}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        if missing not in ("error", "keep"):
            raise ValueError(f"missing must be 'error' or 'keep', got {missing!r}")
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
                try:
                    label = int(row["class_index"])
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{csv_path} line {reader.line_num}: class_index "
                        f"{row['class_index']!r} is not an integer"
                    ) from None
                rows.append((row["filename"], label))

        absent = [name for name, _ in rows if not (self.image_dir / name).is_file()]
        if absent and missing == "error":
            raise FileNotFoundError(
                f"{len(absent)} image(s) listed in {csv_path} are not in {self.image_dir}, "
                f"e.g. {absent[0]}"
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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderTree(Dataset):
    """The ``ImageFolder`` layout: ``<root>/<class folder>/<image>``.

    Class folders (ImageNet wnids, e.g. ``n01440764``) in sorted order give class indices
    0, 1, ...; ``classes`` lists them. Files with a suffix in ``extensions`` count as images
    (folders and other files are ignored). ``limit`` keeps the first ``limit`` images of a
    round-robin over the classes (first image of every class, then the second, ...), so a
    small limit still covers many classes. Items are ``(transform(image), class_index)``.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Any], Any] | None = None,
                 *, limit: int | None = None,
                 extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> None:
        self.root = _folder(root, limit)
        self.transform = transform
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise FileNotFoundError(
                f"{self.root} has no class sub-folders and no labels.csv; expected "
                "<root>/<class>/<image> (ImageFolder) or <root>/labels.csv with the images"
            )
        per_class = [
            sorted(p for p in (self.root / c).iterdir()
                   if p.is_file() and p.suffix.lower() in extensions)
            for c in self.classes
        ]
        if limit is None:
            samples = [(p, c) for c, files in enumerate(per_class) for p in files]
        else:
            samples = []
            for depth in range(max(map(len, per_class))):
                samples += [(files[depth], c) for c, files in enumerate(per_class)
                            if depth < len(files)]
            samples = samples[:limit]
        self.samples: list[tuple[Path, int]] = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return _load_path(*self.samples[index], self.transform)


class ImageFiles(Dataset):
    """The image files directly in a folder, sorted by name, without labels (each item's
    label is -1): unlabeled calibration or tuning images."""

    def __init__(self, root: str | os.PathLike, transform: Callable[[Any], Any] | None = None,
                 *, limit: int | None = None,
                 extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> None:
        self.root = _folder(root, limit)
        files = sorted(p for p in self.root.iterdir()
                       if p.is_file() and p.suffix.lower() in extensions)
        self.transform = transform
        self.samples: list[tuple[Path, int]] = [(p, -1) for p in files[:limit]]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return _load_path(*self.samples[index], self.transform)


def open_images(root: str | os.PathLike, transform: Callable[[Any], Any] | None = None, *,
                limit: int | None = None) -> Dataset:
    """The images of a folder, whatever its layout: ``labels.csv`` (:class:`ImageFolderCSV`),
    class sub-folders (:class:`ImageFolderTree`), or image files alone (:class:`ImageFiles`,
    in the folder or in its ``images/`` sub-folder). For label-free uses (calibration,
    tuning): labels are carried but need not exist. An empty folder is refused."""
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    inner = path / "images"
    subdirs = [p for p in path.iterdir() if p.is_dir() and p != inner]
    data: Dataset
    if (path / "labels.csv").is_file():
        data = ImageFolderCSV(path, transform, limit=limit)
    elif subdirs:
        data = ImageFolderTree(path, transform, limit=limit)
    else:
        data = ImageFiles(inner if inner.is_dir() else path, transform, limit=limit)
    if len(data) == 0:
        raise ValueError(f"no images in {path} (image files: labels.csv + images, class "
                         "sub-folders, or images in the folder)")
    return data


def _load_path(path: Path, label: int, transform: Callable[[Any], Any] | None) -> tuple[Any, int]:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
    if transform is not None:
        return transform(img), label
    from torchvision.transforms.functional import to_tensor

    return to_tensor(img), label


def dataset_labels(dataset: Dataset) -> list[int] | None:
    """The class index of every sample, when the dataset knows them without loading images
    (``samples`` of :class:`ImageFolderCSV` / :class:`ImageFolderTree` / torchvision); else
    ``None``."""
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and all(isinstance(s, tuple) and len(s) == 2 for s in samples):
        return [int(s[1]) for s in samples]
    return None


def check_labels(dataset: Dataset, num_classes: int, *, model_name: str = "the model") -> None:
    """Refuse data whose classes cannot be the model's before anything runs.

    An :class:`ImageFolderTree` must have exactly ``num_classes`` class folders (folder order
    is the class index, so any other count maps to other classes). Every known label must be
    in ``0 .. num_classes - 1``. Raises ``ValueError`` saying what was found.
    """
    if isinstance(dataset, ImageFolderTree) and len(dataset.classes) != num_classes:
        raise ValueError(
            f"{dataset.root} has {len(dataset.classes)} class folders ({dataset.classes[0]} .. "
            f"{dataset.classes[-1]}) but {model_name} has {num_classes} classes; an ImageFolder "
            f"maps its sorted folders to classes 0..{len(dataset.classes) - 1}, which is only "
            "right for a model trained on exactly those classes. For a subset of the model's "
            "classes, list the images in a labels.csv (filename,class_index) instead"
        )
    labels = dataset_labels(dataset)
    if not labels:
        return
    bad = [(i, lb) for i, lb in enumerate(labels) if not 0 <= lb < num_classes]
    if bad:
        i, lb = bad[0]
        raise ValueError(
            f"{len(bad)} label(s) do not fit {model_name}'s {num_classes} classes (allowed "
            f"class indices: 0..{num_classes - 1}), e.g. class_index {lb} of "
            f"{sample_name(dataset, i)}; labels range over {min(labels)}..{max(labels)}"
        )


def sample_name(dataset: Dataset, index: int) -> str:
    """A printable name of sample ``index`` (its file name where known)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, int(dataset.indices[index])
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and index < len(samples):
        return str(Path(samples[index][0]).name)
    filename = getattr(dataset, "filename", None)
    if callable(filename):
        try:
            return str(filename(index, basename=True))
        except Exception:  # a reader without file names
            pass
    return f"sample #{index}"


def load_item(dataset: Dataset, index: int) -> tuple[Any, int]:
    """``dataset[index]`` as ``(image, label)``; raises when the image cannot be read.

    A timm ``ImageDataset`` silently replaces an unreadable image by the next one, which
    would hide it (and count another image twice), so its reader is used directly here.
    """
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, int(dataset.indices[index])
    reader = getattr(dataset, "reader", None)
    if reader is not None and not getattr(dataset, "load_bytes", False) and \
            type(dataset).__name__ == "ImageDataset":
        from PIL import Image

        img, target, *_ = reader[index]
        with Image.open(img) as im:
            im = im.convert(getattr(dataset, "input_img_mode", None) or "RGB")
        transform = getattr(dataset, "transform", None)
        x = transform(im) if transform is not None else im
        return x, -1 if target is None else int(target)
    item = dataset[index]
    return item[0], int(item[1])


class _Tolerant(Dataset):
    """Items ``(index, image or None, label, error or None)`` of ``dataset[indices]``."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any, int, str | None]:
        index = self.indices[i]
        try:
            x, y = load_item(self.dataset, index)
        except Exception as e:  # any unreadable image is reported, not fatal
            return index, None, -1, f"{type(e).__name__}: {e}"
        return index, x, y, None


def _collate(items: list[tuple[int, Any, int, str | None]]) -> tuple[
        torch.Tensor, torch.Tensor | None, torch.Tensor, list[tuple[int, str]]]:
    ok = [it for it in items if it[3] is None]
    failures = [(it[0], it[3]) for it in items if it[3] is not None]
    index = torch.tensor([it[0] for it in ok], dtype=torch.long)
    images = torch.stack([it[1] for it in ok]) if ok else None
    labels = torch.tensor([it[2] for it in ok], dtype=torch.long)
    return index, images, labels, failures


Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[tuple[int, str]]]


def iter_images(dataset: Dataset, indices: list[int], *, batch_size: int = 50,
                num_workers: int = 0) -> Iterable[Batch]:
    """Batches ``(index, images, labels, failures)`` of ``dataset`` at ``indices``, in order.

    Images that cannot be read are left out of ``images`` and listed in ``failures`` as
    ``(index, error)``; ``images`` is ``None`` when a whole batch failed.
    """
    loader = DataLoader(_Tolerant(dataset, list(indices)), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=_collate)
    return loader


@dataclass
class DecodedImages:
    """Images decoded once, to be evaluated many times.

    ``index`` holds each image's position in the dataset; ``skipped`` the images that could
    not be read, as ``(index, name, error)``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    skipped: list[tuple[int, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def decode_images(dataset: Dataset, indices: list[int] | None = None, *, batch_size: int = 50,
                  num_workers: int = 0, progress: bool = False) -> DecodedImages:
    """Decode and transform ``dataset[indices]`` (default: all) into tensors, skipping and
    recording the images that cannot be read (missing, truncated, not an image)."""
    from .sweep import progress_bar

    indices = list(range(len(dataset))) if indices is None else list(indices)
    images, labels, index, skipped = [], [], [], []
    total = -(-len(indices) // batch_size) if indices else 0
    with progress_bar(total, progress, "decode") as bar:
        for idx, x, y, failures in iter_images(dataset, indices, batch_size=batch_size,
                                               num_workers=num_workers):
            if x is not None:
                images.append(x)
                labels.append(y)
                index.append(idx)
            skipped += [(i, sample_name(dataset, i), err) for i, err in failures]
            bar.update(1)
    if images:
        return DecodedImages(torch.cat(images), torch.cat(labels), torch.cat(index), skipped)
    return DecodedImages(torch.empty(0), torch.empty(0, dtype=torch.long),
                         torch.empty(0, dtype=torch.long), skipped)


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
    from .sweep import progress_bar

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
        with torch.inference_mode(), progress_bar(total, progress, "eval") as bar:
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
