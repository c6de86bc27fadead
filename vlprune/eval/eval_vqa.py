"""``vlprune eval vqa``: a speed-accuracy sweep of visual-token reduction on a LLaVA-style model.

Two tasks: visual question answering (``task="vqa"``, :class:`VQAEval`, the default) and
captioning (``task="caption"``, :class:`CaptionEval`, described at the end). Both share the
generation loop, the cost columns and the file handling of :class:`GenerationEval`.

One model, one VQA set, many settings. The unpatched model answers every question first,
then each setting (``visual_keep`` / ``visual_score``, FastV's ``llm_layer`` / ``llm_keep``,
``text_keep``, tower merging, ...) answers the same questions with the same prompts. Per
setting the sweep records (columns of the CSV / JSON, see :data:`COLUMNS`):

``vqa_accuracy``, ``delta_accuracy``
    VQA accuracy in % (:func:`vlprune.eval.vqa_metric.score_predictions`: the official
    leave-one-out definition for 10 answers, exact match for one answer), and its difference
    to the unpatched row, in points.
``exact_match``
    % of questions whose normalised answer equals the most common normalised ground truth.
``agreement``
    % of questions answered the same as by the unpatched model (after the VQA answer
    normalisation; 100 for the unpatched row).
``visual_tokens``, ``visual_tokens_last``, ``llm_tokens``
    measured during a batch-1 prefill of the first readable question: the image placeholders
    of the prompt the model core receives (after any rewrite, not read from the config), the
    visual tokens left at the language model's last layer (fewer with ``llm_keep``), and the
    prompt length the language model receives.
``gflops_prefill``, ``flops_ratio``
    FLOPs of that batch-1 prefill (vision tower, token selection, projector, language model
    over the prompt), in GFLOPs per sample, and unpatched / this setting.
``prefill_ms``, ``speedup``
    median time per batch from the ``generate`` call to the end of its first forward (the time
    to the first token), and unpatched / this setting.
``decode_tok_s``
    generated tokens after each row's first (up to its end-of-sequence token) per second of
    decode time (the rest of the ``generate`` call), over all rows and processes.
``samples_per_s``
    questions per second of ``generate`` time (prefill + decode; image loading and
    preprocessing excluded).
``n``, ``skipped``
    questions evaluated, and questions skipped because their image is missing or unreadable.
``seconds``
    wall time of the setting's pass, image loading included (slowest process).
``predictions``
    the JSONL file holding this setting's answer to every question.

Prompts: a template with the question (and the LLaVA evaluation suffix
:data:`ANSWER_SUFFIX`), written by the processor's chat template when it has one, else by the
family's template (:data:`PROMPT_TEMPLATES`; LLaVA-1.5:
``"USER: <image>\\n{question} Answer the question using a single word or phrase.
ASSISTANT:"``), or given explicitly. Batches are left padded and answered by greedy
``generate(max_new_tokens=...)``; only the new tokens are decoded, then stripped.

Models: a Hugging Face hub name or a local folder (``AutoProcessor`` + the LLaVA class of its
config), or ``llava:<shape>`` (:data:`vlprune.cli.LLAVA_SHAPES`, random weights, no
download) with an offline processor built in code (:func:`offline_processor`): a word-level
tokenizer whose vocabulary comes from the questions and answers, and a CLIP image processor.

Under ``accelerate launch`` (or ``torchrun``) every process answers a strided shard of the
questions; the answers are gathered in the data's order (:mod:`vlprune.eval.distributed`), so
every number but the timings equals a single process's. Only the main process writes.

Questions whose image is missing or unreadable are skipped and counted (``skipped``), with a
warning naming a few (``skipped.jsonl`` in the predictions folder lists them all);
``strict=True`` refuses them instead, before the model is run.

Captioning (:func:`eval_captions`, ``--task caption``) runs the same sweep on a caption set
(:func:`vlprune.eval.vqa_data.load_captions`: COCO captions JSON or JSONL). The prompt holds
:data:`CAPTION_INSTRUCTION` instead of a question (LLaVA-1.5: ``"USER: <image>\\nProvide a
one-sentence caption for the provided image. ASSISTANT:"``), at most 30 new tokens by
default. Its columns (:data:`CAPTION_COLUMNS`) replace the VQA scores by ``cider``,
``delta_cider`` and ``bleu_1`` ... ``bleu_4`` (:func:`vlprune.eval.vqa_metric.caption_scores`:
``pycocoevalcap``'s CIDEr-D and BLEU scorers, x100), computed over the whole set on the main
process once every caption is gathered (CIDEr weighs n-grams by their document frequency over
all references, so it is a corpus score; computing it once over the gathered set makes any
number of processes give one process's numbers); ``agreement`` is the % of images captioned
exactly as by the unpatched model after caption tokenization
(:func:`vlprune.eval.vqa_metric.caption_tokenize`: lower case, punctuation dropped). The cost
columns are the same.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bench import BASELINE, Setting, _apply
from .distributed import DistContext, init_distributed
from .flops import count_flops
from .runner import (
    OutputPaths,
    PlotSpec,
    Sweep,
    UnreadableImagesError,
    atomic_write,
    output_paths,
    progress_bar,
    slug,
)
from .vlm_bench import _GenerateClock, _llm_lengths
from .vqa_data import (
    CAPTION_FORMATS,
    VQA_FORMATS,
    CaptionRecord,
    VQARecord,
    detect_caption_format,
    detect_format,
    load_captions,
    load_vqa,
)
from .vqa_metric import (
    ANSWER_PROCESSING,
    caption_scores,
    caption_tokenize,
    exact_match,
    normalize_answer,
    score_predictions,
    vqa_accuracy,
)

__all__ = [
    "ANSWER_SUFFIX",
    "ARCHITECTURES",
    "BatchOutput",
    "CAPTION_COLUMNS",
    "CAPTION_INSTRUCTION",
    "COLUMNS",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_VISUAL_KEEP",
    "PROMPT_TEMPLATES",
    "TASKS",
    "TIMING",
    "VLM",
    "CaptionEval",
    "GenerationEval",
    "Prompter",
    "Record",
    "UnreadableImagesError",
    "VQAEval",
    "add_vqa_arguments",
    "add_vqa_parser",
    "eval_captions",
    "eval_vqa",
    "load_vlm",
    "main",
    "offline_processor",
    "run_vqa",
    "unreadable_images",
]

#: the instruction LLaVA's VQAv2 / GQA evaluation appends to every question
ANSWER_SUFFIX = "Answer the question using a single word or phrase."

#: the text of a captioning prompt, in place of the question (the prompt of lmms-eval's COCO
#: caption tasks)
CAPTION_INSTRUCTION = "Provide a one-sentence caption for the provided image."

#: the values of ``--task``
TASKS = ("vqa", "caption")

#: ``max_new_tokens`` per task when none is given
DEFAULT_MAX_NEW_TOKENS = {"vqa": 16, "caption": 30}

#: a record of either task
Record = VQARecord | CaptionRecord

#: per-family prompts, used when the processor has no chat template (``{question}`` holds the
#: question and :data:`ANSWER_SUFFIX`, or :data:`CAPTION_INSTRUCTION`; ``<image>`` is replaced
#: by the processor's image token)
PROMPT_TEMPLATES = {
    "llava": "USER: <image>\n{question} ASSISTANT:",
    "llava_next": "USER: <image>\n{question} ASSISTANT:",
    "llava_next_video": "USER: <image>\n{question} ASSISTANT:",
    "llava_onevision": "<|im_start|>user <image>\n{question}<|im_end|><|im_start|>assistant\n",
}

#: the LLaVA classes a hub / local model may have (config architecture -> family)
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "LlavaNextVideoForConditionalGeneration": "llava_next_video",
}

#: the visual-token rows of ``vlprune eval vqa`` when no setting is given
DEFAULT_VISUAL_KEEP = [192, 128, 64]

#: how the timing columns are measured (stored with the results)
TIMING = ("generate calls only (image loading and preprocessing excluded), synchronized; "
          "prefill: from the generate call to the end of its first forward, decode: the rest "
          "of the call; the first batch of each process is untimed (warm-up) when the process "
          "has more than one batch; prefill_ms: median over the timed batches of all "
          "processes; decode_tok_s: generated tokens after each row's first (up to its "
          "end-of-sequence token), all processes / slowest process's decode seconds; "
          "samples_per_s: questions (or images) timed / slowest process's generate seconds")

# the cost columns, the same for both tasks
_COST_COLUMNS = ("visual_tokens", "visual_tokens_last", "llm_tokens", "gflops_prefill",
                 "flops_ratio", "prefill_ms", "speedup", "decode_tok_s", "samples_per_s", "n",
                 "skipped", "seconds", "predictions")

#: the leading columns of the CSV, in order
COLUMNS = ("setting", "method", "vqa_accuracy", "delta_accuracy", "exact_match", "agreement",
           *_COST_COLUMNS)

#: the leading columns of the CSV of the caption task, in order
CAPTION_COLUMNS = ("setting", "method", "cider", "delta_cider", "bleu_1", "bleu_2", "bleu_3",
                   "bleu_4", "agreement", *_COST_COLUMNS)

_COST_COMPARE = {
    "speedup": ("prefill_ms", "inverse"),
    "flops_ratio": ("gflops_prefill", "inverse"),
}
COMPARE = {"delta_accuracy": ("vqa_accuracy", "diff"), **_COST_COMPARE}
CAPTION_COMPARE = {"delta_cider": ("cider", "diff"), **_COST_COMPARE}

#: the special tokens of :func:`offline_processor` (pad, bos, eos, unk)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

_SHOWN_SKIPPED = 5
# what the offline tokenizer's pre-tokenizer (tokenizers' Whitespace) splits text into
_WORD = re.compile(r"\w+|[^\w\s]+")
# CLIP's normalisation (the LLaVA-1.5 image processor)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------
# Models and processors
# ---------------------------------------------------------------------------------------------

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
        from tokenizers import (
            AddedToken,
            Tokenizer,
            decoders,
            models,
            normalizers,
            pre_tokenizers,
            processors,
        )
        from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    except ImportError as e:
        raise RuntimeError("the offline processor needs transformers and tokenizers: "
                           "pip install 'vlprune[hf]'") from e
    from ..adapters.base import hf_image_input_size
    from ..adapters.llava import _vision_tokens

    tcfg, vcfg = config.text_config, config.vision_config
    size = int(tcfg.vocab_size)
    ids = {"<pad>": tcfg.pad_token_id, "<s>": tcfg.bos_token_id, "</s>": tcfg.eos_token_id,
           image_token: config.image_token_id}
    if any(v is None for v in ids.values()):
        raise ValueError(f"the offline tokenizer needs the config's pad, bos, eos and image "
                         f"token ids; got {ids}")
    if len(set(ids.values())) != len(ids) or max(ids.values()) >= size:
        raise ValueError(f"the config's special token ids {ids} must be distinct and below "
                         f"vocab_size={size}")
    taken = set(ids.values())
    free = (i for i in range(size) if i not in taken)
    vocab = dict(ids)
    vocab["<unk>"] = next(free)
    for word in words:
        if word in vocab:
            continue
        i = next(free, None)
        if i is None:
            break
        vocab[word] = i
    for i in free:
        vocab[f"<unused{i}>"] = i

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces
    bos = ids["<s>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (*SPECIAL_TOKENS, image_token)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", model_max_length=tcfg.max_position_embeddings,
    )
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
    expected = _vision_tokens(_ConfigView(config))
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


def load_vlm(name: str, *, records: Sequence[Record] = (), device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, seed: int = 0) -> VLM:
    """The model and processor to evaluate, in eval mode on ``device`` / ``dtype``.

    - ``llava:<shape>`` (a :data:`vlprune.cli.LLAVA_SHAPES` key, e.g. ``llava:tiny``): built
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
        from ..cli import LLAVA_SHAPES, build_llava

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
    model, processor = _load_pretrained(name, device, dtype)
    from ..adapters.llava import llava_family

    family = llava_family(model)
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


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def _open_image(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _check_header(path: Path) -> str | None:
    """Why ``path`` cannot be an image (missing, empty, not an image), or None."""
    from PIL import Image

    if not path.is_file():
        return "missing"
    try:
        with Image.open(path):
            pass
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def unreadable_images(records: Sequence[Record], ctx: DistContext | None = None, *,
                      progress: bool = False) -> dict[int, str]:
    """``{record index: reason}`` of the records (questions or images to caption) whose image
    is missing, empty or not an image (the header is read, the pixels are not: truncated files
    show up when decoded).

    Every process checks its shard (each distinct file once) and the results are gathered,
    so every process gets the same dict.
    """
    ctx = ctx or DistContext()
    mine = ctx.shard(len(records))
    seen: dict[Path, str | None] = {}
    bad: dict[int, str] = {}
    with progress_bar(len(mine), progress and ctx.is_main, "check images", "image") as bar:
        for i in mine:
            path = Path(records[i].image)
            if path not in seen:
                seen[path] = _check_header(path)
            if seen[path] is not None:
                bad[i] = seen[path]
            bar.update(1)
    out: dict[int, str] = {}
    for part in ctx.gather_object(bad):
        out.update(part)
    return dict(sorted(out.items()))


# per noun (what a record is): how a count of them with an unreadable image reads
_UNREADABLE_PHRASE = {"questions": "questions have an unreadable image",
                      "images": "images are unreadable"}
_SINGULAR = {"questions": "question", "images": "image"}


def _skipped_text(bad: Mapping[int, str], records: Sequence[Record],
                  noun: str = "questions") -> str:
    items = list(bad.items())
    shown = "; ".join(f"{Path(records[i].image).name} ({why})" for i, why in items[:_SHOWN_SKIPPED])
    more = f"; ... (+{len(items) - _SHOWN_SKIPPED} more)" if len(items) > _SHOWN_SKIPPED else ""
    return f"{len(items)} of {len(records)} {_UNREADABLE_PHRASE[noun]}: {shown}{more}"


def _report_unreadable(new: Mapping[int, str], bad: Mapping[int, str],
                       records: Sequence[Record], *, strict: bool, ctx: DistContext,
                       noun: str = "questions") -> None:
    """Raise (``strict``, or nothing left) or warn about the ``new`` unreadable images;
    ``noun`` says what a record is (``questions`` or ``images``)."""
    if not new:
        return
    text = _skipped_text(new, records, noun)
    if strict:
        raise UnreadableImagesError(f"{text} (without --strict these {noun} are skipped "
                                    "and counted)")
    if len(bad) >= len(records):
        raise UnreadableImagesError(f"no {_SINGULAR[noun]} has a readable image: {text}")
    if ctx.is_main:
        warnings.warn(f"{text}; they are skipped and counted in the 'skipped' column",
                      stacklevel=3)


# ---------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------

@dataclass
class BatchOutput:
    """What one batch gives: the answers, in the batch's order, and its timing (ms).

    ``decode_ms`` is None when generation stopped at the first token for every row;
    ``decode_tokens`` counts the tokens each row generated after its first, up to its
    end-of-sequence token.
    """

    answers: list[str]
    prefill_ms: float
    decode_ms: float | None
    decode_tokens: int


@dataclass
class _Costs:
    gflops: float
    visual: int
    llm_in: int
    llm_out: int


class GenerationEval(ABC):
    """The per-setting evaluation of one LLaVA-style model on one set, in this process: the
    generation loop and the cost columns, shared by :class:`VQAEval` and :class:`CaptionEval`.

    Call :meth:`prepare` (finds the unreadable images, unless ``unreadable`` is given) and
    :meth:`costs` once with all settings (validates them; FLOPs and visual tokens), then call
    the object with a :class:`~vlprune.eval.bench.Setting` for its metrics, the unpatched
    setting first (the reference of ``agreement``). With ``predictions`` (a folder) the main
    process writes every setting's outputs there as JSONL (``NN_<setting>.jsonl``, one line
    per evaluated record in data order: ``index``, the fields of :meth:`prediction_fields`,
    ``agrees`` (same normalised output as unpatched)) and ``skipped.jsonl``.

    A task subclass sets :attr:`task`, :attr:`noun` and :attr:`id_field` and implements
    :meth:`default_prompter`, :meth:`prompt`, :meth:`normalize`, :meth:`score` and
    :meth:`prediction_fields`.
    """

    #: the task's name (a :data:`TASKS` value)
    task = ""
    #: what a record is, in messages and counts (``questions`` or ``images``)
    noun = "questions"
    #: the record attribute that names it in ``skipped.jsonl`` and the predictions
    id_field = "question_id"

    def __init__(self, model: nn.Module, processor: Any, records: Sequence[Record], *,
                 ctx: DistContext | None = None, batch_size: int = 8, max_new_tokens: int = 16,
                 prompter: Prompter | None = None, strict: bool = False, progress: bool = True,
                 predictions: str | os.PathLike | None = None,
                 unreadable: Mapping[int, str] | None = None) -> None:
        from ..adapters.llava import llava_family

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not records:
            raise ValueError(f"no {self.noun} to evaluate")
        family = llava_family(model)
        if family is None:
            raise ValueError(f"{type(model).__name__} is not a LLaVA-style model; supported: "
                             f"{sorted(ARCHITECTURES)}")
        self.model = model.eval()
        self.processor = processor
        self.records = list(records)
        self.ctx = ctx or DistContext()
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.prompter = prompter or self.default_prompter(processor, family)
        self.strict = strict
        self.progress = progress and self.ctx.is_main
        self.predictions = None if predictions is None else Path(predictions)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.indices = self.ctx.shard(len(self.records))
        self.bad: dict[int, str] | None = None if unreadable is None else dict(unreadable)
        self.reference: dict[int, str] | None = None
        self._costs: dict[str, _Costs] = {}
        self._row = 0

        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"  # generation continues every row at the same column
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = model.config.get_text_config().pad_token_id
        self.pad_id = 0 if pad is None else int(pad)
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = sorted(set(eos))
        self.gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=self.pad_id)

    # -- the task -------------------------------------------------------------------------

    @abstractmethod
    def default_prompter(self, processor: Any, family: str) -> Prompter:
        """The prompter used when none is given."""

    @abstractmethod
    def prompt(self, record: Record) -> str:
        """The prompt text of one record."""

    @abstractmethod
    def normalize(self, text: str) -> str:
        """The form in which two outputs are compared for ``agreement``."""

    @abstractmethod
    def score(self, index: Sequence[int], preds: Sequence[str]) -> dict[str, Any]:
        """The task's scores of the outputs ``preds`` of the records ``index`` (all of them,
        gathered), with ``n``; called on the main process only."""

    @abstractmethod
    def prediction_fields(self, record: Record, pred: str) -> dict[str, Any]:
        """The fields of one line of a predictions file (after ``index``, before
        ``agrees``)."""

    def prompt_description(self) -> str:
        """The prompt as stored with the results."""
        return self.prompter.describe()

    # -- setup --------------------------------------------------------------------------

    def prepare(self) -> None:
        """Find the records whose image is missing or unreadable (all processes) and
        report them: an error with ``strict`` (or when no record is left), else a warning."""
        if self.bad is None:
            self.bad = unreadable_images(self.records, self.ctx, progress=self.progress)
            _report_unreadable(self.bad, self.bad, self.records, strict=self.strict,
                               ctx=self.ctx, noun=self.noun)
        self._write_skipped()

    def inputs(self, records: Sequence[Record], images: Sequence[Any]) -> dict[str, Any]:
        """Processor outputs of a batch (left padded), on the model's device and dtype."""
        prompts = [self.prompt(r) for r in records]
        enc = self.processor(images=list(images), text=prompts, return_tensors="pt",
                             padding=True)
        out = {}
        for k, v in enc.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, self.dtype if v.is_floating_point() else None)
            out[k] = v
        return out

    def _example(self) -> dict[str, Any]:
        """Batch-1 inputs of the first record with a readable image (same in every process)."""
        for i, r in enumerate(self.records):
            if self.bad and i in self.bad:
                continue
            try:
                image = _open_image(Path(r.image))
            except Exception:
                continue
            return self.inputs([r], [image])
        raise UnreadableImagesError(f"no {_SINGULAR[self.noun]} has a readable image")

    def costs(self, settings: Sequence[Setting]) -> dict[str, _Costs]:
        """Prefill FLOPs, visual tokens reaching the LLM (and its last layer) and the LLM's
        prompt length of the unpatched model and of every setting, from one batch-1 prefill
        each (a ``generate`` of one token). Patching every setting here also validates them
        before the long evaluation starts. Leaves the model unpatched."""
        x1 = self._example()
        kw = dict(self.gen_kwargs, max_new_tokens=1)
        out: dict[str, _Costs] = {}
        try:
            with torch.inference_mode():
                for s in [Setting(BASELINE, None), *settings]:
                    if s.label in out:
                        continue
                    try:
                        _apply(self.model, s)
                    except (ValueError, TypeError) as e:
                        raise type(e)(f"setting {s.label!r}: {e}") from e
                    visual, llm_in, llm_out, flops = _llm_lengths(
                        self.model,
                        lambda: count_flops(lambda: self.model.generate(**x1, **kw)),
                    )
                    out[s.label] = _Costs(flops / 1e9, visual, llm_in, llm_out)
        finally:
            _apply(self.model, Setting(BASELINE, None))
        self._costs.update(out)
        return out

    # -- one batch ----------------------------------------------------------------------

    def _run_batch(self, records: Sequence[Record], images: Sequence[Any],
                   clock: _GenerateClock) -> BatchOutput:
        """Generate for one batch with greedy ``generate``, timed by ``clock``."""
        x = self.inputs(records, images)
        got: list[torch.Tensor] = []
        pre, rest, calls = clock.time(lambda: got.append(self.model.generate(**x, **self.gen_kwargs)))
        out = got[0]
        seq = out if isinstance(out, torch.Tensor) else out.sequences
        new = seq[:, x["input_ids"].shape[1]:].cpu()
        answers = [a.strip() for a in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        tokens = 0
        for row in new.tolist():
            ends = [j for j, t in enumerate(row) if t in self.eos_ids]
            tokens += max((ends[0] + 1 if ends else len(row)) - 1, 0)
        return BatchOutput(answers, pre, rest if calls > 1 else None, tokens)

    # -- one setting ----------------------------------------------------------------------

    def __call__(self, setting: Setting) -> dict[str, Any]:
        """Metrics of ``setting`` over all the records (all processes)."""
        if self.bad is None:
            self.prepare()
        if setting.label not in self._costs:
            self.costs([setting])
        bad = self.bad or {}
        todo = [i for i in self.indices if i not in bad]
        chunks = [todo[j:j + self.batch_size] for j in range(0, len(todo), self.batch_size)]
        answers: list[tuple[int, str]] = []
        failed: dict[int, str] = {}
        prefill: list[float] = []
        decode_ms = gen_ms = 0.0
        decode_tokens = timed_n = 0
        start = time.perf_counter()
        _apply(self.model, setting)
        try:
            with torch.inference_mode(), _GenerateClock(self.model, self.device) as clock, \
                    progress_bar(len(chunks), self.progress, f"{self.task} {setting.label}") as bar:
                for b, chunk in enumerate(chunks):
                    recs, images, idx = [], [], []
                    for i in chunk:
                        try:
                            images.append(_open_image(Path(self.records[i].image)))
                        except Exception as e:
                            failed[i] = f"{type(e).__name__}: {e}"
                            continue
                        recs.append(self.records[i])
                        idx.append(i)
                    if recs:
                        res = self._run_batch(recs, images, clock)
                        if len(res.answers) != len(recs):
                            raise RuntimeError(f"{len(res.answers)} outputs for a batch of "
                                               f"{len(recs)} {self.noun}")
                        answers += zip(idx, res.answers)
                        if b > 0 or len(chunks) == 1:
                            prefill.append(res.prefill_ms)
                            gen_ms += res.prefill_ms + (res.decode_ms or 0.0)
                            timed_n += len(recs)
                            if res.decode_ms is not None:
                                decode_ms += res.decode_ms
                                decode_tokens += res.decode_tokens
                    bar.update(1)
        finally:
            _apply(self.model, Setting(BASELINE, None))
        seconds = time.perf_counter() - start

        parts = self.ctx.gather_object({
            "answers": answers, "failed": failed, "prefill": prefill, "decode_ms": decode_ms,
            "decode_tokens": decode_tokens, "gen_ms": gen_ms, "timed_n": timed_n,
            "seconds": seconds,
        })
        new_bad = {i: why for p in parts for i, why in p["failed"].items() if i not in bad}
        if new_bad:
            bad.update(new_bad)
            self.bad = dict(sorted(bad.items()))
            self._write_skipped()
            _report_unreadable(dict(sorted(new_bad.items())), self.bad, self.records,
                               strict=self.strict, ctx=self.ctx, noun=self.noun)
        got = sorted(a for p in parts for a in p["answers"])
        if not got:
            raise UnreadableImagesError(f"no {_SINGULAR[self.noun]} was evaluated")
        index = [i for i, _ in got]
        preds = [a for _, a in got]
        # every process holds every output now; the task's scores (corpus-level for CIDEr)
        # are computed once, on the main process, and shared
        scores = self.score(index, preds) if self.ctx.is_main else None
        if self.ctx.distributed:
            scores = self.ctx.gather_object(scores)[0]
        norm = [self.normalize(p) for p in preds]
        if setting.config is None:
            self.reference = dict(zip(index, norm))
        agrees: list[bool | None] = [None] * len(index)
        agreement = None
        if self.reference is not None:
            agrees = [self.reference.get(i) == a if i in self.reference else None
                      for i, a in zip(index, norm)]
            common = [a for a in agrees if a is not None]
            agreement = 100.0 * sum(common) / len(common) if common else None
        path = self._write_predictions(setting, index, preds, agrees)

        prefill_all = [t for p in parts for t in p["prefill"]]
        slow_decode = max(p["decode_ms"] for p in parts)
        slow_gen = max(p["gen_ms"] for p in parts)
        tokens = sum(p["decode_tokens"] for p in parts)
        costs = self._costs[setting.label]
        return {
            **{k: v for k, v in scores.items() if k != "n"},
            "agreement": agreement,
            "visual_tokens": costs.visual,
            # llm_keep drops visual tokens only
            "visual_tokens_last": costs.visual - (costs.llm_in - costs.llm_out),
            "llm_tokens": costs.llm_in,
            "gflops_prefill": costs.gflops,
            "prefill_ms": statistics.median(prefill_all) if prefill_all else None,
            "decode_tok_s": tokens / slow_decode * 1e3 if slow_decode > 0 and tokens else None,
            "samples_per_s": (sum(p["timed_n"] for p in parts) / slow_gen * 1e3
                              if slow_gen > 0 else None),
            "n": len(index),
            "skipped": len(self.records) - len(index),
            "seconds": max(p["seconds"] for p in parts),
            "predictions": None if path is None else str(path),
        }

    # -- files ----------------------------------------------------------------------------

    def _write_predictions(self, setting: Setting, index: list[int], preds: list[str],
                           agrees: list[bool | None]) -> Path | None:
        row, self._row = self._row, self._row + 1
        if self.predictions is None:
            return None
        path = self.predictions / f"{row:02d}_{slug(setting.label)}.jsonl"
        if not self.ctx.is_main:
            return path
        lines = [json.dumps({"index": i, **self.prediction_fields(self.records[i], pred),
                             "agrees": agree})
                 for i, pred, agree in zip(index, preds, agrees)]
        _write_lines(path, lines)
        return path

    def _write_skipped(self) -> None:
        if self.predictions is None or not self.ctx.is_main:
            return
        lines = [json.dumps({"index": i, self.id_field: getattr(self.records[i], self.id_field),
                             "image": str(self.records[i].image), "error": why})
                 for i, why in (self.bad or {}).items()]
        _write_lines(self.predictions / "skipped.jsonl", lines)


class VQAEval(GenerationEval):
    """Visual question answering: :class:`GenerationEval` on
    :class:`~vlprune.eval.vqa_data.VQARecord` questions.

    Columns: ``vqa_accuracy`` and ``exact_match`` (%, over the answered questions, with
    ``answer_processing`` for the ground truth), ``agreement`` after the VQA answer
    normalisation. Predictions lines: ``index``, ``question_id``, ``image``, ``question``,
    ``prediction``, ``answers``, ``accuracy`` (0-1), ``exact_match`` (0/1), ``agrees``.
    """

    task = "vqa"
    noun = "questions"
    id_field = "question_id"

    def __init__(self, model: nn.Module, processor: Any, records: Sequence[VQARecord], *,
                 answer_processing: str = "official", **kwargs: Any) -> None:
        if answer_processing not in ANSWER_PROCESSING:
            raise ValueError(f"answer_processing must be one of {list(ANSWER_PROCESSING)}, "
                             f"got {answer_processing!r}")
        _check_records(records, VQARecord, "VQAEval", "CaptionEval")
        self.answer_processing = answer_processing
        super().__init__(model, processor, records, **kwargs)

    def default_prompter(self, processor: Any, family: str) -> Prompter:
        return Prompter(processor, family)

    def prompt(self, record: VQARecord) -> str:
        return self.prompter(record.question)

    def normalize(self, text: str) -> str:
        return normalize_answer(text)

    def score(self, index: Sequence[int], preds: Sequence[str]) -> dict[str, Any]:
        truth = [self.records[i].answers for i in index]
        return score_predictions(preds, truth, answer_processing=self.answer_processing)

    def prediction_fields(self, record: VQARecord, pred: str) -> dict[str, Any]:
        return {
            "question_id": record.question_id, "image": str(record.image),
            "question": record.question, "prediction": pred, "answers": record.answers,
            "accuracy": vqa_accuracy(pred, record.answers,
                                     answer_processing=self.answer_processing),
            "exact_match": exact_match(pred, record.answers),
        }


class CaptionEval(GenerationEval):
    """Captioning: :class:`GenerationEval` on :class:`~vlprune.eval.vqa_data.CaptionRecord`
    images, prompted with :data:`CAPTION_INSTRUCTION`.

    Columns: ``cider`` and ``bleu_1`` ... ``bleu_4``
    (:func:`~vlprune.eval.vqa_metric.caption_scores`: pycocoevalcap's CIDEr-D and BLEU, x100,
    over the whole set of captioned images), ``agreement``: % of images whose caption has
    the same :func:`~vlprune.eval.vqa_metric.caption_tokenize` tokens as the unpatched
    model's. Predictions lines: ``index``, ``image_id``, ``image``, ``prediction``,
    ``captions`` (the references), ``agrees``. Needs ``pycocoevalcap`` (checked here, so a
    missing package stops the run before any caption is generated).
    """

    task = "caption"
    noun = "images"
    id_field = "image_id"

    def __init__(self, model: nn.Module, processor: Any, records: Sequence[CaptionRecord],
                 **kwargs: Any) -> None:
        _check_records(records, CaptionRecord, "CaptionEval", "VQAEval")
        _caption_scorers_available()
        super().__init__(model, processor, records, **kwargs)

    def default_prompter(self, processor: Any, family: str) -> Prompter:
        return Prompter(processor, family, suffix="", needs_question=False)

    def prompt(self, record: CaptionRecord) -> str:
        return self.prompter(CAPTION_INSTRUCTION)

    def prompt_description(self) -> str:
        return self.prompter(CAPTION_INSTRUCTION)

    def normalize(self, text: str) -> str:
        return " ".join(caption_tokenize(text))

    def score(self, index: Sequence[int], preds: Sequence[str]) -> dict[str, Any]:
        return caption_scores(preds, [self.records[i].captions for i in index])

    def prediction_fields(self, record: CaptionRecord, pred: str) -> dict[str, Any]:
        return {"image_id": record.image_id, "image": str(record.image), "prediction": pred,
                "captions": record.captions}


def _check_records(records: Sequence[Record], kind: type, name: str, other: str) -> None:
    for r in records:
        if not isinstance(r, kind):
            raise TypeError(f"{name} evaluates {kind.__name__} records, got a "
                            f"{type(r).__name__} ({other} takes those)")


def _caption_scorers_available() -> None:
    """Raise ImportError (naming the package) unless pycocoevalcap's scorers import."""
    from .vqa_metric import _coco_scorers

    _coco_scorers()


def _caption_metric_name() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("pycocoevalcap")
    except PackageNotFoundError:
        v = "?"
    return (f"pycocoevalcap {v}: Bleu(4) (closest reference length) and Cider (CIDEr-D, "
            "sigma 6), x100; tokens from vlprune's caption_tokenize (PTB rules, no Java)")


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    atomic_write(path, "".join(line + "\n" for line in lines))


def _fmt(row: Mapping[str, Any], key: str, fmt: str, unit: str = "") -> str:
    v = row.get(key)
    return "-" if v is None else f"{format(v, fmt)}{unit}"


def _row_line(row: Mapping[str, Any], task: str = "vqa") -> str:
    def f(key: str, fmt: str, unit: str = "") -> str:
        return _fmt(row, key, fmt, unit)

    if task == "caption":
        head = (f"CIDEr {f('cider', '.2f')} ({f('delta_cider', '+.2f')})  BLEU-4 "
                f"{f('bleu_4', '.2f')}")
    else:
        head = (f"VQA acc. {f('vqa_accuracy', '.2f')} ({f('delta_accuracy', '+.2f')})  EM "
                f"{f('exact_match', '.2f')}")
    return (f"{row['setting']}: {head}  agreement "
            f"{f('agreement', '.1f', '%')}  visual tokens {f('visual_tokens', 'd')}  "
            f"{f('gflops_prefill', '.2f')} GFLOPs  prefill {f('prefill_ms', '.1f')} ms  "
            f"decode {f('decode_tok_s', '.1f')} tok/s  n {row.get('n')}  "
            f"skipped {row.get('skipped', 0)}")


_COST_TABLE = (("agreement", "agree %", ".1f"), ("visual_tokens", "visual", "d"),
               ("visual_tokens_last", "last", "d"), ("gflops_prefill", "GFLOPs", ".2f"),
               ("flops_ratio", "FLOPs x", ".2f"), ("prefill_ms", "prefill ms", ".1f"),
               ("speedup", "speedup", ".2f"), ("decode_tok_s", "decode tok/s", ".1f"),
               ("n", "n", "d"), ("skipped", "skipped", "d"))
TABLE = (("setting", "setting", ""), ("vqa_accuracy", "VQA acc.", ".2f"),
         ("delta_accuracy", "delta", "+.2f"), ("exact_match", "EM", ".2f"), *_COST_TABLE)
CAPTION_TABLE = (("setting", "setting", ""), ("cider", "CIDEr", ".2f"),
                 ("delta_cider", "delta", "+.2f"), ("bleu_4", "BLEU-4", ".2f"), *_COST_TABLE)


def _sweep(runner: GenerationEval, settings: Sequence[Setting], *, paths: OutputPaths | None,
           meta: Mapping[str, Any] | None, methods: Mapping[str, str] | None, title: str,
           on_row: Callable[[dict[str, Any]], None] | None, task_meta: Mapping[str, Any],
           spec: PlotSpec, columns: Sequence[str], compare: Mapping[str, tuple[str, str]],
           kind: str) -> Sweep:
    """Prepare ``runner``, measure every setting's costs, then run the sweep."""
    ctx = runner.ctx
    runner.prepare()
    runner.costs(settings)
    full_meta = {**(meta or {}), "task": runner.task, runner.noun: len(runner.records),
                 "batch_size": runner.batch_size, "max_new_tokens": runner.max_new_tokens,
                 **task_meta, "prompt": runner.prompt_description(),
                 "prompt_source": runner.prompter.kind, "world_size": ctx.world_size,
                 "device": str(runner.device), "dtype": str(runner.dtype).replace("torch.", ""),
                 "threads": torch.get_num_threads(), "timing": TIMING}
    if runner.predictions is not None:
        full_meta["predictions_dir"] = str(runner.predictions)
    spec.title = title or str(full_meta.get("model", ""))
    sweep = Sweep(paths or OutputPaths(), meta=full_meta, plot=spec, compare=compare,
                  columns=columns, write=ctx.is_main, kind=kind)
    sweep.run(settings, runner, methods=methods, on_row=on_row)
    return sweep


def eval_vqa(model: nn.Module, processor: Any, records: Sequence[VQARecord],
             settings: Sequence[Setting], *, ctx: DistContext | None = None,
             paths: OutputPaths | None = None, meta: Mapping[str, Any] | None = None,
             methods: Mapping[str, str] | None = None, batch_size: int = 8,
             max_new_tokens: int = 16, answer_processing: str = "official",
             prompter: Prompter | None = None, strict: bool = False, progress: bool = True,
             predictions: str | os.PathLike | None = None,
             unreadable: Mapping[int, str] | None = None, title: str = "",
             on_row: Callable[[dict[str, Any]], None] | None = None) -> Sweep:
    """Answer ``records`` with the unpatched ``model`` and with every setting; returns the
    finished :class:`~vlprune.eval.runner.Sweep` (``.rows``), written to ``paths`` (and the
    answers to the ``predictions`` folder) after every row by the main process.

    ``model`` is a LLaVA-style model on its device and dtype (unpatched) and ``processor``
    its processor. Every setting is patched once before the run (configuration errors
    surface before any question is answered). The model is left unpatched.
    """
    runner = VQAEval(model, processor, records, ctx=ctx or DistContext(), batch_size=batch_size,
                     max_new_tokens=max_new_tokens, answer_processing=answer_processing,
                     prompter=prompter, strict=strict, progress=progress,
                     predictions=predictions, unreadable=unreadable)
    spec = PlotSpec(y="vqa_accuracy", ylabel="VQA accuracy (%)",
                    panels=(("gflops_prefill", "prefill GFLOPs / sample"),
                            ("prefill_ms", "prefill ms / batch")))
    return _sweep(runner, settings, paths=paths, meta=meta, methods=methods, title=title,
                  on_row=on_row, task_meta={"answer_processing": answer_processing},
                  spec=spec, columns=COLUMNS, compare=COMPARE, kind="eval_vqa")


def eval_captions(model: nn.Module, processor: Any, records: Sequence[CaptionRecord],
                  settings: Sequence[Setting], *, ctx: DistContext | None = None,
                  paths: OutputPaths | None = None, meta: Mapping[str, Any] | None = None,
                  methods: Mapping[str, str] | None = None, batch_size: int = 8,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS["caption"],
                  prompter: Prompter | None = None, strict: bool = False,
                  progress: bool = True, predictions: str | os.PathLike | None = None,
                  unreadable: Mapping[int, str] | None = None, title: str = "",
                  on_row: Callable[[dict[str, Any]], None] | None = None) -> Sweep:
    """Caption ``records`` with the unpatched ``model`` and with every setting; returns the
    finished :class:`~vlprune.eval.runner.Sweep` (``.rows``: CIDEr, BLEU-1..4, agreement and
    the cost columns, :data:`CAPTION_COLUMNS`), written to ``paths`` (and the captions to the
    ``predictions`` folder) after every row by the main process.

    As :func:`eval_vqa` otherwise; ``prompter`` defaults to the processor's chat template or
    the family's template holding :data:`CAPTION_INSTRUCTION`. Raises ImportError naming
    ``pycocoevalcap`` when it is not installed, before anything runs.
    """
    runner = CaptionEval(model, processor, records, ctx=ctx or DistContext(),
                         batch_size=batch_size, max_new_tokens=max_new_tokens,
                         prompter=prompter, strict=strict, progress=progress,
                         predictions=predictions, unreadable=unreadable)
    spec = PlotSpec(y="cider", ylabel="CIDEr",
                    panels=(("gflops_prefill", "prefill GFLOPs / sample"),
                            ("prefill_ms", "prefill ms / batch")))
    return _sweep(runner, settings, paths=paths, meta=meta, methods=methods, title=title,
                  on_row=on_row, task_meta={"caption_metric": _caption_metric_name()},
                  spec=spec, columns=CAPTION_COLUMNS, compare=CAPTION_COMPARE,
                  kind="eval_caption")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

DESCRIPTION = (
    "Visual question answering (--task vqa) or captioning (--task caption) with a LLaVA-style "
    "model, unpatched and with each reduction setting: VQA accuracy and exact match, or CIDEr "
    "and BLEU-1..4 (pycocoevalcap); agreement with the unpatched outputs, the visual "
    "tokens reaching the language model, prefill GFLOPs, prefill ms per batch and decode "
    "tokens/s; CSV, JSON, a speed-accuracy plot and every output as JSONL, rewritten after "
    "every setting. Runs under `accelerate launch` (records split across processes, "
    "results identical to one process)."
)

EPILOG = (
    "examples:\n"
    "  vlprune eval vqa --model llava:tiny --data questions.jsonl --visual-keep 64 "
    "--max-new-tokens 4\n"
    "  vlprune eval vqa --model llava-hf/llava-1.5-7b-hf --data "
    "v2_OpenEnded_mscoco_val2014_questions.json --annotations "
    "v2_mscoco_val2014_annotations.json --images val2014 --limit 1000 --visual-keep "
    "192,128,64 --setting \"name=fastv llm_layer=2 llm_keep=64\"\n"
    "  vlprune eval vqa --task caption --model llava-hf/llava-1.5-7b-hf --data "
    "annotations/captions_val2014.json --images val2014 --limit 500 --visual-keep 192,64\n"
    "  accelerate launch --num_processes 4 -m vlprune.cli eval vqa ..."
)


def add_vqa_arguments(parser: Any) -> None:
    """The options of ``vlprune eval vqa`` (data, model, settings, output groups)."""
    from ..cli import _add_reduction_args, _dtype, parse_keep_list, parse_named_setting

    g = parser.add_argument_group("data")
    g.add_argument("--task", choices=TASKS, default="vqa",
                   help="vqa: answer questions (VQA accuracy); caption: caption every image "
                   "(CIDEr, BLEU) (default: vqa)")
    g.add_argument("--data", required=True, metavar="PATH",
                   help="--task vqa: the questions, as a JSONL file (one {\"image\", "
                   "\"question\", \"answers\" or \"answer\"} object a line), a VQAv2 questions "
                   "JSON (with --annotations) or a GQA-style JSON {id: {imageId, question, "
                   "answer}}; --task caption: the reference captions, as a JSONL file (one "
                   "{\"image\", \"captions\" or \"caption\"[, \"id\"]} object a line) or a COCO "
                   "captions JSON {images: [{id, file_name}], annotations: [{image_id, "
                   "caption}]}")
    g.add_argument("--annotations", metavar="PATH", default=None,
                   help="VQAv2 annotations JSON (default: the one next to the questions file)")
    g.add_argument("--images", metavar="DIR", default=None,
                   help="image folder (VQAv2, GQA, COCO captions) or base of relative image "
                   "paths (JSONL); default: next to the data file (COCO captions_<split>.json: "
                   "the <split> folder next to it or next to its folder, when there is one)")
    g.add_argument("--format", choices=tuple(dict.fromkeys((*VQA_FORMATS, *CAPTION_FORMATS))),
                   default=None,
                   help="the data format: vqav2, gqa or jsonl (--task vqa); coco_captions or "
                   "jsonl (--task caption) (default: detected from the file)")
    g.add_argument("--image-pattern", metavar="PATTERN", default=None,
                   help="VQAv2 / GQA image file name, e.g. 'COCO_val2014_{image_id:012d}.jpg' "
                   "(default: read from the image folder)")
    g.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate the first N questions (or images) only")
    g.add_argument("--answer-processing", choices=("auto", *ANSWER_PROCESSING), default="auto",
                   help="how ground-truth answers are normalised: official (VQAv2's script: "
                   "punctuation only, and only when annotators disagree) or full (the "
                   "prediction's normalisation: lower case, number words, articles); auto: "
                   "official for VQAv2 files, full for JSONL and GQA (default: auto); "
                   "--task vqa only")
    g.add_argument("--strict", action="store_true",
                   help="fail on a missing or unreadable image (default: skip its questions "
                   "and count them in the 'skipped' column)")

    m = parser.add_argument_group("model")
    m.add_argument("--model", "-m", default="llava:tiny", metavar="NAME",
                   help="a Hugging Face LLaVA model (e.g. llava-hf/llava-1.5-7b-hf, "
                   "llava-hf/llava-v1.6-mistral-7b-hf) or a local folder with its weights and "
                   "processor; llava:<shape> (tiny, 1.5-7b) builds one with random weights and "
                   "an offline processor (default: llava:tiny)")
    m.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights of llava:<shape> (default: 0)")
    m.add_argument("--prompt", metavar="TEMPLATE", default=None,
                   help="prompt template with {question} and <image>, e.g. "
                   "'USER: <image>\\n{question} ASSISTANT:'; with --task caption {question} "
                   f"is optional and holds {CAPTION_INSTRUCTION!r} (default: the processor's "
                   "chat template, else the family's LLaVA template)")
    m.add_argument("--no-suffix", action="store_true",
                   help=f"do not append {ANSWER_SUFFIX!r} to the questions (--task vqa)")
    m.add_argument("--batch-size", "-b", type=int, default=8, metavar="N",
                   help="questions (or images) per generate call (default: 8)")
    m.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="tokens generated per answer or caption at most (default: "
                   f"{DEFAULT_MAX_NEW_TOKENS['vqa']} for vqa, {DEFAULT_MAX_NEW_TOKENS['caption']} "
                   "for caption)")
    m.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda when available; under a "
                   "launcher each process takes its own GPU)")
    m.add_argument("--dtype", type=_dtype, default=None,
                   help="float32, float16, bfloat16 (default: float16 on CUDA, else float32)")
    m.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads per process (default: torch's)")

    r = parser.add_argument_group("settings (the unpatched model is always evaluated first)")
    r.add_argument("--visual-keep", type=parse_keep_list, default=None,
                   help="visual tokens kept per image (one row each), counts or ratios, e.g. "
                   f"576,192,64 (default when no setting is given: "
                   f"{','.join(map(str, DEFAULT_VISUAL_KEEP))})")
    r.add_argument("--visual-score", default="cls_attn",
                   help="how visual tokens are ranked: cls_attn, dominant_contextual, text, "
                   "diversity, random, pool (default: cls_attn)")
    _add_reduction_args(r, many=True, visual=False, setting=False)
    r.add_argument("--setting", action="append", type=parse_named_setting, default=[],
                   metavar='"[name=NAME] KEY=VALUE ..."',
                   help="one more row from ReductionConfig fields, e.g. "
                   '"name=fastv llm_layer=2 llm_keep=64" or "visual_keep=64 text_keep=0.7"; '
                   "rows with the same name form one curve in the plot; repeatable")

    o = parser.add_argument_group("output")
    o.add_argument("--output", "--out", "-o", metavar="PREFIX", default=None,
                   help="write PREFIX.csv, PREFIX.json, PREFIX.png and the answers in "
                   "PREFIX.predictions/ (default: results/eval_vqa_<model>, "
                   "results/eval_caption_<model> for --task caption)")
    o.add_argument("--csv", metavar="PATH", default=None, help="CSV path (overrides --output)")
    o.add_argument("--json", metavar="PATH", default=None, help="JSON path (overrides --output)")
    o.add_argument("--plot", metavar="PATH", default=None, help="PNG path (overrides --output)")
    o.add_argument("--predictions", metavar="DIR", default=None,
                   help="folder of the per-question answers (per-image captions), one JSONL "
                   "per setting (overrides --output)")
    o.add_argument("--no-plot", action="store_true", help="no PNG")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_vqa_parser(subparsers: Any) -> Any:
    """Add the ``vqa`` command to an ``eval`` subparsers object; returns its parser."""
    import argparse
    import textwrap

    v = subparsers.add_parser(
        "vqa", help="VQA accuracy (or captioning CIDEr / BLEU), agreement, visual tokens, "
        "prefill GFLOPs / ms and decode tok/s per setting of a LLaVA-style model",
        description=textwrap.fill(DESCRIPTION, 88), epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_vqa_arguments(v)
    v.set_defaults(func=run_vqa)
    return v


def _settings(args: Any) -> tuple[list[Setting], dict[str, str]]:
    from ..cli import eval_settings_from_args

    settings, methods = eval_settings_from_args(args, default_merge=[])
    if not settings:
        settings = [Setting.of(visual_keep=k, visual_score="cls_attn")
                    for k in DEFAULT_VISUAL_KEEP]
    return settings, methods


def _modelslug(name: str) -> str:
    return slug(Path(name).name if Path(name).is_dir() else name)


def _check_task_options(args: Any) -> None:
    """Refuse options of the other task (named, with what the task takes instead)."""
    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {list(TASKS)}, got {args.task!r}")
    if args.task == "vqa":
        if args.format is not None and args.format not in VQA_FORMATS:
            raise ValueError(f"--format {args.format} is a caption format; --task vqa takes "
                             f"{', '.join(VQA_FORMATS)} (or --task caption)")
        return
    if args.format is not None and args.format not in CAPTION_FORMATS:
        raise ValueError(f"--format {args.format} is a VQA format; --task caption takes "
                         f"{', '.join(CAPTION_FORMATS)}")
    given = [flag for flag, on in (
        ("--annotations", args.annotations is not None),
        ("--image-pattern", args.image_pattern is not None),
        ("--answer-processing", args.answer_processing != "auto"),
        ("--no-suffix", args.no_suffix),
    ) if on]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(f"{', '.join(given)} {verb} only to --task vqa; --task caption reads "
                         "image names and captions from --data (a COCO captions JSON or a "
                         "JSONL file) and --images")


def _load_records(args: Any) -> tuple[list[Record], str]:
    """The task's records and the data format (SystemExit for a missing file)."""
    try:
        if args.task == "caption":
            fmt = args.format or detect_caption_format(args.data)
            return load_captions(args.data, args.images, format=fmt, limit=args.limit), fmt
        fmt = args.format or detect_format(args.data)
        records = load_vqa(args.data, args.images, annotations=args.annotations, format=fmt,
                           image_pattern=args.image_pattern, limit=args.limit)
        return records, fmt
    except FileNotFoundError as e:
        raise SystemExit(f"vlprune: error: {e}") from e


def run_vqa(args: Any) -> int:
    """``vlprune eval vqa`` after argument parsing (see :func:`add_vqa_arguments`)."""
    for name in ("batch_size", "limit", "max_new_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    _check_task_options(args)
    caption = args.task == "caption"
    noun = "images" if caption else "questions"
    if caption:
        try:
            _caption_scorers_available()
        except ImportError as e:
            raise SystemExit(f"vlprune: error: {e}") from e
    max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[args.task]
    settings, methods = _settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    records, fmt = _load_records(args)
    if not records:
        raise SystemExit(f"vlprune: error: no {noun} in {args.data}")
    progress = not args.no_progress
    # before the model is loaded: a --strict run with a missing image stops here
    bad = unreadable_images(records, ctx, progress=progress)
    _report_unreadable(bad, bad, records, strict=args.strict, ctx=ctx, noun=noun)

    dtype = args.dtype or (torch.float16 if ctx.device.type == "cuda" else torch.float32)
    try:
        vlm = load_vlm(args.model, records=records, device=ctx.device, dtype=dtype,
                       seed=args.seed)
    except RuntimeError as e:
        raise SystemExit(f"vlprune: error: {e}") from e
    if vlm.weights == "random" and ctx.is_main:
        outputs = "captions" if caption else "answers"
        warnings.warn(f"{args.model} has random weights: its {outputs} are noise (use it to "
                      "check the pipeline and the speed, not the accuracy)", stacklevel=1)
    if caption:
        prompter = Prompter(vlm.processor, vlm.family, args.prompt, suffix="",
                            needs_question=False)
    else:
        prompter = Prompter(vlm.processor, vlm.family, args.prompt,
                            suffix="" if args.no_suffix else ANSWER_SUFFIX)

    kind = "eval_caption" if caption else "eval_vqa"
    prefix = args.output or f"results/{kind}_{_modelslug(args.model)}"
    paths = output_paths(prefix, csv=args.csv, json=args.json, plot=args.plot)
    if args.no_plot:
        paths.plot = None
    predictions = Path(args.predictions or f"{prefix}.predictions")
    meta = {
        "model": args.model, "family": vlm.family, "weights": vlm.weights,
        "seed": args.seed if vlm.weights == "random" else None,
        "data": str(args.data), "format": fmt,
        "annotations": None if args.annotations is None else str(args.annotations),
        "image_folder": None if args.images is None else str(args.images),
        "limit": args.limit,
    }
    where = f"{ctx.world_size} processes" if ctx.distributed else "1 process"
    title = (f"{args.model} on {Path(str(args.data)).name}: {len(records)} {noun}; "
             f"{ctx.device.type} {str(dtype).replace('torch.', '')}, {where}")

    def show(row: dict[str, Any]) -> None:
        if ctx.is_main:
            print(_row_line(row, args.task), flush=True)

    common = dict(ctx=ctx, paths=paths, meta=meta, methods=methods, batch_size=args.batch_size,
                  max_new_tokens=max_new_tokens, prompter=prompter, strict=args.strict,
                  progress=progress, predictions=predictions, unreadable=bad, title=title,
                  on_row=show)
    if caption:
        sweep = eval_captions(vlm.model, vlm.processor, records, settings, **common)
        table, keys = CAPTION_TABLE, ("cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4")
    else:
        processing = args.answer_processing
        if processing == "auto":
            processing = "official" if fmt == "vqav2" else "full"
        sweep = eval_vqa(vlm.model, vlm.processor, records, settings,
                         answer_processing=processing, **common)
        table, keys = TABLE, ("vqa_accuracy", "exact_match")
    if ctx.is_main:
        print(sweep.table(table))
        written = [str(p) for p in (paths.csv, paths.json, paths.plot) if p is not None]
        print(f"wrote {', '.join(written)} and {predictions}/", file=sys.stderr)
        print("--result")
        print(json.dumps({
            "model": args.model,
            "task": args.task,
            noun: len(records),
            "rows": {
                r["setting"]: {k: (round(r[k], 4) if isinstance(r[k], float) else r[k])
                               for k in (*keys, "agreement", "visual_tokens",
                                         "gflops_prefill", "prefill_ms", "decode_tok_s", "n",
                                         "skipped")}
                for r in sweep.rows
            },
        }))
    ctx.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlprune.eval.eval_vqa ARGS``: the same as ``vlprune eval vqa ARGS``."""
    import argparse

    parser = argparse.ArgumentParser(prog="vlprune eval vqa", description=DESCRIPTION,
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_vqa_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_vqa(args)
    except ValueError as e:  # configuration errors: one line, no traceback
        print(f"vlprune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
