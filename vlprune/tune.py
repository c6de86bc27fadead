"""Win accuracy back after token reduction with a short, label-free self-distillation.

The *student* is the patched model (it runs on fewer tokens); the *teacher* is the same model
with reduction switched off (:func:`vlprune.disabled`). A few hundred steps on unlabelled
images of the target domain teach the student to give the teacher's outputs again:

    import timm, vlprune
    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    vlprune.patch(model, merge_r=16)
    result = vlprune.tune(model, "my_images/", steps=300, params="norms-biases")
    result.save("vit_b_r16_tuned.safetensors")   # loads into the unpatched model class

What is trained (``params``):

* ``"norms-biases"`` (default): the parameters of normalisation layers and every bias. A few
  thousandths of the weights; cheap, hard to overfit.
* ``"lora"``: low-rank adapters (`peft <https://github.com/huggingface/peft>`_, the ``tune``
  extra) on the ``nn.Linear`` layers, merged back into their weights at the end
  (``merge_and_unload``), so the result has exactly the model's own parameter names.
* ``"all"``: every parameter.

The teacher (``teacher``):

* ``"frozen-copy"`` (default): the model as it was before tuning, run unreduced. Only the
  tensors that training changes are copied (none for ``lora``, whose teacher is the base model
  with its adapters switched off; the norms and biases for ``norms-biases``; every parameter
  for ``all``, one more copy of the weights) and swapped in for the teacher's forward
  (``torch.func.functional_call``).
* ``"shared"``: no copy at all: the teacher is the model's current weights, run unreduced
  (adapters on for ``lora``). Its outputs are computed under ``no_grad`` before each update,
  so every step distils from the weights as they were before that step; but the teacher
  drifts as the student trains (it is the same weights), which the frozen copy avoids.

The loss (``loss``): ``"kl"``, ``KL(teacher || student)`` of the softmax at temperature ``T``,
times ``T^2`` (the default for classifiers: a tensor output whose width is the model's
``num_classes``, or an output with ``.logits``); ``"cosine"``, ``1 - cos`` of the pooled
features (the default for embedding models: open_clip image towers, Hugging Face CLIP /
SigLIP vision models, ``image_embeds`` / ``pooler_output``); ``"mse"`` on the features.

The model runs in eval mode during tuning (no dropout or drop-path: the function tuned is the
one deployed) and gets its train/eval mode and ``requires_grad`` flags back at the end. Its
weights are updated in place (it stays patched); :class:`TuneResult` holds the plain
``state_dict`` and the losses.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .api import disabled, get_config, is_patched
from .eval.image_data import open_images

__all__ = [
    "LOSSES",
    "PARAMS",
    "SAVE_SUFFIXES",
    "TEACHERS",
    "TuneResult",
    "TuneStep",
    "default_lora_targets",
    "save_state_dict",
    "training_transform",
    "tune",
    "tuned_parameter_names",
]

#: what ``params`` may name
PARAMS = ("norms-biases", "lora", "all")
#: what ``teacher`` may name
TEACHERS = ("frozen-copy", "shared")
#: what ``loss`` may name
LOSSES = ("auto", "kl", "cosine", "mse")
#: the suffixes :func:`save_state_dict` writes
SAVE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
#: the learning rate per ``params`` when none is given
DEFAULT_LR = {"norms-biases": 1e-4, "lora": 1e-4, "all": 1e-5}

# CLIP's preprocessing (OpenAI), the default of Hugging Face CLIP image processors
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)


@dataclass
class TuneStep:
    """What ``callback`` receives after every step.

    ``teacher(images)`` gives the teacher's output (the tensor the loss compares) for a batch
    of model-ready images, under ``no_grad``."""

    step: int  # 1-based
    steps: int
    loss: float
    lr: float
    model: nn.Module
    teacher: Callable[[Tensor], Tensor]


@dataclass
class TuneResult:
    """The outcome of :func:`tune`.

    ``state_dict``: every tensor of the model (CPU copies) under the model's own names, which
    load into the unpatched model class with ``load_state_dict(strict=True)``. ``losses``: the
    loss of every step. ``tuned``: the names of the parameters trained (for ``lora`` the
    weights the adapters were merged into, those the merge changed). ``num_trained``: values trained (for
    ``lora`` the adapters' values). ``skipped``: images that could not be read."""

    state_dict: dict[str, Tensor]
    losses: list[float]
    params: str
    loss: str
    teacher: str
    tuned: list[str] = field(default_factory=list)
    num_trained: int = 0
    skipped: list[str] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :attr:`state_dict` (see :func:`save_state_dict`); returns the path."""
        return save_state_dict(self.state_dict, path)


def save_state_dict(state_dict: dict[str, Tensor], path: str | os.PathLike) -> Path:
    """Write a plain ``state_dict``: safetensors for ``.safetensors``, ``torch.save`` for
    ``.pt`` / ``.pth`` / ``.bin`` (read back with ``weights_only=True``). Creates the parent
    folders; returns the path."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise ValueError(f"cannot save to {p}: unknown suffix {p.suffix!r}; allowed: "
                         f"{', '.join(SAVE_SUFFIXES)}")
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    p.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as e:
            raise ImportError("saving .safetensors needs safetensors: pip install safetensors "
                              "(or save to .pt)") from e
        save_file(sd, str(p))
    else:
        torch.save(sd, p)
    return p


