"""Token merging and pruning inside the vision tower of a LLaVA-1.5
(``LlavaForConditionalGeneration`` with a CLIP or SigLIP tower).

LLaVA reads one hidden state of its vision tower (``config.vision_feature_layer``, e.g. ``-2``:
``hidden_states[-2]``, the output of encoder layer ``num_layers - 2``), drops the class token
(``vision_feature_select_strategy="default"``) or not (``"full"``) and projects the tokens for
the language model. This module runs the HF CLIP / SigLIP image adapter
(:func:`~vlprune.adapters.hf_clip.vision.patch_hf_vision_tower`) inside that tower, with the
schedule mapped onto the encoder layers *before* the first layer LLaVA reads:

* ``merge_r`` (an int, an ``(r, inflection)`` ramp or a per-layer list) and ``prune_layers``
  (default: EViT's placement) span those layers only. The layer LLaVA reads and the later ones
  (whose outputs LLaVA never uses) reduce nothing; they run on the merged tokens, with
  proportional attention when ``prop_attn``.
* ``hidden_states[vision_feature_layer]`` holds the reduced tokens, the class token first, so
  the ``"default"`` strategy still drops exactly the class token. A list-valued
  ``vision_feature_layer`` works: every layer it reads comes after the last reducing layer, so
  they all hold the same tokens and concatenate.
* A schedule whose merges would be capped (more than half of a layer's mergeable tokens) is
  refused, so each image yields exactly :func:`tower_tokens_per_image` projected tokens.
* A call that reads an earlier hidden state than the one the schedule was mapped for (a
  ``vision_feature_layer`` argument) is refused, and so is ``visual_score="pool"`` (the 2x2
  patch grid is gone once the tower reduces).

The root adapter (:mod:`vlprune.adapters.llava`) builds its context with
:func:`llava_context` (one child context ``"image"`` for the tower, so ``disabled``,
``configure`` and ``describe`` reach it), patches the tower with :func:`patch_llava_tower`
and validates with :func:`check_llava_tower`. ``unpatch`` restores the tower with the rest of
the model. The anyres families (LLaVA-NeXT, OneVision, NeXT-Video) refuse tower options
(:func:`refuse_anyres_tower`): their packing needs each crop's full patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...config import ReductionConfig, default_prune_layers, parse_prune_schedule, parse_schedule
from ...core.scores import NEEDS_CLASS_TOKEN
from ...core.select import keep_count
from ...merging import max_merge
from ..base import (
    PatchContext,
    UnsupportedModelError,
    class_path_in_mro,
    config_prunes,
    hf_image_input_size,
)
from ..hf_clip.vision import (
    VisionTowerMixin,
    check_hf_vision_tower,
    patch_hf_vision_tower,
    vision_tower,
)
from .parts import inner_model

_LLAVA = {
    "transformers.models.llava.modeling_llava.LlavaForConditionalGeneration",
    "transformers.models.llava.modeling_llava.LlavaModel",
}
_ANYRES = {
    "transformers.models.llava_next.modeling_llava_next.LlavaNextForConditionalGeneration",
    "transformers.models.llava_onevision.modeling_llava_onevision."
    "LlavaOnevisionForConditionalGeneration",
    "transformers.models.llava_next_video.modeling_llava_next_video."
    "LlavaNextVideoForConditionalGeneration",
    "transformers.models.llava_next.modeling_llava_next.LlavaNextModel",
    "transformers.models.llava_onevision.modeling_llava_onevision.LlavaOnevisionModel",
    "transformers.models.llava_next_video.modeling_llava_next_video.LlavaNextVideoModel",
}

# The options a LLaVA passes to its vision tower (ReductionConfig.for_tower("image")).
TOWER_OPTIONS = (
    "merge_r", "prune_keep", "prune_layers", "prune_score", "prune_fuse", "prune_recycle",
    "prune_seed", "prop_attn", "attn_backend", "trace_source",
)
# tower options that change no token count (how the tower's attention runs)
ATTENTION_OPTIONS = ("prop_attn", "attn_backend")


def tower_requested(config: ReductionConfig) -> bool:
    """True when ``config`` asks for reduction inside the vision tower (``merge_r`` other than
    0, or ``prune_keep`` set, even to 1.0)."""
    return config.merge_r != 0 or config.prune_keep is not None


def _set_options(config: ReductionConfig) -> list[str]:
    default = ReductionConfig()
    return [n for n in TOWER_OPTIONS
            if n not in ATTENTION_OPTIONS and getattr(config, n) != getattr(default, n)]


def refuse_anyres_tower(model: nn.Module, config: ReductionConfig) -> None:
    """For the anyres families (LLaVA-NeXT, OneVision, NeXT-Video): refuse every vision-tower
    option, which would change each crop's token count."""
    names = _set_options(config)
    if names:
        raise ValueError(
            f"{', '.join(names)} (merging or pruning inside the vision tower) not available on "
            f"{type(model).__name__}: like the other anyres families (LLaVA-NeXT, OneVision, "
            "NeXT-Video), their packing needs each crop's full patch grid; use visual_keep "
            "(reduction of the packed tokens before the language model)"
        )


