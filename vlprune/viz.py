"""Pictures of token reduction: which patches were merged together and which were dropped.

A model patched with ``trace_source=True`` keeps a ``(B, N, N0)`` source map of the input
tokens each current token holds (see :class:`vlprune.core.state.TokenState`). This module
records that map after chosen blocks (:func:`layer_sources`), turns it into a patch grid of
group ids (:func:`group_map`), paints each group (:func:`paint_groups`) and draws the panels
into a PNG (:func:`render`). :func:`visualize` does all of it for one image (the ``vlprune viz`` command,
:mod:`vlprune.cli.viz`, runs it).

How the source map reads:

* merging (ToMe, recycling): every input patch is held by exactly one token; the patches of a
  token form its group;
* pruning with ``prune_fuse=False``: a dropped patch's column is all zeros (group ``-1``);
* pruning with ``prune_fuse=True``: the dropped patches are held by one fused token (a
  scattered group). Such a token is told apart by its attention size (it enters proportional
  attention as one fresh token, so its attention size is below its size); the pictures
  hatch it and the summary counts its patches as ``fused``.

numpy, Pillow and matplotlib come with the ``eval`` extra; they are imported when needed.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "COLOR_MODES",
    "PALETTE",
    "PANEL_PX",
    "TITLE_PX",
    "default_layers",
    "figure_size",
    "group_map",
    "layer_sources",
    "paint_groups",
    "render",
    "visualize",
]

# A fixed qualitative palette (matplotlib's tab20), cycled over the groups.
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896",
    "#9467bd", "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7",
    "#bcbd22", "#dbdb8d", "#17becf", "#9edae5",
)
COLOR_MODES = ("mean", "palette")
PANEL_PX = 300  # width and height of one panel's square image area in the PNG, in pixels
TITLE_PX = 40  # room above each panel for its two-line title
_DPI = 100
_MAX_COLS = 5
_INSTALL = "pip install 'vlprune[eval]'"
DEFAULT_MODEL = "vit_base_patch16_224"


def _require(module: str):
    """Import an optional dependency of the ``eval`` extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"vlprune.viz needs {module.split('.')[0]}: {_INSTALL}") from e


# ---- recording ------------------------------------------------------------------------------


@dataclass
class _Trace:
    """What one recorded forward gives for the chosen blocks."""

    origins: dict[int, Tensor]  # layer -> (B, N0) int64: the token holding each input, -1 dropped
    tokens: dict[int, int]  # layer -> N_l, the tokens after that block
    fused: dict[int, Tensor]  # layer -> (B, N_l) bool: tokens holding fused (dropped) tokens
    num_prefix: int
    num_layers: int

    @property
    def sources(self) -> dict[int, Tensor]:
        """layer -> the dense ``(B, N_l, N0)`` float32 source map, built on demand."""
        from .core.plan import dense_source

        return {layer: dense_source(o, self.tokens[layer]) for layer, o in self.origins.items()}


def _image_blocks(model: nn.Module) -> list[nn.Module]:
    """The patched blocks of the model's image tower, in layer order."""
    from .adapters.base import ATTR, PatchContext

    root = model.__dict__.get(ATTR)
    if root is None:
        raise ValueError(
            f"{type(model).__name__} is not patched by vlprune; patch it first, e.g. "
            "vlprune.patch(model, merge_r=8, trace_source=True)"
        )
    owned = {id(c) for c in root.contexts()}
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        layer = module.__dict__.get("_vlprune_layer")
        ctx = module.__dict__.get("_vlprune_ctx")
        if layer is None or not isinstance(ctx, PatchContext) or id(ctx) not in owned:
            continue
        if ctx.tower == "text":
            continue
        if layer in found:
            raise ValueError(f"{type(model).__name__} has two patched image blocks at layer {layer}")
        found[layer] = module
    if not found:
        raise ValueError(
            f"{type(model).__name__} ({root.family}) has no patched image-tower blocks to record"
        )
    return [found[i] for i in sorted(found)]


def _check_layers(layers: Sequence[int] | None, num_layers: int, what: str) -> list[int]:
    if layers is None:
        return default_layers(num_layers)
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layers must be ints, got {layer!r}")
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"layer {layer} is out of range: {what} has {num_layers} blocks, "
                f"allowed 0..{num_layers - 1}"
            )
        out.append(layer)
    if not out:
        raise ValueError(f"no layers chosen; allowed 0..{num_layers - 1}")
    return sorted(set(out))


