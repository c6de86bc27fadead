"""LLaVA-style models for the generation tasks (VQA, captioning), with their processors and
prompts.

Models (:func:`load_vlm`): a Hugging Face hub name or a local folder (``AutoProcessor`` + the
LLaVA class of its config, :data:`ARCHITECTURES`), or ``llava:<shape>``
(:data:`vlprune.models.LLAVA_SHAPES`, random weights, no download) with an offline processor
built in code (:func:`offline_processor`): a word-level tokenizer whose vocabulary comes from
the questions and answers (or the captions), and a CLIP image processor.

Prompts (:class:`Prompter`): a template with the question (and the LLaVA evaluation suffix
:data:`ANSWER_SUFFIX`; for captioning :data:`CAPTION_INSTRUCTION` instead), written by the
processor's chat template when it has one, else by the family's template
(:data:`PROMPT_TEMPLATES`; LLaVA-1.5: ``"USER: <image>\\n{question} Answer the question using
a single word or phrase. ASSISTANT:"``), or given explicitly.
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .vqa_data import CaptionRecord, Record

__all__ = [
    "ANSWER_SUFFIX",
    "ARCHITECTURES",
    "CAPTION_INSTRUCTION",
    "PROMPT_TEMPLATES",
    "SPECIAL_TOKENS",
    "VLM",
    "Prompter",
    "load_vlm",
    "offline_processor",
    "vlm_family",
]

#: the instruction LLaVA's VQAv2 / GQA evaluation appends to every question
ANSWER_SUFFIX = "Answer the question using a single word or phrase."

#: the text of a captioning prompt, in place of the question (the prompt of lmms-eval's COCO
#: caption tasks)
CAPTION_INSTRUCTION = "Provide a one-sentence caption for the provided image."

_QWEN_TEMPLATE = ("<|im_start|>user\n<|vision_start|><image><|vision_end|>{question}<|im_end|>\n"
                  "<|im_start|>assistant\n")
#: per-family prompts, used when the processor has no chat template (``{question}`` holds the
#: question and :data:`ANSWER_SUFFIX`, or :data:`CAPTION_INSTRUCTION`; ``<image>`` is replaced
#: by the processor's image token)
PROMPT_TEMPLATES = {
    "llava": "USER: <image>\n{question} ASSISTANT:",
    "llava_next": "USER: <image>\n{question} ASSISTANT:",
    "llava_next_video": "USER: <image>\n{question} ASSISTANT:",
    "llava_onevision": "<|im_start|>user <image>\n{question}<|im_end|><|im_start|>assistant\n",
    "qwen2_5_vl": _QWEN_TEMPLATE,
    "qwen3_vl": _QWEN_TEMPLATE,
}

#: the LLaVA classes a hub / local model may have (config architecture -> family)
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "LlavaNextVideoForConditionalGeneration": "llava_next_video",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
}

#: the special tokens of :func:`offline_processor` (pad, bos, eos, unk)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

# what the offline tokenizer's pre-tokenizer (tokenizers' Whitespace) splits text into
_WORD = re.compile(r"\w+|[^\w\s]+")
# CLIP's normalisation (the LLaVA-1.5 image processor)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VLM:
    """A LLaVA-style model with its processor.

    ``family`` is ``llava``, ``llava_next``, ``llava_onevision`` or ``llava_next_video``;
    ``weights`` says where the weights come from (``random`` for ``llava:<shape>``).
    """

    model: nn.Module
    processor: Any
    family: str
    name: str
    weights: str


def _words(texts: Iterable[str]) -> list[str]:
    """Distinct lower-cased words and punctuation runs, most frequent first (ties: first seen)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_WORD.findall(text.lower()))
    return [w for w, _ in counts.most_common()]  # most_common keeps insertion order on ties


