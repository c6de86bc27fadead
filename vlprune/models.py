"""Named models with random weights, built from configs without any download: what
``vlprune bench`` / ``vlprune describe`` run (``--model``) and what ``llava:<shape>`` means
for ``vlprune eval vqa``.

Names: a timm model name (:func:`build_timm`); ``open_clip:<config>``
(:func:`build_open_clip_tower`); ``hf_clip:<shape>`` / ``hf_siglip:<shape>``
(:data:`HF_SHAPES`, :func:`build_hf_tower`); ``llava:<shape>`` (:data:`LLAVA_SHAPES`,
:func:`build_llava`). :func:`build_model` dispatches on the name. A name that cannot be built
(unknown, a missing library, options that do not apply) raises :class:`ModelBuildError`
with a message naming what is known or what to install.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = [
    "HF_SHAPES",
    "LLAVA_SHAPES",
    "ModelBuildError",
    "build_hf_tower",
    "build_llava",
    "build_model",
    "build_open_clip_tower",
    "build_timm",
    "created_on",
    "is_llava",
    "is_vlm",
    "left_pad",
]


class ModelBuildError(RuntimeError):
    """A named model that cannot be built: unknown name or shape, a missing library, or an
    option that does not apply to it (the message says which)."""


# Hugging Face towers built from configs (no download): the public checkpoints' shapes.
HF_SHAPES = {
    "hf_clip": {
        "ViT-B-32": dict(vision=dict(patch_size=32), text={}),
        "ViT-B-16": dict(vision=dict(patch_size=16), text={}),
        "ViT-L-14": dict(
            vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                        num_attention_heads=16, patch_size=14),
            text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        ),
    },
    "hf_siglip": {
        # SigLIP's tokenizer: pad = eos = 1 (the config's defaults are CLIP's ids)
        "base-patch16-224": dict(vision={}, text=dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)),
        "so400m-patch14-384": dict(
            vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                        num_attention_heads=16, patch_size=14, image_size=384),
            text=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                      num_attention_heads=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        ),
    },
}


# LLaVA models built from configs: the vision tower, projector and language-model widths of
# the public checkpoints; the language model is built shallower (``llm_layers``) so that a
# prefill fits a CPU run. The real depth is in ``real_llm_layers``.
def _llava_shape(vision: dict, text: dict, **rest: int) -> dict:
    """A LLaVA-1.5 shape: ``vision`` on the 336 px / patch 14 grid (576 visual tokens),
    ``text`` a Llama padding with id 0, ``rest`` the image token and the depths."""
    return dict(vision=dict(vision, patch_size=14, image_size=336),
                text=dict(text, pad_token_id=0), **rest)


LLAVA_SHAPES = {
    "1.5-7b": _llava_shape(  # CLIP ViT-L/14-336 + a Llama-2-7B-shaped LLM
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=16, projection_dim=768),
        dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096),
        image_token_index=32000, llm_layers=4, real_llm_layers=32,
    ),
    "tiny": _llava_shape(  # the same grid, tiny widths: tests
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             projection_dim=32),
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=320, max_position_embeddings=1024),
        image_token_index=300, llm_layers=2, real_llm_layers=2,
    ),
}


def is_llava(name: str) -> bool:
    """Whether ``name`` is a ``llava:<shape>`` model."""
    return name.partition(":")[0] == "llava"


# The other VLM families, each built by its own module: name prefix -> (module, builder).
# A builder takes ``(shape, img_size, llm_layers, vision_layers)`` and returns the model
# (random weights, float32, eval mode not required); its module also has ``SHAPES`` and
# ``dummy_inputs(model, batch_size, text_tokens, image_size=None, seed=0)``.
VLM_BUILDERS = {
    "qwen2.5-vl": ("vlprune.models_qwen", "build_qwen2_5_vl"),
    "qwen3-vl": ("vlprune.models_qwen", "build_qwen3_vl"),
    "internvl": ("vlprune.models_internvl", "build_internvl"),
}


def is_vlm(name: str) -> bool:
    """Whether ``name`` is a vision-language model (``llava:`` or a :data:`VLM_BUILDERS`
    family), whose ``--llm-layers`` / ``--vision-layers`` apply."""
    return is_llava(name) or name.partition(":")[0] in VLM_BUILDERS


def left_padded_prompts(batch_size: int, text_tokens: int, span: torch.Tensor, vocab: int,
                        avoid: set[int], pad: int, generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``batch_size`` left-padded prompts for the
    ``dummy_inputs`` of the VLM modules: row ``b`` holds ``text_tokens + b`` random text ids
    (below ``min(vocab, 4096)``, none in ``avoid`` or ``pad``) with the image ``span`` (its
    markers and placeholders) after the first ``n // 3 + 1`` of them."""
    ok = torch.tensor([t for t in range(min(vocab, 4096)) if t not in avoid and t != pad])
    rows = []
    for b in range(batch_size):
        n = text_tokens + b
        text = ok[torch.randint(0, len(ok), (n,), generator=generator)]
        before = n // 3 + 1
        rows.append(torch.cat([text[:before], span, text[before:]]))
    return left_pad(rows, pad)