# -- what is trained --------------------------------------------------------------------------

def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or \
        "norm" in type(module).__name__.lower()


def tuned_parameter_names(model: nn.Module, params: str) -> list[str]:
    """The parameters ``params="norms-biases"`` or ``"all"`` trains: for ``norms-biases`` the
    parameters of normalisation modules (LayerNorm, RMSNorm, GroupNorm, BatchNorm, any class
    named ``*Norm*``) and every parameter whose name ends in ``bias`` (``in_proj_bias`` of
    ``nn.MultiheadAttention`` too)."""
    if params not in ("norms-biases", "all"):
        raise ValueError(f"tuned_parameter_names takes 'norms-biases' or 'all', got {params!r}")
    chosen = set()
    for mod_name, module in model.named_modules():
        norm = _is_norm(module)
        for p_name, _ in module.named_parameters(recurse=False):
            if params == "all" or norm or p_name.endswith("bias"):
                chosen.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return [name for name, _ in model.named_parameters() if name in chosen]  # shared: once


def default_lora_targets(model: nn.Module) -> list[str]:
    """The modules ``params="lora"`` adapts by default: every ``nn.Linear`` except those owned
    by an ``nn.MultiheadAttention`` (open_clip's attention): torch's attention reads
    ``out_proj.weight`` directly, so an adapter there would act in the patched attention only,
    not in the upstream one, and the merged weights would not give the tuned function."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not _in_mha(model, name)]


def _in_mha(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(name) and isinstance(model.get_submodule(parent), nn.MultiheadAttention)


def _resolve_targets(model: nn.Module, targets: Sequence[str] | None) -> list[str]:
    if targets is None:
        out = default_lora_targets(model)
        if not out:
            raise ValueError(f"{type(model).__name__} has no nn.Linear layer for LoRA")
        return out
    if isinstance(targets, str):
        targets = [targets]
    modules = dict(model.named_modules())
    out: list[str] = []
    for t in targets:
        found = [n for n in modules if n and (n == t or n.endswith("." + t))]
        if not found:
            raise ValueError(f"lora target {t!r} names no module of {type(model).__name__}")
        for n in found:
            if not isinstance(modules[n], nn.Linear):
                raise ValueError(f"lora target {n} is a {type(modules[n]).__name__}; LoRA here "
                                 "adapts nn.Linear layers only")
            if _in_mha(model, n):
                raise ValueError(
                    f"lora target {n} belongs to an nn.MultiheadAttention, whose upstream "
                    "forward reads the weight directly: the adapter would not act there. "
                    "Adapt the other linear layers (the MLPs)")
            if n not in out:
                out.append(n)
    return out


# -- images -----------------------------------------------------------------------------------

def _image_size(model: nn.Module) -> tuple[int, int] | None:
    size = getattr(model, "image_size", None)  # open_clip image tower
    if size is None:
        cfg = getattr(model, "config", None)
        cfg = getattr(cfg, "vision_config", cfg)
        size = getattr(cfg, "image_size", None)
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[-1]))


def _mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = getattr(model, "image_mean", None), getattr(model, "image_std", None)
    if mean is not None and std is not None:  # open_clip image tower
        return tuple(mean), tuple(std)
    cfg = getattr(model, "config", None)
    if "siglip" in str(getattr(cfg, "model_type", "")).lower():
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return _CLIP_MEAN, _CLIP_STD


def _is_timm(model: nn.Module) -> bool:
    return any(c.__module__.startswith("timm.") for c in type(model).__mro__)


def training_transform(model: nn.Module, *, augment: bool = True) -> Callable[[Any], Tensor]:
    """The model's training-style preprocessing (PIL image -> normalized tensor).

    timm models: ``timm.data.create_transform(**resolve_data_config(model),
    is_training=True)`` (random resized crop, flip, colour jitter, the model's mean/std). Other
    models: a random resized crop to the model's image size and a horizontal flip, then the
    model's mean/std (open_clip's ``image_mean`` / ``image_std``; CLIP's for Hugging Face CLIP,
    0.5 for SigLIP). ``augment=False``: the evaluation preprocessing instead.
    """
    if _is_timm(model):
        from timm.data import create_transform, resolve_data_config

        return create_transform(**resolve_data_config({}, model=model), is_training=augment)
    from torchvision import transforms as T

    size = _image_size(model)
    if size is None:
        raise ValueError(f"cannot tell the input size of {type(model).__name__}: pass a "
                         "tensor of model-ready images, or a dataset that yields them")
    mean, std = _mean_std(model)
    bicubic = T.InterpolationMode.BICUBIC
    if augment:
        steps = [T.RandomResizedCrop(size, scale=_CROP_SCALE, ratio=_CROP_RATIO,
                                     interpolation=bicubic), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(min(size), interpolation=bicubic), T.CenterCrop(size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def _crop_flip(x: Tensor) -> Tensor:
    """A random resized crop (at the input's size) and a horizontal flip of one ``(C, H, W)``
    tensor, from torch's global generator."""
    _, h, w = x.shape
    area = h * w
    log_ratio = (math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
    ch, cw = h, w
    for _ in range(10):  # torchvision's RandomResizedCrop.get_params
        target = area * float(torch.empty(1).uniform_(*_CROP_SCALE))
        ratio = math.exp(float(torch.empty(1).uniform_(*log_ratio)))
        cw_, ch_ = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw_ <= w and 0 < ch_ <= h:
            ch, cw = ch_, cw_
            break
    top = int(torch.randint(0, h - ch + 1, (1,)))
    left = int(torch.randint(0, w - cw + 1, (1,)))
    crop = x[None, :, top:top + ch, left:left + cw].float()
    out = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0].to(x.dtype)
    if float(torch.rand(1)) < 0.5:
        out = out.flip(-1)
    return out


class _Images(torch.utils.data.Dataset):
    """Items of a dataset as model-ready tensors (labels dropped), or ``(None, error)`` for
    an image that cannot be read."""

    def __init__(self, data: torch.utils.data.Dataset, pil_transform: Callable | None,
                 tensor_augment: Callable | None) -> None:
        self.data = data
        self.pil_transform = pil_transform
        self.tensor_augment = tensor_augment

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor | None, str | None]:
        try:
            item = self.data[index]
        except (OSError, ValueError, SyntaxError) as e:  # unreadable image files
            from .eval.image_data import sample_name

            return None, f"{sample_name(self.data, index)} ({type(e).__name__}: {e})"
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor):
            if self.pil_transform is None:
                raise TypeError(f"dataset item {index} is a {type(x).__name__}; expected a "
                                "tensor or a PIL image")
            x = self.pil_transform(x)
        elif self.tensor_augment is not None:
            x = self.tensor_augment(x)
        return x, None