def offline_processor(config: Any, words: Iterable[str] = (), *, image_token: str = "<image>"
                      ) -> Any:
    """A ``LlavaProcessor`` for a LLaVA-1.5 model built from ``config``, with nothing downloaded.

    The tokenizer is word-level (``tokenizers``' ``WordLevel`` in a
    ``PreTrainedTokenizerFast``): text is lower-cased and split into words and punctuation
    runs; ``<pad>``, ``<s>`` and ``</s>`` take the text config's ``pad_token_id``,
    ``bos_token_id`` and ``eos_token_id``, ``image_token`` takes ``config.image_token_id``,
    ``<unk>`` the first free id, and ``words`` (most important first) the next free ids, as many as fit in ``vocab_size``; further words read as
    ``<unk>``. Ids left over are ``<unusedN>`` tokens, so every id the model can generate
    decodes to something. ``<s>`` starts every prompt; padding is on the left.

    The image processor is a ``CLIPImageProcessor`` built from arguments (resize the shorter
    side to the tower's ``image_size``, centre crop, CLIP mean / std); with the patch size,
    the feature select strategy and the class token counted, one image placeholder expands to
    the model's number of visual tokens (576 for ``llava:tiny`` and ``llava:1.5-7b``).
    """
    try:
        from transformers import CLIPImageProcessor, LlavaProcessor
    except ImportError as e:
        raise RuntimeError("the offline processor needs transformers and tokenizers: "
                           "pip install 'vlprune[hf]'") from e
    from ..adapters.base import hf_image_input_size
    from ..adapters.llava import vision_tokens
    from .vlm_offline import word_tokenizer

    tcfg, vcfg = config.text_config, config.vision_config
    ids = {"<pad>": tcfg.pad_token_id, "<s>": tcfg.bos_token_id, "</s>": tcfg.eos_token_id,
           image_token: config.image_token_id}
    tokenizer = word_tokenizer(int(tcfg.vocab_size), ids, words, bos="<s>", pad="<pad>",
                               eos="</s>", max_length=tcfg.max_position_embeddings)
    _, h, w = hf_image_input_size(vcfg)
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": min(h, w)}, resample=3, do_center_crop=True,
        crop_size={"height": h, "width": w}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(_CLIP_MEAN), image_std=list(_CLIP_STD),
        do_convert_rgb=True,
    )
    strategy = config.vision_feature_select_strategy
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vcfg.patch_size,
        vision_feature_select_strategy=strategy, image_token=image_token,
        num_additional_image_tokens=1,  # CLIP's class token
    )
    expanded = (h // vcfg.patch_size) * (w // vcfg.patch_size) + 1 - (strategy == "default")
    expected = vision_tokens(_ConfigView(config))
    if expanded != expected or processor.image_token_id != config.image_token_id:
        raise ValueError(
            f"the offline processor would expand an image to {expanded} tokens of id "
            f"{processor.image_token_id}, the model expects {expected} of id "
            f"{config.image_token_id}"
        )
    return processor


class _ConfigView:
    """Just enough of a model (``.config``) for the adapter's token count."""

    def __init__(self, config: Any) -> None:
        self.config = config


def _family_of_config(config: Any) -> str | None:
    for arch in getattr(config, "architectures", None) or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = getattr(config, "model_type", None)
    return model_type if model_type in ARCHITECTURES.values() else None


_CLASS_OF = {family: arch for arch, family in ARCHITECTURES.items()}


def _load_pretrained(name: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    try:
        import transformers
        from transformers import AutoConfig, AutoProcessor
    except ImportError as e:
        raise RuntimeError("LLaVA models need transformers: pip install 'vlprune[hf]'") from e
    where = "local folder" if Path(name).is_dir() else "Hugging Face hub model"
    hint = ("give a Hugging Face model name (e.g. llava-hf/llava-1.5-7b-hf; needs the hub or "
            "its local cache), a local folder holding config.json, the weights and the "
            "processor files (save_pretrained of the model and of its processor), or "
            "llava:tiny (random weights, offline)")
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as e:
        raise RuntimeError(f"could not read the config of the {where} {name!r} "
                           f"({type(e).__name__}: {e}); {hint}") from e
    family = _family_of_config(config)
    if family is None:
        raise ValueError(
            f"{name!r} is a {getattr(config, 'model_type', '?')!r} model "
            f"(architectures {getattr(config, 'architectures', None)}); vlprune eval vqa runs "
            f"LLaVA-style models: {sorted(ARCHITECTURES)}"
        )
    cls = getattr(transformers, _CLASS_OF[family], None) or transformers.AutoModelForImageTextToText
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device.type == "cuda" and importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = {"": str(device)}  # load straight onto the GPU
    try:
        model = cls.from_pretrained(name, **kwargs)
        processor = AutoProcessor.from_pretrained(name)
    except Exception as e:
        raise RuntimeError(f"could not load the weights or the processor of the {where} "
                           f"{name!r} ({type(e).__name__}: {e}); {hint}") from e
    return model.to(device).eval(), processor


def _vocabulary_texts(records: Sequence[Record]) -> list[str]:
    """The texts the offline tokenizer takes its words from: the prompt template, the
    instruction, then the questions and answers (VQA) or the reference captions."""
    template = PROMPT_TEMPLATES["llava"].replace("<image>", " ").replace("{question}", " ")
    captions = [r for r in records if isinstance(r, CaptionRecord)]
    questions = [r for r in records if not isinstance(r, CaptionRecord)]
    texts = [template]
    if captions:
        texts.append(CAPTION_INSTRUCTION)
    if questions or not captions:
        texts.append(ANSWER_SUFFIX)
    texts += [r.question for r in questions] + [a for r in questions for a in r.answers]
    texts += [c for r in captions for c in r.captions]
    return texts


def vlm_family(model: nn.Module) -> str | None:
    """The :data:`ARCHITECTURES` family of ``model`` (by the class names of its MRO: a
    patched model keeps its upstream class name), or None."""
    return next((ARCHITECTURES[c.__name__] for c in type(model).__mro__
                 if c.__name__ in ARCHITECTURES), None)


def _load_random(name: str, records: Sequence[Record], device: torch.device, dtype: torch.dtype,
                 seed: int, build_model, build_error) -> VLM:
    """A ``qwen2.5-vl:`` / ``qwen3-vl:`` model with random weights and an offline processor
    (:func:`vlprune.eval.vlm_offline.offline_qwen_processor`)."""
    from .vlm_offline import offline_qwen_processor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = build_model(name, None, "cpu", torch.float32)
        except build_error as e:
            raise ValueError(str(e)) from e
    family = vlm_family(model)
    if family not in ("qwen2_5_vl", "qwen3_vl"):
        raise ValueError(f"{name!r}: vlprune eval vqa runs random-weight models of llava:, "
                         f"qwen2.5-vl: and qwen3-vl: (offline processors); load this one "
                         f"from a hub name or a local folder")
    words = _words([PROMPT_TEMPLATES[family].replace("<image>", " ").replace("{question}", " "),
                    *_vocabulary_texts(records)])
    from ..models import vlm_module

    family_name, _, shape = name.partition(":")
    # the images the shape was sized for (448 px on the real shapes), at least an 8 x 8 grid
    # of merged tokens (64 visual tokens on the tiny shapes)
    vcfg = model.config.vision_config
    image_size = max(vlm_module(name).SHAPES[family_name][shape]["img_size"],
                     8 * vcfg.patch_size * vcfg.spatial_merge_size)
    processor = offline_qwen_processor(model.config, words, image_size=image_size)
    return VLM(model.to(device=device, dtype=dtype).eval(), processor, family, name, "random")


def load_vlm(name: str, *, records: Sequence[Record] = (), device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, seed: int = 0) -> VLM:
    """The model and processor to evaluate, in eval mode on ``device`` / ``dtype``.

    - ``qwen2.5-vl:<shape>`` / ``qwen3-vl:<shape>``: the same, with a Qwen processor built in
      code (:func:`vlprune.eval.vlm_offline.offline_qwen_processor`);
    - ``llava:<shape>`` (a :data:`vlprune.models.LLAVA_SHAPES` key, e.g. ``llava:tiny``): built
      from the config with random weights (seeded by ``seed``, the same in every process),
      and :func:`offline_processor` with a vocabulary from the prompt template and the
      questions and answers of ``records`` (:class:`~vlprune.eval.vqa_data.VQARecord`), or
      the caption instruction and the reference captions
      (:class:`~vlprune.eval.vqa_data.CaptionRecord`).
    - anything else: a Hugging Face hub name or a local folder; the class comes from the
      config's architecture (LLaVA, LLaVA-NeXT, OneVision, NeXT-Video), the processor from
      ``AutoProcessor``.

    Raises RuntimeError (cannot load, with what to give instead) or ValueError (not a
    LLaVA-style model, unknown shape).
    """
    device = torch.device(device)
    if name.startswith("llava:"):
        from ..models import LLAVA_SHAPES, build_llava

        shape = name.partition(":")[2]
        if shape not in LLAVA_SHAPES:
            raise ValueError(f"unknown llava shape {shape!r} in {name!r}; known: "
                             f"{', '.join('llava:' + s for s in sorted(LLAVA_SHAPES))}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_llava(shape)
        processor = offline_processor(model.config, _words(_vocabulary_texts(records)))
        model = model.to(device=device, dtype=dtype).eval()
        return VLM(model, processor, "llava", name, "random")
    from ..models import VLM_BUILDERS, ModelBuildError, build_model

    if name.partition(":")[0] in VLM_BUILDERS:
        return _load_random(name, records, device, dtype, seed, build_model, ModelBuildError)
    model, processor = _load_pretrained(name, device, dtype)
    family = vlm_family(model)
    if family is None:
        raise ValueError(f"{name!r} loaded as {type(model).__name__}, which vlprune does not "
                         f"reduce; LLaVA-style models: {sorted(ARCHITECTURES)}")
    return VLM(model, processor, family, name, "pretrained")


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

class Prompter:
    """Question -> prompt text (one image placeholder, the question, the answer suffix).

    ``template`` (a ``str.format`` pattern with a ``{question}`` field and an ``<image>``
    placeholder) wins; else the processor's chat template when it has one (one user turn
    holding the image and the text, then the generation prompt); else
    :data:`PROMPT_TEMPLATES` of ``family``. ``suffix`` is appended to the question after a
    space (``""``: none). With ``needs_question=False`` (captioning, where the "question" is
    the fixed :data:`CAPTION_INSTRUCTION`) a given template may leave out ``{question}``.
    """

    def __init__(self, processor: Any, family: str = "llava", template: str | None = None,
                 suffix: str = ANSWER_SUFFIX, *, needs_question: bool = True) -> None:
        self.processor = processor
        self.suffix = suffix
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        if template is not None:
            if "<image>" not in template or (needs_question and "{question}" not in template):
                needed = "{question} and <image>" if needs_question else "<image>"
                raise ValueError(f"a prompt template needs {needed}, got {template!r}")
            self.kind, self.template = "given", template
        elif getattr(processor, "chat_template", None):
            self.kind, self.template = "chat template", None
        else:
            if family not in PROMPT_TEMPLATES:
                raise ValueError(f"no prompt template for family {family!r}; known: "
                                 f"{sorted(PROMPT_TEMPLATES)} (or give a template)")
            self.kind, self.template = f"{family} template", PROMPT_TEMPLATES[family]

    def text(self, question: str) -> str:
        """The question with the suffix."""
        return f"{question.strip()} {self.suffix}" if self.suffix else question.strip()

    def __call__(self, question: str) -> str:
        text = self.text(question)
        if self.template is None:
            conversation = [{"role": "user", "content": [{"type": "image"},
                                                         {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                      tokenize=False)
        prompt = self.template.replace("<image>", self.image_token)
        return prompt.replace("{question}", text)

    def describe(self) -> str:
        """The prompt of a question written ``{question}`` (stored with the results)."""
        saved, self.suffix = self.suffix, ""
        try:
            return self("{question}" + (f" {saved}" if saved else ""))
        finally:
            self.suffix = saved
