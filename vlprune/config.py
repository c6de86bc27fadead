"""User-facing configuration: what to reduce, validated at construction with clear errors.

A :class:`ReductionConfig` says *what* a patched model does; adapters say *where*. Schedules
are resolved per layer with :func:`parse_schedule`, which follows ToMe's semantics for
``merge_r``: an ``int`` (the same r at every layer), an ``(r, inflection)`` pair (a linear
ramp whose mean is r; positive inflection merges more in late layers) or an explicit per-layer
list (shorter lists are padded with zeros).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .core.attention import BACKENDS as ATTN_BACKENDS
from .core.scores import SCORE_NAMES as PRUNE_SCORES
from .core.select import count_or_ratio
from .version import __version__

MergeSchedule = Union[int, tuple, list]  # noqa: UP007 (runtime alias on 3.10)

_SCHEDULE_HELP = (
    "an int >= 0 (same r at every layer), an (r, inflection) tuple with r >= 0 and "
    "inflection in [-1, 1], or a list of ints >= 0 with one entry per layer"
)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def validate_merge_r(merge_r: Any) -> MergeSchedule:
    """Check the form of a ``merge_r`` value (not its length: that needs the model)."""
    if _is_int(merge_r):
        if merge_r < 0:
            raise ValueError(f"merge_r must be >= 0, got {merge_r}; allowed: {_SCHEDULE_HELP}")
        return int(merge_r)
    if isinstance(merge_r, tuple):
        if len(merge_r) != 2 or not _is_int(merge_r[0]) or not isinstance(
            merge_r[1], numbers.Real
        ) or isinstance(merge_r[1], bool):
            raise ValueError(f"merge_r tuple must be (r, inflection), got {merge_r!r}; allowed: {_SCHEDULE_HELP}")
        r, inflect = int(merge_r[0]), float(merge_r[1])
        if r < 0 or not -1.0 <= inflect <= 1.0:
            raise ValueError(f"merge_r={merge_r!r} is out of range; allowed: {_SCHEDULE_HELP}")
        return (r, inflect)
    if isinstance(merge_r, list):
        if not all(_is_int(v) and v >= 0 for v in merge_r):
            raise ValueError(f"merge_r list must hold ints >= 0, got {merge_r!r}; allowed: {_SCHEDULE_HELP}")
        return [int(v) for v in merge_r]
    raise ValueError(f"merge_r has type {type(merge_r).__name__}; allowed: {_SCHEDULE_HELP}")


def parse_schedule(merge_r: MergeSchedule, num_layers: int) -> list[int]:
    """Resolve a ``merge_r`` value to one requested r per layer (before any capping).

    ``(r, inflection)`` gives a linear ramp from ``r * (1 - inflection)`` at the first layer to
    ``r * (1 + inflection)`` at the last (the mean stays r): positive inflection merges more in
    late layers, negative more in early ones. This is ToMe's rule.
    """
    merge_r = validate_merge_r(merge_r)
    if num_layers <= 0:
        raise ValueError(f"num_layers must be > 0, got {num_layers}")
    if isinstance(merge_r, list):
        if len(merge_r) > num_layers:
            raise ValueError(
                f"merge_r has {len(merge_r)} entries but the model has {num_layers} layers; "
                f"give at most {num_layers} (missing trailing layers count as 0)"
            )
        return merge_r + [0] * (num_layers - len(merge_r))
    inflect = 0.0
    if isinstance(merge_r, tuple):
        merge_r, inflect = merge_r
    lo = int(merge_r * (1.0 - inflect))
    hi = 2 * merge_r - lo
    if num_layers == 1:
        return [merge_r]
    step = (hi - lo) / (num_layers - 1)
    return [int(lo + step * i) for i in range(num_layers)]




def default_prune_layers(num_layers: int) -> tuple[int, ...]:
    """EViT's placement scaled to the depth: a quarter, half and three quarters in
    (layers 3, 6, 9 of 12)."""
    return tuple(sorted({max(1, (num_layers * i) // 4) for i in (1, 2, 3)} - {num_layers}))


def _validate_keep(keep: Any) -> float:
    if not isinstance(keep, numbers.Real) or isinstance(keep, bool) or not 0.0 < keep <= 1.0:
        raise ValueError(f"prune_keep values must be floats in (0, 1], got {keep!r}")
    return float(keep)


def parse_prune_schedule(
    prune_keep: float | list[float] | None, prune_layers: tuple[int, ...] | None, num_layers: int
) -> list[float | None]:
    """One keep rate per layer (``None``: no pruning there) from ``prune_keep`` and
    ``prune_layers`` (default :func:`default_prune_layers`)."""
    if prune_keep is None:
        return [None] * num_layers
    layers = default_prune_layers(num_layers) if prune_layers is None else prune_layers
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"prune_layers {list(bad)} out of range: the model has layers 0..{num_layers - 1}"
        )
    keeps = prune_keep if isinstance(prune_keep, list) else [prune_keep] * len(layers)
    if len(keeps) != len(layers):
        raise ValueError(
            f"prune_keep has {len(keeps)} values for {len(layers)} prune_layers {list(layers)}; "
            "give one float for all or one per layer"
        )
    out: list[float | None] = [None] * num_layers
    for i, k in zip(layers, keeps):
        out[i] = k
    return out


def _validate_keep_layers(keep: Any, layers: Any, keep_name: str, layers_name: str):
    """Validate a keep-rate option and its layers; returns them normalised (layers sorted,
    each rate kept with its layer)."""
    if isinstance(keep, (list, tuple)):
        if not keep:
            raise ValueError(f"{keep_name} list is empty; give a float in (0, 1] or one per layer")
        keep = [_validate_keep(k) for k in keep]
    elif keep is not None:
        keep = _validate_keep(keep)
    if layers is not None:
        if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
            layers = (layers,)
        if not isinstance(layers, (list, tuple)) or not all(_is_int(i) for i in layers):
            raise ValueError(f"{layers_name} must be a tuple of layer indices, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"{layers_name} has repeated layers: {list(layers)}")
        if keep is None:
            raise ValueError(f"{layers_name} is set but {keep_name} is not; give {keep_name} in (0, 1]")
        if isinstance(keep, list):
            if len(keep) != len(layers):
                raise ValueError(
                    f"{keep_name} has {len(keep)} values for {len(layers)} {layers_name} "
                    f"{list(layers)}; give one float for all or one per layer"
                )
            pairs = sorted(zip(layers, keep))  # keep each rate with its layer
            layers, keep = [i for i, _ in pairs], [k for _, k in pairs]
        layers = tuple(sorted(int(i) for i in layers))
    return keep, layers


GUIDES = (None, "text", "image")
TEXT_OUTPUTS = ("full", "compact")

# Visual-token scores of "before the LLM" reduction in vision-language models (LLaVA), and
# the ones that are planned but not available yet.
VISUAL_SCORES = ("cls_attn", "attn", "dominant_contextual", "text", "diversity", "random",
                 "pool", "visionzip", "prumerge", "prumerge_plus")
# visual scores that pick each image's token count themselves (visual_keep stays unset)
ADAPTIVE_VISUAL_SCORES = ("prumerge", "prumerge_plus")
# visual scores with a contextual-token count (visual_contextual)
CONTEXTUAL_VISUAL_SCORES = ("dominant_contextual", "visionzip")
DEFAULT_TEXT_PROTECT_LAST = 8


@dataclass
class ReductionConfig:
    """What a patched model does. Validated on construction and on every change.

    Args:
        merge_r: ToMe bipartite merging: tokens removed per layer. ``int``, ``(r, inflection)``
            or a per-layer list (see :func:`parse_schedule`). 0 switches merging off.
        prop_attn: proportional attention: add ``log(size)`` of each key token to the attention
            logits so a merged token counts as many as it absorbed (ToMe, Eq. 1).
        attn_backend: the kernel of the attention a patched block computes with token sizes
            or text masks: ``"auto"`` (FlexAttention on CUDA, with ``log(size)`` as a
            ``score_mod`` and padding / causal masks as a block mask, so the GPU keeps a
            fused kernel; ``scaled_dot_product_attention`` with a float mask on the CPU and
            when nothing masks or biases), ``"sdpa"`` (always the float mask) or ``"flex"``
            (always FlexAttention; on the CPU flex's unfused reference, for checks). See
            :mod:`vlprune.core.attention`.
        trace_source: keep a ``(B, N, N0)`` map of which input tokens each token holds, read with
            :func:`vlprune.get_source` (for visualisation; costs memory).
        prune_keep: score-based pruning: fraction in (0, 1] of the unprotected tokens kept at
            each pruning layer (one float, or a list with one value per ``prune_layers``
            entry). ``None`` switches pruning off.
        prune_layers: layer indices where pruning happens, after the attention of that layer.
            Default: EViT's placement (a quarter, half, three quarters in: 3, 6, 9 of 12).
        prune_score: how tokens are ranked: ``cls_attn`` (class-token attention, EViT),
            ``cls_attn_vnorm`` (times value norm, ATS), ``key_norm``, ``attn_entropy``
            (focused attention rows first), ``diversity`` (max-min farthest-point on keys),
            ``random`` (seeded baseline).
        prune_fuse: fuse the dropped tokens into one extra token (EViT): with the class
            attention scores (``cls_attn``, ``cls_attn_vnorm``) it is the sum of the dropped
            tokens, each times its score (EViT's rule, not renormalised); with other scores or
            ``guide``, their size-weighted mean. Its size counts the tokens it holds; attention
            treats it as one fresh token.
        prune_recycle: merge each dropped token into its most similar kept token instead of
            dropping it ("nearest-kept recycling": a size-weighted merge into the most
            cosine-similar kept token; not PruMerge, whose LLaVA rule is
            ``visual_score="prumerge"``).
        prune_seed: seed of the ``random`` score: in eval mode the same choices every forward; in
            training mode a new draw per forward from a sequence this seed starts.
        text_merge_r: merging in the text tower of a two-tower model (CLIP, SigLIP), or of a
            text model patched alone. ``None`` (default): the text tower uses ``merge_r``.
        text_prune_keep: pruning in the text tower. On a two-tower model the ``prune_*``
            options prune the image tower only and the text tower prunes only with
            ``text_prune_keep``; a text model patched alone takes either.
        text_prune_layers: layers of the text tower that prune (default: EViT's placement).
        text_prune_score: score of the text tower's pruning; ``cls_attn`` there is the
            attention of the pooling token (EOT for CLIP, the last token for SigLIP).
        text_output: what a reduced BERT-style encoder (``hf_bert``) returns as
            ``last_hidden_state``. ``"full"`` (default): one vector per input position, as
            upstream (each position gets the final value of the token it was merged into; a
            pruned position keeps its output of the layer where it left; padding is zero), so
            mean pooling with the input's attention mask keeps working. ``"compact"``: the
            reduced tokens, with ``attention_mask`` (real tokens) and ``token_sizes`` (input
            tokens each one holds) on the output.
        guide: cross-modal alignment-guided dropping on a two-tower model. ``"text"``: the
            image tower's pruning (``prune_keep`` at ``prune_layers``) keeps the patches whose
            features, through the model's own image head, align best with the texts of the
            same forward (max over texts). ``"image"``: the text tower's pruning
            (``text_prune_keep``) keeps the tokens that align best with the images.
        visual_keep: "before the LLM" reduction in a vision-language model (LLaVA): the
            projected visual tokens each image keeps, as an ``int`` count (1 .. tokens per
            image) or a ``float`` ratio in (0, 1] (``ceil(ratio * tokens)``, at least one).
            The kept tokens stay in their original order (``visionzip``: dominant tokens in
            order, then the contextual ones) and the prompt's image placeholder span shrinks to
            match, so the language model sees fewer tokens. ``None`` or ``1.0``: every token
            (with ``prumerge`` / ``prumerge_plus`` it must be ``None``: their count is
            adaptive).
        visual_score: how visual tokens are ranked: ``cls_attn`` (the vision tower's class
            token attention at the feature layer, FasterVLM), ``attn`` (the mean attention
            each token receives at the feature layer, every query row, heads averaged; what
            ``cls_attn`` falls back to on a tower without a class token), ``random`` (seeded:
            the same patch positions for every image),
            ``dominant_contextual`` (VisionZip-like, our own variant for every family: the top
            class-attention tokens plus ``visual_contextual`` tokens that each average a group
            of similar leftover *projected* tokens; it differs from VisionZip in the features
            averaged, the similarity, the centres, the averaging rule and the class token, see
            :func:`vlprune.core.visual.dominant_contextual`),
            ``visionzip`` (exact VisionZip, LLaVA-1.5 only: a CLIP tower with a class token and
            one int ``vision_feature_layer``; the tower's hidden states at that layer are
            reduced before the projector: the class token and the top patches by that layer's
            class attention summed over heads are *dominant*, and ``visual_contextual``
            contextual tokens each add to one of evenly spaced leftover tokens the mean of the
            leftover tokens whose head-averaged keys are most similar to it; ``visual_keep``
            counts every kept token, class token included: ``visual_keep=64`` is VisionZip's
            "64" setting, 54 dominant (class token + 53 patches) + 10 contextual, ``128`` is
            108 + 20, ``192`` is 162 + 30),
            ``prumerge`` / ``prumerge_plus`` (exact LLaVA-PruMerge / PruMerge+, LLaVA-1.5
            only: the count is adaptive, so ``visual_keep`` must stay unset; the patches whose
            class attention, recomputed single-head from the q/k projections of the encoder
            layer that reads the feature layer, is an IQR outlier are kept (PruMerge+ adds
            every ``int(int(1 / ratio) / 3)``-th patch), each updated with the
            attention-weighted sum of its 32 nearest tokens by key cosine, plus one token: the
            attention-weighted sum of the tokens not kept; kept tokens come in attention
            order, then the added ones, then the extra token; counts differ per image),
            ``text`` (the attention the prompt's text embeddings give each projected visual
            token, SparseVLM-like), ``diversity`` (max-min farthest-point on the projected
            features, DivPrune) or ``pool`` (2x2 average pooling of the patch grid:
            ``visual_keep`` must then be a quarter of the tokens per image).
        visual_seed: seed of the ``random`` visual score.
        visual_contextual: with ``dominant_contextual`` or ``visionzip``, how many of each
            image's kept tokens are merged contextual tokens (default: ``round(10 / 64 *
            kept)``, VisionZip's 54 + 10 split at 64 tokens, 108 + 20 at 128, 162 + 30 at 192;
            at most ``kept - 1``: with ``visionzip`` the class token is always kept; 0: the
            dominant tokens only).
        text_keep: image-guided prompt dropping in a vision-language model (LLaVA): the
            fraction in (0, 1] of each prompt's droppable text tokens kept, ranked by their
            best cosine similarity to the row's projected visual tokens. Special tokens
            (BOS/EOS/padding ids of the language model's config), image placeholders, padding
            and the last ``text_protect_last`` tokens of the prompt are never dropped; rows
            without an image keep their prompt.
        text_protect_last: prompt tokens at the end of each row that ``text_keep`` never
            drops (default 8: the assistant turn marker and the question's end).
        llm_layer: FastV pruning inside the language model of a vision-language model
            (LLaVA), at prefill: the decoder layer (FastV's K; ``0 < llm_layer <`` number of
            LLM layers, checked at patch time) from which on only ``llm_keep`` visual tokens
            per image remain, ranked by the attention the last prompt token gives them in
            layer ``llm_layer - 1`` (heads averaged; that one row recomputed from that layer's
            own input, query/key projections and RoPE), as FastV ranks. Needs ``llm_keep``.
        llm_keep: visual tokens per image kept from ``llm_layer`` on, of those entering the
            language model (after ``visual_keep``): an ``int`` count or a ``float`` ratio in
            (0, 1] (``ceil(ratio * tokens)``, at least one). ``None`` or ``1.0``: every token.
        llm_renumber_positions: give the kept tokens (and the generated ones) contiguous RoPE
            positions in the pruned layers; by default they keep their original positions.
        temporal_keep: temporal merging of the videos of a video-language model
            (LLaVA-NeXT-Video, LLaVA-OneVision), before the LLM: each video's first frame keeps
            its tokens; every later frame keeps its ``temporal_keep`` tokens least similar to
            the same place in the frame before (an ``int`` count per frame, or a ``float`` ratio
            in (0, 1]) and merges the others into them (chains followed back to the survivor;
            size-weighted means). The video's placeholder span shrinks to match. ``1.0``: every
            token. See :func:`vlprune.temporal_merge`.
        temporal_threshold: instead of ``temporal_keep``: merge every video token whose cosine
            similarity to its place in the frame before is ``>=`` this value (in [-1, 1]); the
            token count then depends on the video.
        family: force an adapter by name instead of detecting it from the model's class.
    """

    merge_r: MergeSchedule = 0
    prune_keep: float | list[float] | None = None
    prune_layers: tuple[int, ...] | None = None
    prune_score: str = "cls_attn"
    prune_fuse: bool = False
    prune_recycle: bool = False
    prune_seed: int = 0
    prop_attn: bool = True
    attn_backend: str = "auto"
    trace_source: bool = False
    text_merge_r: MergeSchedule | None = None
    text_prune_keep: float | list[float] | None = None
    text_prune_layers: tuple[int, ...] | None = None
    text_prune_score: str | None = None
    text_output: str = "full"
    guide: str | None = None
    visual_keep: int | float | None = None
    visual_score: str = "cls_attn"
    visual_seed: int = 0
    visual_contextual: int | None = None
    text_keep: float | None = None
    text_protect_last: int | None = None
    llm_layer: int | None = None
    llm_keep: int | float | None = None
    llm_renumber_positions: bool = False
    temporal_keep: int | float | None = None
    temporal_threshold: float | None = None
    family: str | None = None
    version: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.merge_r = validate_merge_r(self.merge_r)
        self._validate_prune()
        self._validate_text()
        self._validate_visual()
        self._validate_llm()
        self._validate_temporal()
        for name in ("prop_attn", "trace_source", "prune_fuse", "prune_recycle"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {list(ATTN_BACKENDS)}, got {self.attn_backend!r}")
        if self.family is not None and not isinstance(self.family, str):
            raise ValueError(f"family must be a string or None, got {self.family!r}")
        if not self.version:
            self.version = __version__

    def _validate_prune(self) -> None:
        self.prune_keep, self.prune_layers = _validate_keep_layers(
            self.prune_keep, self.prune_layers, "prune_keep", "prune_layers"
        )
        if self.prune_score not in PRUNE_SCORES:
            raise ValueError(f"unknown prune_score {self.prune_score!r}; allowed: {list(PRUNE_SCORES)}")
        if self.prune_keep is None:
            stray = [
                name for name, default in (
                    ("prune_score", "cls_attn"), ("prune_fuse", False), ("prune_recycle", False),
                    ("prune_seed", 0),
                ) if getattr(self, name) != default
            ]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} set but prune_keep is not, so pruning is off and they would "
                    "be ignored; give prune_keep in (0, 1] (or leave them at their defaults)"
                )
        if self.prune_fuse is True and self.prune_recycle is True:
            raise ValueError("prune_fuse and prune_recycle exclude each other; pick one")
        if not _is_int(self.prune_seed):
            raise ValueError(f"prune_seed must be an int, got {self.prune_seed!r}")

    def _validate_text(self) -> None:
        if self.text_merge_r is not None:
            self.text_merge_r = validate_merge_r(self.text_merge_r)
        self.text_prune_keep, self.text_prune_layers = _validate_keep_layers(
            self.text_prune_keep, self.text_prune_layers, "text_prune_keep", "text_prune_layers"
        )
        if self.text_prune_score is not None:
            if self.text_prune_score not in PRUNE_SCORES:
                raise ValueError(
                    f"unknown text_prune_score {self.text_prune_score!r}; allowed: {list(PRUNE_SCORES)}"
                )
            if self.text_prune_keep is None:
                raise ValueError(
                    "text_prune_score is set but text_prune_keep is not, so it would be ignored; "
                    "give text_prune_keep in (0, 1]"
                )
        if self.text_output not in TEXT_OUTPUTS:
            raise ValueError(f"unknown text_output {self.text_output!r}; allowed: {list(TEXT_OUTPUTS)}")
        if self.guide not in GUIDES:
            raise ValueError(f"unknown guide {self.guide!r}; allowed: {list(GUIDES)}")
        if self.guide == "text":
            if self.prune_keep is None:
                raise ValueError(
                    "guide='text' drops image tokens with the image tower's pruning: give prune_keep "
                    "(and prune_layers)"
                )
            if self.prune_score != "cls_attn":
                raise ValueError("guide='text' replaces prune_score; leave prune_score unset")
        if self.guide == "image":
            if self.text_prune_keep is None:
                raise ValueError(
                    "guide='image' drops text tokens with the text tower's pruning: give "
                    "text_prune_keep (and text_prune_layers)"
                )
            if self.text_prune_score is not None:
                raise ValueError("guide='image' replaces text_prune_score; leave it unset")

    def _validate_visual(self) -> None:
        keep = self.visual_keep
        if keep is not None:
            self.visual_keep = count_or_ratio(keep, "visual_keep", "visual tokens each image keeps")
        if self.visual_score not in VISUAL_SCORES:
            raise ValueError(f"unknown visual_score {self.visual_score!r}; allowed: {list(VISUAL_SCORES)}")
        if not _is_int(self.visual_seed):
            raise ValueError(f"visual_seed must be an int, got {self.visual_seed!r}")
        ctx = self.visual_contextual
        if ctx is not None:
            if not _is_int(ctx) or ctx < 0:
                raise ValueError(f"visual_contextual must be an int >= 0, got {ctx!r}")
            if self.visual_score not in CONTEXTUAL_VISUAL_SCORES:
                raise ValueError(
                    "visual_contextual is the contextual-token count of visual_score="
                    f"'dominant_contextual' or 'visionzip'; with visual_score={self.visual_score!r} "
                    "it would be ignored"
                )
        adaptive = self.visual_score in ADAPTIVE_VISUAL_SCORES
        if adaptive and keep is not None:
            raise ValueError(
                f"visual_score={self.visual_score!r} picks each image's token count itself (the "
                "IQR outliers of the class attention, as LLaVA-PruMerge), so visual_keep would be "
                f"ignored; leave visual_keep unset, got {keep!r}"
            )
        if adaptive and self.visual_seed != 0:
            raise ValueError(
                f"visual_seed is the seed of visual_score='random'; visual_score="
                f"{self.visual_score!r} draws nothing"
            )
        tk = self.text_keep
        if tk is not None:
            if not (isinstance(tk, numbers.Real) and not isinstance(tk, bool) and 0.0 < tk <= 1.0):
                raise ValueError(f"text_keep must be a float ratio in (0, 1], got {tk!r}")
            self.text_keep = float(tk)
        last = self.text_protect_last
        if last is not None:
            if not _is_int(last) or last < 0:
                raise ValueError(f"text_protect_last must be an int >= 0, got {last!r}")
            if tk is None:
                raise ValueError(
                    "text_protect_last set but text_keep is not, so prompt dropping is off and it "
                    "would be ignored; give text_keep in (0, 1]"
                )
        if keep is None and not adaptive:
            stray = [name for name, default in (
                ("visual_score", "cls_attn"), ("visual_seed", 0), ("visual_contextual", None))
                if getattr(self, name) != default]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} set but visual_keep is not, so visual token reduction is "
                    "off and they would be ignored; give visual_keep (or leave them at their defaults)"
                )

    def _validate_llm(self) -> None:
        layer, keep = self.llm_layer, self.llm_keep
        if layer is not None and not (_is_int(layer) and layer >= 1):
            raise ValueError(
                f"llm_layer must be an int >= 1 (a decoder layer of the language model), got {layer!r}"
            )
        if keep is not None:
            self.llm_keep = count_or_ratio(
                keep, "llm_keep", "visual tokens each image keeps inside the language model")
        if not isinstance(self.llm_renumber_positions, bool):
            raise ValueError(
                f"llm_renumber_positions must be True or False, got {self.llm_renumber_positions!r}"
            )
        if keep is not None and layer is None:
            raise ValueError("llm_keep is set but llm_layer is not; give llm_layer (the decoder "
                             "layer from which on visual tokens are pruned)")
        if keep is None and (layer is not None or self.llm_renumber_positions):
            name = "llm_layer" if layer is not None else "llm_renumber_positions"
            raise ValueError(
                f"{name} set but llm_keep is not, so pruning inside the language model is off and "
                "it would be ignored; give llm_keep (an int count or a float ratio in (0, 1])"
            )
        if layer is not None:
            self.llm_layer = int(layer)

    def _validate_temporal(self) -> None:
        keep, thr = self.temporal_keep, self.temporal_threshold
        if keep is not None:
            self.temporal_keep = count_or_ratio(
                keep, "temporal_keep", "tokens each frame after the first keeps")
        if thr is not None:
            if not (isinstance(thr, numbers.Real) and not isinstance(thr, bool) and -1.0 <= thr <= 1.0):
                raise ValueError(
                    f"temporal_threshold is a cosine similarity in [-1, 1], got {thr!r}"
                )
            self.temporal_threshold = float(thr)
        if keep is not None and thr is not None:
            raise ValueError(
                "temporal_keep (a static per-frame budget) and temporal_threshold (merge what is "
                "at least this similar) exclude each other; give one"
            )

    @property
    def has_visual_settings(self) -> bool:
        """True when ``visual_keep``, ``llm_keep``, ``text_keep`` or a ``temporal_*`` option is
        set, or an adaptive ``visual_score`` (``prumerge``, ``prumerge_plus``; vision-language
        models only)."""
        return self.visual_score in ADAPTIVE_VISUAL_SCORES or any(
            getattr(self, n) is not None for n in (
                "visual_keep", "llm_keep", "text_keep", "temporal_keep", "temporal_threshold"))

    @property
    def temporal_is_identity(self) -> bool:
        """True when temporal merging of videos keeps every token."""
        keep = self.temporal_keep
        return self.temporal_threshold is None and (
            keep is None or (isinstance(keep, float) and keep == 1.0))

    @property
    def llm_is_identity(self) -> bool:
        """True when the pruning inside the language model keeps every visual token."""
        keep = self.llm_keep
        return keep is None or (isinstance(keep, float) and keep == 1.0)

    @property
    def visual_is_identity(self) -> bool:
        """True when the visual-token reduction keeps every token (count-independent check;
        the adaptive scores ``prumerge`` / ``prumerge_plus`` always reduce)."""
        if self.visual_score in ADAPTIVE_VISUAL_SCORES:
            return False
        keep = self.visual_keep
        return keep is None or (isinstance(keep, float) and keep == 1.0)

    @property
    def text_keep_is_identity(self) -> bool:
        """True when image-guided prompt dropping keeps every text token."""
        return self.text_keep is None or self.text_keep == 1.0

    @property
    def has_text_settings(self) -> bool:
        """True when any ``text_*`` option or ``guide`` is set."""
        return any(
            getattr(self, name) is not None
            for name in ("text_merge_r", "text_prune_keep", "text_prune_layers", "text_prune_score", "guide")
        )

    def for_tower(self, tower: str, two_towers: bool) -> ReductionConfig:
        """The single-tower config of ``tower`` (``"image"`` or ``"text"``).

        On a two-tower model the text tower takes ``text_merge_r`` (else ``merge_r``) and only
        the ``text_prune_*`` options; the image tower takes the unprefixed options. A text
        model patched alone takes ``text_*`` options where given, else the unprefixed ones.
        Guidance is not part of a tower's config: the two-tower adapter wires it.
        """
        if tower not in ("image", "text"):
            raise ValueError(f"unknown tower {tower!r}; allowed: ['image', 'text']")
        base = dict(
            prop_attn=self.prop_attn, attn_backend=self.attn_backend,
            trace_source=self.trace_source, family=None, version=self.version,
        )
        if tower == "image":
            return ReductionConfig(
                merge_r=self.merge_r, prune_keep=self.prune_keep, prune_layers=self.prune_layers,
                prune_score=self.prune_score, prune_fuse=self.prune_fuse,
                prune_recycle=self.prune_recycle, prune_seed=self.prune_seed,
                **base,
            )
        merge_r = self.merge_r if self.text_merge_r is None else self.text_merge_r
        if self.text_prune_keep is not None or two_towers:
            keep, layers = self.text_prune_keep, self.text_prune_layers
            score = self.text_prune_score or "cls_attn"
            extra = dict(prune_seed=self.prune_seed) if keep is not None else {}
        else:
            keep, layers, score = self.prune_keep, self.prune_layers, self.prune_score
            extra = dict(prune_fuse=self.prune_fuse, prune_recycle=self.prune_recycle, prune_seed=self.prune_seed)
        return ReductionConfig(
            merge_r=merge_r, prune_keep=keep, prune_layers=layers, prune_score=score,
            text_output=self.text_output, **extra, **base,
        )

    @property
    def prune_mode(self) -> str:
        return "fuse" if self.prune_fuse else "recycle" if self.prune_recycle else "drop"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "version")

    def replace(self, **changes: Any) -> ReductionConfig:
        """A validated copy with ``changes`` applied; unknown names raise ``TypeError``."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise TypeError(
                f"unknown setting(s) {unknown}; known settings: {list(self.field_names())}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings that differ from the defaults, as JSON-ready values (``merge_r``'s
        ``(r, inflection)`` ramp becomes ``{"r": r, "inflection": x}``, tuples become lists).
        :meth:`from_dict` reads it back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "version" or value == f.default:
                continue
            if f.name in ("merge_r", "text_merge_r") and isinstance(value, tuple):
                value = {"r": value[0], "inflection": value[1]}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> ReductionConfig:
        """A config from :meth:`to_dict`'s form (unknown keys raise with the known ones)."""
        if not isinstance(data, dict):
            raise ValueError(f"a ReductionConfig is read from a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.field_names()) - {"version"})
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known settings: {list(cls.field_names())}")
        kw = {k: v for k, v in data.items() if k != "version"}
        for name in ("merge_r", "text_merge_r"):
            ramp = kw.get(name)
            if isinstance(ramp, dict):
                if set(ramp) != {"r", "inflection"}:
                    raise ValueError(f"{name} as an object must be {{'r': R, 'inflection': X}}, got {ramp}")
                kw[name] = (ramp["r"], ramp["inflection"])
        return cls(**kw)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON (read back with :meth:`load`, or any CLI's ``--config``)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReductionConfig:
        """Read a config saved by :meth:`save`, or the ``"config"`` of a saved calibration
        (``vlprune calibrate --out``)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not JSON ({e}); expected a JSON object of ReductionConfig settings") from None
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            data = data["config"]
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{p}: {e}") from None

    @property
    def is_identity(self) -> bool:
        """True when this config removes no token at any layer of any tower."""
        return all(
            _no_merge(r) for r in (self.merge_r, self.text_merge_r) if r is not None
        ) and all(_no_prune(k) for k in (self.prune_keep, self.text_prune_keep)) and (
            self.visual_is_identity and self.llm_is_identity and self.text_keep_is_identity
            and self.temporal_is_identity
        )


def _no_merge(r: MergeSchedule) -> bool:
    return not any(r) if isinstance(r, list) else (r[0] == 0 if isinstance(r, tuple) else r == 0)


def _no_prune(keep: float | list[float] | None) -> bool:
    return keep is None or all(k == 1.0 for k in (keep if isinstance(keep, list) else [keep]))