def _collate(items: list[tuple[Tensor | None, str | None]]) -> tuple[Tensor | None, list[str]]:
    ok = [x for x, _ in items if x is not None]
    return (torch.stack(ok) if ok else None), [e for _, e in items if e is not None]


def _batches(images: Any, model: nn.Module, batch_size: int, augment: Any, num_workers: int,
             seed: int, skipped: list[str]) -> Iterator[Tensor]:
    """Endless batches of model-ready images, reshuffled every pass."""
    if isinstance(images, Tensor):
        aug = _crop_flip if augment is True else (augment or None)
        gen = torch.Generator().manual_seed(seed)
        n = len(images)
        while True:
            order = torch.randperm(n, generator=gen) if n > batch_size else torch.arange(n)
            for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                x = images[order[i:i + batch_size]]
                yield torch.stack([aug(v) for v in x]) if aug is not None else x
    if callable(augment):
        pil, tensor_aug = augment, augment
    else:
        pil = training_transform(model, augment=bool(augment)) if _can_transform(model) else None
        tensor_aug = None  # a dataset's tensors come through its own transform
    if isinstance(images, Path):
        images = open_images(images, pil)
    data = _Images(images, pil, tensor_aug)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, num_workers=num_workers,
        drop_last=len(data) >= batch_size, collate_fn=_collate,
        generator=torch.Generator().manual_seed(seed),
    )
    readable = False
    while True:
        for x, errors in loader:
            skipped += [e for e in errors if e not in skipped]  # once, not once per pass
            if x is not None:
                readable = True
                yield x
        if not readable:
            raise ValueError(f"none of the {len(data)} images could be read, e.g. "
                             f"{skipped[0] if skipped else '?'}")