@dataclass(frozen=True)
class _Geometry:
    """What the schedule of a LLaVA tower depends on, fixed at patch time."""

    num_layers: int  # encoder layers of the tower
    reduce_layers: int  # encoder layers before the first one LLaVA reads (they may reduce)
    num_tokens: int  # tokens entering the encoder per image (patches + class token)
    num_protected: int  # 1 with a class token (CLIP), else 0 (SigLIP)
    feature_layer: int | tuple[int, ...]  # config.vision_feature_layer, for messages
    strategy: str  # config.vision_feature_select_strategy


def _read_layers(feature_layer, num_layers: int) -> list[int]:
    """The encoder layer whose output each ``hidden_states`` index is (-1: the embeddings)."""
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -(num_layers + 1) <= i <= num_layers:
            raise ValueError(
                f"vision_feature_layer={feature_layer!r}: the tower has {num_layers} encoder layers, "
                f"so hidden_states indices run from {-(num_layers + 1)} to {num_layers}"
            )
        out.append((i % (num_layers + 1)) - 1)
    return out


def _tower(model: nn.Module) -> nn.Module:
    tower = getattr(inner_model(model), "vision_tower", None)
    if tower is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no vision_tower: expected a transformers>=5 "
            "LlavaForConditionalGeneration or LlavaModel"
        )
    return vision_tower(tower)