def default_layers(num_layers: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced layers ending with the last one (``[2, 5, 8, 11]`` of 12)."""
    if num_layers < 1:
        raise ValueError("the model has no blocks")
    count = min(count, num_layers)
    return sorted({round((i + 1) * num_layers / count) - 1 for i in range(count)})


def _image_forward(model: nn.Module, x: Tensor) -> Any:
    """One forward of the image tower: ``encode_image`` (open_clip CLIP),
    ``get_image_features`` (Hugging Face two-tower models) or the model itself."""
    if callable(getattr(model, "encode_image", None)):
        return model.encode_image(x)
    if callable(getattr(model, "get_image_features", None)):
        return model.get_image_features(pixel_values=x)
    return model(x)


def _record(model: nn.Module, x: Tensor, layers: Sequence[int] | None,
            forward: Callable[[nn.Module, Tensor], Any] | None = None) -> _Trace:
    """Run one forward with hooks on the chosen image blocks; see :func:`layer_sources`."""
    from .adapters.base import ATTR
    from .core.plan import identity_origin

    root = model.__dict__.get(ATTR)
    blocks = _image_blocks(model)
    ctx = blocks[0].__dict__["_vlprune_ctx"]
    if not root.config.trace_source or not ctx.config.trace_source:
        raise ValueError(
            "source tracking is off: patch with trace_source=True or call "
            "vlprune.configure(model, trace_source=True)"
        )
    chosen = _check_layers(layers, len(blocks), type(model).__name__)
    origins: dict[int, Tensor] = {}  # (B, N0) int64 per layer: no dense map per layer
    counts: dict[int, int] = {}
    fused: dict[int, Tensor] = {}
    prefix: list[int] = []

    caller = threading.get_ident()

    def hook(layer: int):
        def record(module: nn.Module, args: Any, out: Any) -> None:
            if threading.get_ident() != caller:  # another thread's forward of the same model
                return
            state = ctx.state
            if state is None:
                raise RuntimeError("the forward ran with reduction disabled: nothing to record")
            if not prefix:
                prefix.append(state.num_protected)
            tokens = out[0] if isinstance(out, (tuple, list)) else out
            counts[layer] = tokens.shape[1]
            if state.origin is None:  # nothing merged or dropped yet: every token holds itself
                origins[layer] = identity_origin(tokens.shape[0], tokens.shape[1], device=tokens.device)
                fused[layer] = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
                return
            origins[layer] = state.origin  # replaced, never changed in place, by compactions
            if state.attn_size is not None and state.size is not None:
                # a fused token enters proportional attention as one fresh token
                fused[layer] = (state.attn_size < state.size - 0.5).squeeze(-1)
            else:
                fused[layer] = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

        return record

    handles = [blocks[i].register_forward_hook(hook(i)) for i in chosen]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            (forward or _image_forward)(model, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [i for i in chosen if i not in origins]
    if missing:
        raise RuntimeError(f"the forward did not run block(s) {missing} of the image tower")
    return _Trace(origins=origins, tokens=counts, fused=fused, num_prefix=prefix[0],
                  num_layers=len(blocks))


def layer_sources(model: nn.Module, x: Tensor, layers: Sequence[int] | None = None, *,
                  forward: Callable[[nn.Module, Tensor], Any] | None = None) -> dict[int, Tensor]:
    """Run one forward of ``model`` on images ``x`` and return, for each chosen block, the
    source map ``(B, N_l, N0)`` after that block (float, 1 where token ``i`` holds input
    token ``j``, prefix tokens included).

    ``model`` must be patched with ``trace_source=True``, e.g. ``vlprune.patch(model,
    merge_r=8, trace_source=True)``. The blocks are those of the image tower (timm
    ``blocks``, open_clip ``transformer.resblocks``, Hugging Face ``encoder.layers``);
    ``layers`` default to :func:`default_layers`. The forward runs in eval mode without
    gradients; ``forward(model, x)`` replaces the default call (``encode_image``,
    ``get_image_features`` or ``model(x)``). The hooks are removed afterwards.
    """
    return _record(model, x, layers, forward).sources


# ---- group maps -----------------------------------------------------------------------------


def group_map(source: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """``(H, W)`` int64 map of a source map's patches: for each input patch, the index (row
    of ``source``, prefix rows included) of the token that holds it, ``-1`` if dropped.

    ``source`` is ``(N_l, N0)`` or ``(1, N_l, N0)``; its first ``num_prefix`` columns (class,
    distillation, register tokens) are skipped and the others are the patches in row-major
    order of ``grid`` ``(H, W)``.
    """
    if source.dim() == 3:
        if source.shape[0] != 1:
            raise ValueError(f"group_map takes one image; got a batch of {source.shape[0]}: pass source[b]")
        source = source[0]
    if source.dim() != 2:
        raise ValueError(f"source must be (N_l, N0) or (1, N_l, N0), got {tuple(source.shape)}")
    h, w = grid
    patches = source.shape[1] - num_prefix
    if num_prefix < 0 or patches != h * w:
        raise ValueError(
            f"source has {source.shape[1]} input tokens; {num_prefix} prefix tokens and a "
            f"{h}x{w} grid need {num_prefix + h * w}"
        )
    cols = source[:, num_prefix:]
    held, owner = cols.max(dim=0)
    owner = torch.where(held > 0, owner, torch.full_like(owner, -1))
    return owner.reshape(h, w).long()


def _grid_of(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """The patch grid of an ``height x width`` input split into ``num_patches`` square patches."""
    p = math.sqrt(height * width / max(num_patches, 1))
    gh, gw = round(height / p), round(width / p)
    if gh * gw != num_patches:
        raise ValueError(
            f"cannot lay {num_patches} patches on a {height}x{width} input as a grid of square patches"
        )
    return gh, gw


# ---- painting -------------------------------------------------------------------------------


def _hex_rgb(color: str) -> tuple[float, float, float]:
    color = color.lstrip("#")
    return tuple(int(color[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


def _palette_colors(gmap: Any, num_colors: int) -> dict[int, int]:
    """Palette index per group: greedy, so that touching groups differ where possible."""
    np = _require("numpy")
    ids, counts = np.unique(gmap[gmap >= 0], return_counts=True)
    neighbours: dict[int, set[int]] = {int(g): set() for g in ids}
    for a, b in ((gmap[:, :-1], gmap[:, 1:]), (gmap[:-1, :], gmap[1:, :])):
        edge = (a != b) & (a >= 0) & (b >= 0)
        for u, v in zip(a[edge].tolist(), b[edge].tolist()):
            neighbours[u].add(v)
            neighbours[v].add(u)
    chosen: dict[int, int] = {}
    for rank, g in enumerate(int(g) for g in ids[np.argsort(-counts, kind="stable")]):
        taken = {chosen[n] for n in neighbours[g] if n in chosen}
        start = (rank * 7) % num_colors  # spread the colours instead of always using the first
        pick = next(((start + k) % num_colors for k in range(num_colors)
                     if (start + k) % num_colors not in taken), start)
        chosen[g] = pick
    return chosen


def paint_groups(image: Any, gmap: Any, *, colors: str = "mean", borders: bool = True,
                 fused: Any = None, alpha: float = 0.55) -> Any:
    """Paint the groups of ``gmap`` over ``image``; returns a float ``(H, W, 3)`` array.

    ``image`` is ``(H, W, 3)`` in [0, 1] (numpy or a tensor), ``gmap`` a ``(h, w)`` group map
    (:func:`group_map`) whose cells split the image evenly. A patch that holds only itself
    shows the image. ``colors="mean"`` paints each merged group (two patches or more) with its
    mean image colour (the ToMe paper's picture); ``"palette"`` blends a :data:`PALETTE`
    colour (touching groups get different ones where possible) into the image with weight
    ``alpha``. Dropped cells (``-1``) are dark with diagonal stripes; cells of
    ``fused`` (a ``(h, w)`` bool mask: patches held by a fused token) get light stripes.
    ``borders`` draws a dark line between cells of different groups.
    """
    np = _require("numpy")
    if colors not in COLOR_MODES:
        raise ValueError(f"unknown colors={colors!r}; allowed: {list(COLOR_MODES)}")
    img = np.asarray(image.detach().cpu() if isinstance(image, Tensor) else image, dtype=np.float64)
    g = np.asarray(gmap.cpu() if isinstance(gmap, Tensor) else gmap).astype(np.int64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {img.shape}")
    H, W = img.shape[:2]
    h, w = g.shape
    if H % h or W % w:
        raise ValueError(f"a {H}x{W} image does not split into a {h}x{w} grid of equal cells")
    cy, cx = H // h, W // w
    pix = np.repeat(np.repeat(g, cy, axis=0), cx, axis=1)  # group id of every pixel
    out = img.copy()  # a patch that holds only itself shows the image
    kept = pix >= 0
    if kept.any():
        cells = np.bincount(g[g >= 0])
        merged = kept & (cells[pix.clip(min=0)] > 1)
        flat = pix[merged]
        n = len(cells)
        if colors == "mean":
            count = np.bincount(flat, minlength=n)[:, None].clip(min=1)
            mean = np.stack([np.bincount(flat, img[..., c][merged], minlength=n) for c in range(3)], 1)
            out[merged] = (mean / count)[flat]
        else:
            table = np.array([_hex_rgb(c) for c in PALETTE])
            pick = _palette_colors(np.where(cells[g.clip(min=0)] > 1, g, -1), len(table))
            lut = np.zeros((n, 3))
            for gid, idx in pick.items():
                lut[gid] = table[idx]
            out[merged] = (1 - alpha) * img[merged] + alpha * lut[flat]
    yy, xx = np.mgrid[0:H, 0:W]
    stripe = ((yy + xx) // max(2, cy // 4)) % 4 == 0
    out[~kept] = np.where(stripe[~kept, None], 0.28, 0.07)
    if fused is not None:
        f = np.asarray(fused.cpu() if isinstance(fused, Tensor) else fused, dtype=bool)
        fpix = np.repeat(np.repeat(f, cy, axis=0), cx, axis=1) & kept & stripe
        out[fpix] = 0.5 * out[fpix] + 0.5
    if borders:
        edge = np.zeros((H, W), dtype=bool)
        dx = pix[:, 1:] != pix[:, :-1]
        dy = pix[1:, :] != pix[:-1, :]
        edge[:, 1:] |= dx
        edge[1:, :] |= dy
        out[edge] = 0.12
    return out.clip(0, 1)


# ---- rendering ------------------------------------------------------------------------------


def _layout(panels: int, max_cols: int) -> tuple[int, int]:
    cols = min(panels, max_cols)
    return cols, math.ceil(panels / cols)


def figure_size(num_maps: int, max_cols: int = _MAX_COLS) -> tuple[int, int]:
    """``(width, height)`` in pixels of the PNG :func:`render` writes for ``num_maps`` layers
    (the original image takes one more panel; at most ``max_cols`` panels a row)."""
    cols, rows = _layout(num_maps + 1, max_cols)
    return cols * PANEL_PX, rows * (PANEL_PX + TITLE_PX)


def render(image: Any, maps: Mapping[int, Tensor], path: str | os.PathLike, *,
           tokens: Mapping[int, int] | None = None, fused: Mapping[int, Tensor] | None = None,
           colors: str = "mean", borders: bool = True, title: str | None = None,
           max_cols: int = _MAX_COLS) -> Path:
    """Draw ``image`` and one panel per layer of ``maps`` into the PNG ``path``.

    ``image`` is ``(H, W, 3)`` in [0, 1] (numpy or a tensor; a ``(3, H, W)`` tensor is
    accepted too), ``maps`` maps layer index -> ``(h, w)`` group map (:func:`group_map`).
    Each panel is titled with its layer, the tokens kept (``tokens[layer]``, prefix included,
    when given), the number of groups and of dropped patches. ``fused`` gives per layer the
    ``(h, w)`` mask of patches held by a fused token (hatched). See :func:`paint_groups` for
    ``colors`` and ``borders``. The PNG is :func:`figure_size` pixels; returns its path.
    """
    np = _require("numpy")
    _require("matplotlib")
    from matplotlib.figure import Figure

    if not maps:
        raise ValueError("render needs at least one layer map")
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
            image = image.permute(1, 2, 0)
        image = image.numpy()
    img = np.asarray(image, dtype=np.float64)
    path = Path(path)
    cols, rows = _layout(len(maps) + 1, max_cols)
    width, height = figure_size(len(maps), max_cols)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    panel_h = PANEL_PX + TITLE_PX

    def axes(k: int):
        r, c = divmod(k, cols)
        pad = 6
        left = (c * PANEL_PX + pad) / width
        bottom = (height - r * panel_h - TITLE_PX - PANEL_PX + pad) / height
        ax = fig.add_axes((left, bottom, (PANEL_PX - 2 * pad) / width, (PANEL_PX - 2 * pad) / height))
        ax.set_xticks([])
        ax.set_yticks([])
        return ax

    ax = axes(0)
    ax.imshow(img.clip(0, 1), interpolation="antialiased")
    ax.set_title(title or f"input {img.shape[0]}x{img.shape[1]}", fontsize=9)
    for k, layer in enumerate(sorted(maps), start=1):
        gmap = maps[layer]
        g = gmap.cpu() if isinstance(gmap, Tensor) else torch.as_tensor(gmap)
        mask = None if fused is None else fused.get(layer)
        painted = paint_groups(img, g, colors=colors, borders=borders, fused=mask)
        ax = axes(k)
        ax.imshow(painted, interpolation="nearest")
        groups = int(torch.unique(g[g >= 0]).numel())
        dropped = int((g < 0).sum())
        head = f"layer {layer}"
        if tokens is not None and layer in tokens:
            head += f": {tokens[layer]} tokens"
        sub = f"{groups} groups, {dropped} dropped"
        if mask is not None and bool(torch.as_tensor(mask).any()):
            sub += f", {int(torch.as_tensor(mask).sum())} fused"
        ax.set_title(f"{head}\n{sub}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


# ---- one image, end to end ------------------------------------------------------------------


def _is_timm(model: nn.Module) -> bool:
    return any(c.__module__.startswith("timm.") for c in type(model).__mro__)


def _normalize_stats(transform: Any) -> tuple[Any, Any] | None:
    """The ``(mean, std)`` of the last normalisation step of a (torchvision) transform."""
    steps = getattr(transform, "transforms", [transform])
    for step in reversed(list(steps)):
        mean, std = getattr(step, "mean", None), getattr(step, "std", None)
        if mean is not None and std is not None:
            return mean, std
    return None


def _default_transform(model: nn.Module) -> Callable[[Any], Tensor]:
    """timm's eval transform for timm models; for other models resize the shorter side and
    center-crop to the tower's input size, normalised with the model's (open_clip
    ``preprocess_cfg``) or CLIP's mean and std."""
    if _is_timm(model):
        from .eval.image_data import eval_transform

        return eval_transform(model)
    from torchvision import transforms as T

    from .adapters.base import find_adapter

    ctx = model.__dict__.get("_vlprune")
    adapter = find_adapter(model, ctx.family if ctx is not None else None)
    _, h, w = adapter.default_input_size(model)
    cfg = getattr(getattr(model, "visual", model), "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
    std = tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
    return T.Compose([
        T.Resize(min(h, w), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop((h, w)),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def _load_image(image: Any) -> Any:
    """A path or a PIL image -> an RGB PIL image."""
    Image = _require("PIL.Image")
    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
        try:
            with Image.open(p) as img:
                return img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:  # not an image, truncated, damaged
            raise ValueError(f"cannot read {p} as an image ({type(e).__name__}: {e}); expected "
                             "an image file PIL can decode (JPEG, PNG, ...)") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise TypeError(
        f"image must be a path, a PIL image or a (3, H, W) tensor, got {type(image).__name__}"
    )


def _prepare(model: nn.Module, image: Any, transform: Callable[[Any], Any] | None) -> tuple[Tensor, Tensor]:
    """The model input ``(1, 3, H, W)`` and the picture shown ``(H, W, 3)`` in [0, 1]."""
    if isinstance(image, Tensor):
        x = image.unsqueeze(0) if image.dim() == 3 else image
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f"an image tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        # a model input of unknown normalisation: shown stretched to [0, 1]
        shown = x[0].float()
        lo, hi = shown.amin(dim=(1, 2), keepdim=True), shown.amax(dim=(1, 2), keepdim=True)
        shown = (shown - lo) / (hi - lo).clamp_min(1e-6)
        return x, shown.permute(1, 2, 0)
    pil = _load_image(image)
    transform = transform or _default_transform(model)
    x = transform(pil)
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError("transform must turn a PIL image into a (3, H, W) tensor")
    stats = _normalize_stats(transform)
    if stats is not None:
        mean = torch.as_tensor(stats[0], dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(stats[1], dtype=torch.float32).view(-1, 1, 1)
        shown = x.float() * std + mean
    else:
        shown = x.float()
    return x.unsqueeze(0), shown.clamp(0, 1).permute(1, 2, 0)


def visualize(model: nn.Module, image: Any, *, path: str | os.PathLike,
              layers: Sequence[int] | None = None,
              transform: Callable[[Any], Any] | None = None, colors: str = "mean",
              forward: Callable[[nn.Module, Tensor], Any] | None = None,
              **setting: Any) -> dict[str, Any]:
    """Show which patches ``model`` merges and drops on one image; writes the PNG ``path``.

    ``image`` is a file path, a PIL image or an already preprocessed ``(3, H, W)`` tensor.
    Images are preprocessed by ``transform``, by default timm's eval transform for timm
    models (resize, center crop, the model's mean and std) and a resize + center crop with
    CLIP statistics for other models; the picture shows the crop the model sees.

    ``setting`` holds :func:`vlprune.patch` keywords (``merge_r=8``, ``prune_keep=0.5``, ...):
    the unpatched model is patched with them and ``trace_source=True`` for one forward and
    unpatched afterwards. A model that is already patched is shown with its own setting
    (``trace_source`` is switched on for the forward and restored); passing a setting for an
    already patched model is refused. ``layers`` are the blocks shown (default:
    :func:`default_layers`).

    Returns ``{"path", "grid", "num_prefix", "layers", "tokens", "groups", "dropped",
    "fused"}``; the last four map each layer to the tokens kept (prefix included), the
    groups of patches (tokens holding at least one patch), the dropped patches and the
    patches held by a fused token.
    """
    from .api import configure, get_config, is_patched, patch, unpatch

    if colors not in COLOR_MODES:
        raise ValueError(f"unknown colors={colors!r}; allowed: {list(COLOR_MODES)}")
    was_patched = is_patched(model)
    if was_patched and setting:
        raise ValueError(
            f"{type(model).__name__} is already patched; call visualize without settings to show "
            f"its own patch, or vlprune.unpatch(model) first (got {sorted(setting)})"
        )
    if not was_patched and not setting:
        raise ValueError("give a reduction setting, e.g. merge_r=8 or prune_keep=0.5 (see vlprune.patch)")
    setting.pop("trace_source", None)
    x, shown = _prepare(model, image, transform)
    if was_patched:
        old_trace = get_config(model).trace_source
        configure(model, trace_source=True)
    else:
        patch(model, trace_source=True, **setting)
    try:
        from .adapters.base import device_dtype

        device, dtype = device_dtype(model)
        trace = _record(model, x.to(device=device, dtype=dtype), layers, forward)
    finally:
        if was_patched:
            configure(model, trace_source=old_trace)
        else:
            unpatch(model)
    n0 = next(iter(trace.origins.values())).shape[-1]
    grid = _grid_of(n0 - trace.num_prefix, x.shape[-2], x.shape[-1])
    maps, fused_maps = {}, {}
    summary: dict[str, Any] = {
        "path": str(path), "grid": grid, "num_prefix": trace.num_prefix,
        "layers": sorted(trace.origins), "tokens": {}, "groups": {}, "dropped": {}, "fused": {},
    }
    for layer in summary["layers"]:
        # the index map of the first image is the group map (no dense source map needed)
        gmap = trace.origins[layer][0, trace.num_prefix:].cpu().reshape(grid).long()
        maps[layer] = gmap
        fused_rows = trace.fused[layer][0].cpu()
        fmask = torch.where(gmap >= 0, fused_rows[gmap.clamp(min=0)], torch.zeros_like(gmap, dtype=torch.bool))
        fused_maps[layer] = fmask
        summary["tokens"][layer] = trace.tokens[layer]
        summary["groups"][layer] = int(torch.unique(gmap[gmap >= 0]).numel())
        summary["dropped"][layer] = int((gmap < 0).sum())
        summary["fused"][layer] = int(fmask.sum())
    label = Path(image).name if isinstance(image, (str, os.PathLike)) else "input"
    if len(label) > 36:
        label = label[:33] + "..."
    title = f"{label}\n{x.shape[-2]}x{x.shape[-1]}, {n0} tokens"
    render(shown, maps, path, tokens=summary["tokens"], fused=fused_maps, colors=colors, title=title)
    return summary