def _can_transform(model: nn.Module) -> bool:
    return _is_timm(model) or _image_size(model) is not None


def _check_images(images: Any) -> Any:
    if isinstance(images, Tensor):
        if images.dim() != 4 or not images.is_floating_point() or len(images) == 0:
            raise ValueError(f"images as a tensor must be a non-empty float (N, C, H, W) batch "
                             f"of model-ready images, got {images.dtype} {tuple(images.shape)}")
        return images
    if isinstance(images, (str, os.PathLike)):
        open_images(images)  # a missing or empty folder fails here, before any work
        return Path(images)
    if isinstance(images, torch.utils.data.Dataset):
        if len(images) == 0:  # type: ignore[arg-type]
            raise ValueError("the dataset of images is empty")
        return images
    raise TypeError(f"images must be a tensor (N, 3, H, W), a Dataset or a folder path, got "
                    f"{type(images).__name__}")


# -- outputs and losses -----------------------------------------------------------------------

def _default_forward(model: nn.Module, x: Tensor) -> Any:
    if hasattr(model, "encode_image"):  # open_clip CLIP
        return model.encode_image(x)
    if hasattr(model, "get_image_features"):  # Hugging Face CLIPModel / SiglipModel
        return model.get_image_features(pixel_values=x)
    return model(x)


def _output(out: Any) -> tuple[Tensor, str]:
    """The tensor the loss compares, and its kind: ``logits``, ``embedding`` or ``tensor``."""
    if isinstance(out, Tensor):
        return out, "tensor"
    for name, kind in (("logits", "logits"), ("image_embeds", "embedding"),
                       ("pooler_output", "embedding")):
        value = getattr(out, name, None)
        if isinstance(value, Tensor):
            return value, kind
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0], "tensor"
    raise TypeError(f"the model returned {type(out).__name__}; pass forward= returning the "
                    "logits or the pooled features as a tensor")


def _auto_loss(model: nn.Module, y: Tensor, kind: str) -> str:
    if kind == "logits":
        return "kl"
    classes = getattr(model, "num_classes", None)
    if kind == "tensor" and isinstance(classes, int) and classes > 0 and y.shape[-1] == classes:
        return "kl"
    return "cosine"


def _distill_loss(student: Tensor, teacher: Tensor, loss: str, temperature: float) -> Tensor:
    s, t = student.float(), teacher.float()
    if loss == "kl":
        T = temperature
        return F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1),
                        log_target=True, reduction="batchmean") * T * T
    if loss == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    return F.mse_loss(s, t)


# -- the tuning loop --------------------------------------------------------------------------

