"""The caption task (``vlprune eval vqa --task caption``): the sweep of
:mod:`vlprune.eval.generation` on a caption set (:func:`vlprune.eval.vqa_data.load_captions`:
COCO captions JSON or JSONL; :func:`eval_captions`, :class:`CaptionEval`).

The prompt holds :data:`~vlprune.eval.vlm.CAPTION_INSTRUCTION` instead of a question
(LLaVA-1.5: ``"USER: <image>\\nProvide a one-sentence caption for the provided image.
ASSISTANT:"``), at most 30 new tokens by default. Its columns (:data:`CAPTION_COLUMNS`)
replace the VQA scores by ``cider``, ``delta_cider`` and ``bleu_1`` ... ``bleu_4``
(:func:`vlprune.eval.vqa_metric.caption_scores`: ``pycocoevalcap``'s CIDEr-D and BLEU
scorers, x100), computed over the whole set on the main process once every caption is
gathered (CIDEr weighs n-grams by their document frequency over all references, so it is a
corpus score; computing it once over the gathered set makes any number of processes give one
process's numbers); ``agreement`` is the % of images captioned exactly as by the unpatched
model after caption tokenization (:func:`vlprune.eval.vqa_metric.caption_tokenize`: lower
case, punctuation dropped). The cost columns are the same as VQA's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from .distributed import DistContext
from .generation import (
    COST_COLUMNS,
    COST_COMPARE,
    DEFAULT_MAX_NEW_TOKENS,
    GenerationEval,
    check_records,
    run_sweep,
)
from .sweep import OutputPaths, Setting, Sweep
from .vlm import CAPTION_INSTRUCTION, Prompter
from .vqa_data import CaptionRecord
from .vqa_metric import caption_scores, caption_tokenize, coco_scorers

__all__ = [
    "CAPTION_COLUMNS",
    "CAPTION_COMPARE",
    "CaptionEval",
    "caption_metric_name",
    "caption_scorers_available",
    "eval_captions",
]

#: the leading columns of the CSV of the caption task, in order
CAPTION_COLUMNS = ("setting", "method", "cider", "delta_cider", "bleu_1", "bleu_2", "bleu_3",
                   "bleu_4", "agreement", *COST_COLUMNS)


CAPTION_COMPARE = {"delta_cider": ("cider", "diff"), **COST_COMPARE}



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
    columns = CAPTION_COLUMNS
    compare = CAPTION_COMPARE
    kind = "eval_caption"
    metric = ("cider", "CIDEr")

    def __init__(self, model: nn.Module, processor: Any, records: Sequence[CaptionRecord],
                 **kwargs: Any) -> None:
        check_records(records, CaptionRecord, "CaptionEval", "VQAEval")
        caption_scorers_available()
        super().__init__(model, processor, records, **kwargs)

    def default_prompter(self, processor: Any, family: str) -> Prompter:
        return Prompter(processor, family, suffix="", needs_question=False)

    def prompt(self, record: CaptionRecord) -> str:
        return self.prompter(CAPTION_INSTRUCTION)

    def prompt_description(self) -> str:
        return self.prompter(CAPTION_INSTRUCTION)

    def normalize(self, text: str) -> str:
        return " ".join(caption_tokenize(text))

    def task_meta(self) -> dict[str, Any]:
        return {"caption_metric": caption_metric_name()}

    def score(self, index: Sequence[int], preds: Sequence[str]) -> dict[str, Any]:
        return caption_scores(preds, [self.records[i].captions for i in index])

    def prediction_fields(self, record: CaptionRecord, pred: str) -> dict[str, Any]:
        return {"image_id": record.image_id, "image": str(record.image), "prediction": pred,
                "captions": record.captions}


def caption_scorers_available() -> None:
    """Raise ImportError (naming the package) unless pycocoevalcap's scorers import."""
    coco_scorers()


def caption_metric_name() -> str:
    """The caption scorers as stored with the results (package version and settings)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("pycocoevalcap")
    except PackageNotFoundError:
        v = "?"
    return (f"pycocoevalcap {v}: Bleu(4) (closest reference length) and Cider (CIDEr-D, "
            "sigma 6), x100; tokens from vlprune's caption_tokenize (PTB rules, no Java)")


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
    finished :class:`~vlprune.eval.sweep.Sweep` (``.rows``: CIDEr, BLEU-1..4, agreement and
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
    return run_sweep(runner, settings, paths=paths, meta=meta, methods=methods, title=title,
                     on_row=on_row)