def _geometry(model: nn.Module) -> _Geometry:
    tower = _tower(model)
    mcfg = model.config
    num_layers = len(tower.encoder.layers)
    feature_layer = mcfg.vision_feature_layer
    read = _read_layers(feature_layer, num_layers)
    _, h, w = hf_image_input_size(tower.config)
    patch = tower.config.patch_size
    protected = int(getattr(tower.embeddings, "class_embedding", None) is not None)
    return _Geometry(
        num_layers=num_layers, reduce_layers=max(0, min(read)),
        num_tokens=(h // patch) * (w // patch) + protected, num_protected=protected,
        feature_layer=feature_layer if isinstance(feature_layer, int) else tuple(feature_layer),
        strategy=getattr(mcfg, "vision_feature_select_strategy", "default"),
    )


def _where(g: _Geometry) -> str:
    """Which layer LLaVA reads, in words."""
    read = _read_layers(g.feature_layer, g.num_layers)
    what = " and ".join("the embeddings" if j < 0 else f"encoder layer {j}" for j in read)
    layer = g.feature_layer if isinstance(g.feature_layer, int) else list(g.feature_layer)
    return f"vision_feature_layer={layer!r}: the output of {what}"


def _resolve(config: ReductionConfig, g: _Geometry) -> tuple[list[int], list[float | None], int]:
    """The tower's per-layer merge and prune schedules (``config``: the tower's own, see
    :meth:`ReductionConfig.for_tower`) and the tokens at the layer LLaVA reads, per image
    (before the select strategy). Raises ``ValueError`` for what the layers before the read
    layer cannot do."""
    n = g.reduce_layers
    if n <= 0:
        raise ValueError(
            f"LLaVA reads {_where(g)}; no encoder layer runs before that, so there is nothing "
            "to merge or prune in the vision tower; use visual_keep"
        )
    span = f"{n} encoder layers (0..{n - 1}) run" if n > 1 else "1 encoder layer (0) runs"
    if isinstance(config.merge_r, list) and len(config.merge_r) > n:
        raise ValueError(
            f"merge_r has {len(config.merge_r)} entries but only {span} before the layer LLaVA "
            f"reads ({_where(g)}); give at most {n}"
        )
    if config.prune_keep is not None:
        layers = config.prune_layers
        if layers is None:
            layers = default_prune_layers(n)
            if not layers:
                raise ValueError(
                    f"prune_keep without prune_layers prunes at EViT's default places, but only "
                    f"{span} before the layer LLaVA reads ({_where(g)}); give prune_layers"
                )
        late = [i for i in layers if i >= n]
        if late:
            raise ValueError(
                f"prune_layers {late} at or after the layer LLaVA reads ({_where(g)}): pruning there "
                f"would be wasted or change the tokens it reads; give layers in 0..{n - 1}"
            )
        if config.prune_score in NEEDS_CLASS_TOKEN and not g.num_protected and config_prunes(config):
            raise ValueError(
                f"prune_score={config.prune_score!r} ranks tokens by class-token attention, but "
                "this vision tower has no class token; use one of 'key_norm', 'attn_entropy', "
                "'diversity', 'random'"
            )
        prune = parse_prune_schedule(config.prune_keep, tuple(layers), n)
    else:
        prune = [None] * n
    merge = parse_schedule(config.merge_r, n)
    tokens, P = g.num_tokens, g.num_protected
    for i, (r, keep) in enumerate(zip(merge, prune)):
        if keep is not None and keep < 1.0:
            kept = keep_count(tokens, P, keep)
            if tokens - P - kept > 0:
                tokens = P + kept + (1 if config.prune_fuse else 0)
        if r > max_merge(tokens, P):
            raise ValueError(
                f"merge_r={config.merge_r!r} merges {r} tokens at encoder layer {i}, which gets "
                f"{tokens} tokens per image: at most {max_merge(tokens, P)} can merge there (half "
                f"of the {tokens - P} mergeable ones); lower merge_r so LLaVA gets the tokens "
                "the schedule says"
            )
        tokens -= r
    pad = g.num_layers - n
    return merge + [0] * pad, prune + [None] * pad, tokens


@dataclass
class _TowerContext(PatchContext):
    """Context of a LLaVA's vision tower: the schedule spans the layers before the first one
    LLaVA reads; later layers reduce nothing."""

    geometry: _Geometry | None = None

    def refresh(self) -> None:
        self.schedule, self.prune_schedule, _ = _resolve(self.config, self.geometry)


@dataclass
class _LlavaContext(PatchContext):
    """Root context of a patched LLaVA: its tower's context, when the tower is patched, is the
    child ``"image"``."""

    def refresh(self) -> None:
        if "image" not in self.children and tower_requested(self.config):
            raise ValueError(
                f"{', '.join(_set_options(self.config))} (reduction inside the vision tower) cannot "
                "be turned on by configure() on a LLaVA patched without it: the tower is patched "
                "at patch time; call vlprune.patch() again"
            )
        saved = {name: child.config for name, child in self.children.items()}
        try:
            super().refresh()
        except ValueError:  # configure() restores the root's config; restore the tower's too
            for name, child in self.children.items():
                child.config = saved[name]
            raise


def check_llava_tower(model: nn.Module, config: ReductionConfig) -> None:
    """Raise unless the vision tower of ``model`` can merge / prune as ``config`` says (nothing
    to check when it asks for no tower reduction): a LLaVA-1.5 with an upstream CLIP or SigLIP
    tower, a schedule that fits the layers before the one LLaVA reads, a class token for the
    ``"default"`` strategy. The anyres families refuse tower options."""
    paths = class_path_in_mro(model)
    llava = not _ANYRES.intersection(paths) and not _LLAVA.isdisjoint(paths)
    if config.attn_backend == "flex" and not (llava and tower_requested(config)):
        what = "these settings reduce" if llava else f"{type(model).__name__} reduces"
        raise ValueError(
            f"attn_backend='flex' runs the attention of a vision tower that merges or prunes; "
            f"{what} no tokens inside the vision tower, so no attention would use FlexAttention. "
            "It works on LlavaForConditionalGeneration / LlavaModel with merge_r or prune_keep "
            "(and on timm ViT, open_clip, HF CLIP / SigLIP and BERT-style encoders); leave "
            "attn_backend='auto' here"
        )
    if _ANYRES.intersection(paths):
        refuse_anyres_tower(model, config)
        return
    if not tower_requested(config):
        if config.trace_source:
            raise ValueError(
                "trace_source traces the merges inside a LLaVA's vision tower; give merge_r or "
                "prune_keep too"
            )
        return
    if _LLAVA.isdisjoint(paths):
        raise UnsupportedModelError(
            f"merging or pruning inside the vision tower supports LlavaForConditionalGeneration "
            f"and LlavaModel, got {type(model).__name__}"
        )
    image = config.for_tower("image", two_towers=False)
    if config.visual_keep is not None and config.visual_score == "pool" and not image.is_identity:
        raise ValueError(
            "visual_score='pool' averages 2x2 blocks of the patch grid, which merging or pruning "
            "inside the vision tower breaks up; use another visual_score"
        )
    check_hf_vision_tower(_tower(model), image)
    g = _geometry(model)
    if g.strategy == "default" and not g.num_protected:
        raise ValueError(
            "vision_feature_select_strategy='default' drops token 0, the class token of a CLIP "
            "tower; this tower has none, so after merging it would drop a merged patch token: "
            "use vision_feature_select_strategy='full'"
        )
    _resolve(image, g)


def llava_context(model: nn.Module, config: ReductionConfig, family: str, num_layers: int) -> PatchContext:
    """The root context of a patched LLaVA (``config`` checked by :func:`check_llava_tower`),
    holding the vision tower's context as its child ``"image"`` when ``config`` asks for tower
    reduction."""
    children = {}
    if tower_requested(config) and not _LLAVA.isdisjoint(class_path_in_mro(model)):
        g = _geometry(model)
        children["image"] = _TowerContext(
            config=config.for_tower("image", two_towers=False), family=family,
            num_layers=g.num_layers, tower="image", geometry=g,
        )
    return _LlavaContext(config=config, family=family, num_layers=num_layers, children=children)


def patch_llava_tower(model: nn.Module, ctx: PatchContext) -> None:
    """Patch the vision tower of ``model`` with the child context ``ctx.children["image"]``
    (nothing to do without one)."""
    tower_ctx = ctx.children.get("image")
    if tower_ctx is not None:
        patch_hf_vision_tower(_tower(model), tower_ctx, mixin=_LlavaTowerMixin)


def tower_tokens_per_image(model: nn.Module, config: ReductionConfig,
                           strategy: str | None = None) -> int | None:
    """Projected tokens each image yields after the patched vision tower (the feature layer's
    tokens, less the class token for the ``"default"`` strategy), or ``None`` when ``config``
    removes no token in the tower. ``strategy`` defaults to the model's
    ``vision_feature_select_strategy``."""
    if not tower_requested(config) or _LLAVA.isdisjoint(class_path_in_mro(model)):
        return None
    image = config.for_tower("image", two_towers=False)
    if image.is_identity:
        return None
    g = _geometry(model)
    _, _, tokens = _resolve(image, g)
    strategy = g.strategy if strategy is None else strategy
    return tokens - (1 if strategy == "default" else 0)


class _LlavaTowerMixin(VisionTowerMixin):
    """Patched vision tower of a LLaVA: refuses a call that reads a hidden state the schedule
    reduces after (LLaVA's ``get_image_features`` passes ``vision_feature_layer`` as
    ``output_hidden_states``), then runs as the CLIP / SigLIP tower adapter."""

    def forward(self, *args, **kwargs):
        ctx: _TowerContext = self._vlprune_ctx
        selected = kwargs.get("output_hidden_states")
        if ctx.reduces and not isinstance(selected, bool) and isinstance(selected, (int, list, tuple)):
            g = ctx.geometry
            L = g.num_layers
            indices = [selected] if isinstance(selected, int) else list(selected)
            # hidden_states[i] is the output of encoder layer i % (L + 1) - 1; indices out of
            # range select nothing (transformers drops them)
            early = [i for i in indices if -(L + 1) <= i <= L and i % (L + 1) - 1 < g.reduce_layers]
            if early:
                raise ValueError(
                    f"hidden_states{early} are read, but this LLaVA's vision tower merges or prunes "
                    f"up to encoder layer {g.reduce_layers - 1} (patched for {_where(g)}); "
                    "call with the configured vision_feature_layer, or patch again after changing "
                    "model.config.vision_feature_layer (or run inside `with vlprune.disabled(model):`)"
                )
        return super().forward(*args, **kwargs)