class _Call(nn.Module):
    """``forward(model, x)`` as a module, so that ``functional_call`` can swap tensors."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, Tensor], Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = forward

    def forward(self, x: Tensor) -> Any:
        return self.fn(self.model, x)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch's CPU generator and Python's ``random`` seeded inside, restored after."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def _positive(name: str, value: Any, kind: type = float) -> None:
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not value > 0 or \
            (kind is float and not math.isfinite(value)):
        what = "an int >= 1" if kind is int else "a finite number > 0"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def tune(
    model: nn.Module,
    images: Tensor | torch.utils.data.Dataset | str | os.PathLike,
    *,
    steps: int = 300,
    params: str = "norms-biases",
    lr: float | None = None,
    batch_size: int = 32,
    temperature: float = 1.0,
    loss: str = "auto",
    teacher: str = "frozen-copy",
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    warmup: int | None = None,
    max_grad_norm: float | None = 1.0,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] | None = None,
    augment: bool | Callable[[Any], Tensor] = True,
    forward: Callable[[nn.Module, Tensor], Any] | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    seed: int = 0,
    callback: Callable[[TuneStep], None] | None = None,
) -> TuneResult:
    """Self-distil a patched model towards its own unreduced outputs; no labels.

    Args:
        model: a model patched by :func:`vlprune.patch` (the student); updated in place.
        images: model-ready images as a float tensor ``(N, C, H, W)``; a Dataset (items are
            images or ``(image, label)`` pairs; PIL images go through the model's training
            transform); or a folder (see :func:`open_image_folder`). Labels are never used.
        steps: optimizer steps (batches).
        params: ``"norms-biases"``, ``"lora"`` (needs peft) or ``"all"`` (see the module doc).
        lr: AdamW's learning rate (default: 1e-4 for norms-biases and lora, 1e-5 for all).
        batch_size: images per step.
        temperature: the softmax temperature of the ``kl`` loss (scaled back by ``T^2``).
        loss: ``"auto"``, ``"kl"``, ``"cosine"`` or ``"mse"`` (see the module doc).
        teacher: ``"frozen-copy"`` or ``"shared"`` (see the module doc).
        weight_decay: AdamW's decoupled weight decay.
        schedule: ``"cosine"`` (decay to 0 after the warm-up) or ``"constant"``.
        warmup: linear warm-up steps (default: 5 % of ``steps``).
        max_grad_norm: gradient-norm clipping; ``None`` for none.
        lora_rank, lora_alpha, lora_targets: the adapters' rank, scale (default ``2 *
            rank``) and modules (names or name suffixes of ``nn.Linear`` modules; default
            :func:`default_lora_targets`).
        augment: ``True``: a random resized crop and flip of every image of a tensor
            ``images``, the model's training transform (:func:`training_transform`) for the
            images of a folder and the PIL images of a dataset; ``False``: none (those PIL
            images get the evaluation preprocessing); or a callable applied to every image
            (a ``(C, H, W)`` tensor or a PIL image) instead. A dataset that yields tensors has
            preprocessed them itself: they are used as they come. Teacher and student see the
            same augmented batch.
        forward: ``forward(model, images)`` returning the output to distil (default:
            ``model.encode_image`` for open_clip CLIP, ``get_image_features`` for Hugging
            Face CLIP / SigLIP models, else ``model(images)``; ``.logits``, ``.image_embeds``
            or ``.pooler_output`` of the result are read).
        device: where to train (the model is moved there; default: where it is).
        num_workers: DataLoader workers for datasets and folders.
        seed: shuffling and augmentation; the same seed gives the same run.
        callback: called with a :class:`TuneStep` after every step.

    Returns a :class:`TuneResult` (``state_dict`` loads into the unpatched model class).
    Raises ``ValueError`` for bad settings or data, and for a model that is not patched or
    whose patch reduces nothing; ``ImportError`` for ``lora`` without peft.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vlprune.tune() takes the model (a torch.nn.Module) first, got "
                        f"{type(model).__name__}")
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched by vlprune: call "
                         "vlprune.patch(model, ...) first (the student is the patched model, "
                         "the teacher the same model under vlprune.disabled)")
    if get_config(model).is_identity:
        raise ValueError("the model's patch reduces no tokens (e.g. merge_r=0): student and "
                         "teacher would be the same model; patch it with the reduction to tune")
    if params not in PARAMS:
        raise ValueError(f"unknown params {params!r}; allowed: {', '.join(PARAMS)}")
    if teacher not in TEACHERS:
        raise ValueError(f"unknown teacher {teacher!r}; allowed: {', '.join(TEACHERS)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; allowed: cosine, constant")
    _positive("steps", steps, int)
    _positive("batch_size", batch_size, int)
    _positive("temperature", temperature)
    if lr is not None:
        _positive("lr", lr)
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if warmup is not None and (not isinstance(warmup, int) or isinstance(warmup, bool)
                               or not 0 <= warmup < steps):
        raise ValueError(f"warmup must be an int in [0, steps), got {warmup!r}")
    if max_grad_norm is not None:
        _positive("max_grad_norm", max_grad_norm)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if loss in ("cosine", "mse") and temperature != 1.0:
        raise ValueError(f"temperature applies to the kl loss only, not to loss={loss!r}")
    if params == "lora":
        _positive("lora_rank", lora_rank, int)
        if lora_alpha is not None:
            _positive("lora_alpha", lora_alpha)
    elif lora_targets is not None or lora_alpha is not None or lora_rank != 8:
        raise ValueError(f"lora_rank / lora_alpha / lora_targets apply to params='lora' only, "
                         f"not to params={params!r}")
    images = _check_images(images)
    forward = forward or _default_forward
    if device is not None:
        model.to(device)
    p0 = next(model.parameters(), None)
    if p0 is None:
        raise ValueError(f"{type(model).__name__} has no parameters to tune")
    dev = p0.device
    lr = DEFAULT_LR[params] if lr is None else float(lr)
    warmup = round(0.05 * steps) if warmup is None else warmup

    was_training = model.training
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    peft_model = None
    merged = False
    skipped: list[str] = []
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if params == "lora":
            peft_model = _add_lora(model, lora_rank, lora_alpha, lora_targets)
            trained = [p for n, p in model.named_parameters() if "lora_" in n]
            for p in trained:
                p.requires_grad_(True)
            names: list[str] = []
            frozen: dict[str, Tensor] = {}
        else:
            names = tuned_parameter_names(model, params)
            own = dict(model.named_parameters())
            trained = [own[n] for n in names]
            for p in trained:
                p.requires_grad_(True)
            # the teacher's copy of what training changes (the frozen teacher only)
            frozen = {f"model.{n}": own[n].detach().clone() for n in names} \
                if teacher == "frozen-copy" else {}
        if not trained:
            raise ValueError(f"params={params!r} selects no parameter of {type(model).__name__}")
        call = _Call(model, forward)

        def teacher_out(x: Tensor) -> Tensor:
            with torch.no_grad(), disabled(model), contextlib.ExitStack() as stack:
                if peft_model is not None and teacher == "frozen-copy":
                    stack.enter_context(peft_model.disable_adapter())
                if frozen:
                    out = torch.func.functional_call(call, frozen, (x,))
                else:
                    out = call(x)
                return _output(out)[0]

        opt = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)
        losses: list[float] = []
        chosen = loss
        with _seeded(seed):
            batches = _batches(images, model, batch_size, augment, num_workers, seed, skipped)
            for step in range(steps):
                x = next(batches).to(dev)
                factor = _lr_factor(step, steps, warmup, schedule)
                for group in opt.param_groups:
                    group["lr"] = lr * factor
                target = teacher_out(x)  # before the update: the shared teacher is this step's
                y, kind = _output(call(x))
                if chosen == "auto":
                    chosen = _auto_loss(model, y, kind)
                    if chosen != "kl" and temperature != 1.0:
                        raise ValueError("temperature applies to the kl loss only; this model's "
                                         f"output takes loss={chosen!r}")
                if y.dim() != 2 or y.shape != target.shape:
                    raise ValueError(
                        f"the output to distil must be (batch, classes) or (batch, features); "
                        f"got student {tuple(y.shape)}, teacher {tuple(target.shape)}: pass "
                        "forward= returning pooled outputs")
                value = _distill_loss(y, target, chosen, temperature)
                if not torch.isfinite(value):
                    raise FloatingPointError(f"the loss is {value.item()} at step {step + 1}; "
                                             "lower lr")
                opt.zero_grad(set_to_none=True)
                value.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
                opt.step()
                losses.append(float(value.detach()))
                if callback is not None:
                    callback(TuneStep(step + 1, steps, losses[-1], lr * factor, model,
                                      teacher_out))
        num_trained = sum(p.numel() for p in trained)
        del opt, trained
        if peft_model is not None:
            names = _moved_lora_weights(model)
            peft_model.merge_and_unload()
            merged = True
        if skipped:
            warnings.warn(f"{len(skipped)} image(s) could not be read and were skipped, e.g. "
                          f"{skipped[0]}", stacklevel=2)
        return TuneResult(
            state_dict={k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
            losses=losses, params=params, loss=chosen, teacher=teacher, tuned=names,
            num_trained=num_trained, skipped=skipped,
        )
    finally:
        if peft_model is not None and not merged:
            peft_model.unload()  # the adapters out again, the weights as they were
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(name, p.requires_grad))
        model.train(was_training)


def _add_lora(model: nn.Module, rank: int, alpha: float | None,
              targets: Sequence[str] | None) -> Any:
    try:
        import peft
    except ImportError as e:
        raise ImportError("params='lora' needs peft: pip install 'vlprune[tune]'") from e
    names = _resolve_targets(model, targets)
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha,
                          target_modules=names, lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on models without a transformers config
        return peft.get_peft_model(model, cfg)


def _moved_lora_weights(model: nn.Module) -> list[str]:
    """The weights that merging the adapters changes (those whose ``lora_B`` is non-zero;
    peft starts it at zero), under the names they have again after merging."""
    out = []
    for name, module in model.named_modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, nn.ModuleDict) and hasattr(module, "base_layer") and any(
                bool(m.weight.detach().ne(0).any()) for m in lora_b.values()):
            out.append(f"{name}.weight")
    return out