def left_pad(seqs, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of the 1-D id tensors ``seqs``, padded with ``pad`` on
    the left to the longest (as a tokenizer pads prompts for generation)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, L - len(s):] = s
        mask[b, L - len(s):] = 1
    return ids, mask


def vlm_module(name: str):
    """The module that builds the :data:`VLM_BUILDERS` family of ``name``."""
    import importlib

    module, _ = VLM_BUILDERS[name.partition(":")[0]]
    return importlib.import_module(module)


def build_llava(shape: str, img_size: int | None = None, llm_layers: int | None = None,
                vision_layers: int | None = None):
    """A ``LlavaForConditionalGeneration`` of a :data:`LLAVA_SHAPES` shape, random weights
    (LLaVA-1.5 wiring: penultimate vision layer, class token dropped)."""
    try:
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
        )
    except ImportError as e:
        raise ModelBuildError("LLaVA models need transformers: pip install 'vlprune[hf]'") from e
    if shape not in LLAVA_SHAPES:
        raise ModelBuildError(f"unknown llava shape {shape!r}; known: {sorted(LLAVA_SHAPES)}")
    spec = LLAVA_SHAPES[shape]
    vision = dict(spec["vision"])
    if img_size:
        vision["image_size"] = img_size
    if vision_layers is not None:
        if vision_layers < 2:
            raise ModelBuildError("--vision-layers must be >= 2 (LLaVA reads the penultimate layer)")
        vision["num_hidden_layers"] = vision_layers
    n_llm = spec["llm_layers"] if llm_layers is None else llm_layers
    if n_llm < 1:
        raise ModelBuildError("--llm-layers must be >= 1")
    grid = (vision["image_size"] // vision["patch_size"]) ** 2
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(num_hidden_layers=n_llm, **spec["text"]),
        image_token_index=spec["image_token_index"], image_seq_length=grid,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(cfg)


def build_model(name: str, img_size: int | None, device: str, dtype: torch.dtype,
                tower: str = "image", llm_layers: int | None = None,
                vision_layers: int | None = None):
    """A model with random weights (no download), in eval mode on ``device``/``dtype``.

    ``name`` is a timm model name, ``open_clip:<config>`` (e.g. ``open_clip:ViT-B-16``), or
    ``hf_clip:<shape>`` / ``hf_siglip:<shape>`` (see :data:`HF_SHAPES`). For the CLIP
    families ``tower`` picks the image tower or a text tower of the same shape.
    Vision-language models are created directly on a non-CPU ``device`` in ``dtype``
    (:func:`created_on`): a 7B model never exists in float32 on the host.
    """
    family, _, config = name.partition(":")
    if not is_vlm(name) and (llm_layers is not None or vision_layers is not None):
        raise ModelBuildError("--llm-layers / --vision-layers need a vision-language model "
                              f"(llava:, {', '.join(f'{f}:' for f in VLM_BUILDERS)}), got {name!r}")
    if tower != "image" and family not in ("open_clip", *HF_SHAPES):
        raise ModelBuildError(f"--tower {tower} needs an open_clip:, hf_clip: or hf_siglip: model, got {name!r}")
    if family == "llava":
        with created_on(device, dtype):
            model = build_llava(config, img_size, llm_layers, vision_layers)
    elif family in VLM_BUILDERS:
        with created_on(device, dtype):
            model = getattr(vlm_module(name), VLM_BUILDERS[family][1])(config, img_size,
                                                                       llm_layers, vision_layers)
    elif family == "open_clip":
        model = build_open_clip_tower(config, img_size, tower)
    elif family in HF_SHAPES:
        model = build_hf_tower(family, config, img_size, tower)
    else:
        model = build_timm(name, img_size)
    return model.to(device=device, dtype=dtype).eval()


@contextlib.contextmanager
def created_on(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create the parameters and buffers of modules built inside on ``device`` in ``dtype``
    (floating ones; torch's default device and default dtype), initialised there. On the CPU
    it changes nothing: models are built in float32 and cast afterwards, as always, so CPU
    weights do not depend on ``dtype``. Elsewhere a random 7B model takes seconds instead of
    initialising 28 GB of float32 on the host first. The default dtype is process-wide:
    build one model at a time."""
    dev = torch.device(device)
    if dev.type == "cpu":
        yield
        return
    before = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        with dev:
            yield
    finally:
        torch.set_default_dtype(before)


def build_hf_tower(family: str, shape: str, img_size: int | None, tower: str):
    """The image or text tower of a :data:`HF_SHAPES` shape (``CLIPVisionModel``,
    ``SiglipTextModel``, ...), random weights."""
    try:
        import transformers
    except ImportError as e:
        raise ModelBuildError("Hugging Face models need transformers: pip install 'vlprune[hf]'") from e
    shapes = HF_SHAPES[family]
    if shape not in shapes:
        raise ModelBuildError(f"unknown {family} shape {shape!r}; known: {sorted(shapes)}")
    kw = dict(shapes[shape][tower if tower == "text" else "vision"])
    if img_size and tower == "image":
        kw["image_size"] = img_size
    prefix = "CLIP" if family == "hf_clip" else "Siglip"
    kind = "Vision" if tower == "image" else "Text"
    config = getattr(transformers, f"{prefix}{kind}Config")(**kw)
    return getattr(transformers, f"{prefix}{kind}Model")(config)


def build_timm(name: str, img_size: int | None):
    """A timm model by name, random weights."""
    try:
        import timm
    except ImportError as e:
        raise ModelBuildError("timm models need timm: pip install 'vlprune[timm]'") from e
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise ModelBuildError(
            f"unknown timm model {name!r}; similar names: {close} (open_clip towers: "
            "open_clip:<config>, e.g. open_clip:ViT-B-16)"
        )
    kwargs = {"img_size": img_size} if img_size else {}
    return timm.create_model(name, pretrained=False, **kwargs)


def build_open_clip_tower(config: str, img_size: int | None, tower: str):
    """The image tower (``model.visual``) or the text tower (a ``TextTransformer``) of an
    open_clip config, random weights."""
    try:
        import open_clip
    except ImportError as e:
        raise ModelBuildError("open_clip models need open_clip_torch: pip install 'vlprune[clip]'") from e
    if config not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if config.split("-")[0].lower() in m.lower()][:10]
        raise ModelBuildError(f"unknown open_clip config {config!r}; similar: {close}")
    if tower == "text":
        # the text tower of that config as a TextTransformer (CLIP keeps it inline)
        from open_clip.model import _build_text_tower

        cfg = open_clip.get_model_config(config)
        if "hf_model_name" in cfg.get("text_cfg", {}):
            raise ModelBuildError(f"{config} has a Hugging Face text encoder, which vlprune does not patch")
        return _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    kwargs = {"force_image_size": img_size} if img_size else {}
    return open_clip.create_model(config, pretrained=None, **kwargs).visual
