"""The VQA task (``vlprune eval vqa``, the default ``--task vqa``): a speed-accuracy sweep of
visual-token reduction on a LLaVA-style model answering a question set
(:func:`eval_vqa`, :class:`VQAEval`; the loop and the cost columns are
:class:`vlprune.eval.generation.GenerationEval`'s).

Per setting the sweep records (columns of the CSV / JSON, see :data:`COLUMNS`), besides the
cost columns of :mod:`vlprune.eval.generation`:

``vqa_accuracy``, ``delta_accuracy``
    VQA accuracy in % (:func:`vlprune.eval.vqa_metric.score_predictions`: the official
    leave-one-out definition for 10 answers, exact match for one answer), and its difference
    to the unpatched row, in points.
``exact_match``
    % of questions whose normalised answer equals the most common normalised ground truth.
``agreement``
    % of questions answered the same as by the unpatched model (after the VQA answer
    normalisation; 100 for the unpatched row).

Prompts: the question with :data:`~vlprune.eval.vlm.ANSWER_SUFFIX`
(:class:`~vlprune.eval.vlm.Prompter`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from .distributed import DistContext
from .generation import COST_COLUMNS, COST_COMPARE, GenerationEval, check_records, run_sweep
from .sweep import OutputPaths, Setting, Sweep
from .vlm import Prompter
from .vqa_data import VQARecord
from .vqa_metric import (
    ANSWER_PROCESSING,
    exact_match,
    normalize_answer,
    score_predictions,
    vqa_accuracy,
)

__all__ = ["COLUMNS", "COMPARE", "VQAEval", "eval_vqa"]

#: the leading columns of the CSV, in order
COLUMNS = ("setting", "method", "vqa_accuracy", "delta_accuracy", "exact_match", "agreement",
           *COST_COLUMNS)


COMPARE = {"delta_accuracy": ("vqa_accuracy", "diff"), **COST_COMPARE}


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
    columns = COLUMNS
    compare = COMPARE
    kind = "eval_vqa"
    metric = ("vqa_accuracy", "VQA accuracy (%)")

    def __init__(self, model: nn.Module, processor: Any, records: Sequence[VQARecord], *,
                 answer_processing: str = "official", **kwargs: Any) -> None:
        if answer_processing not in ANSWER_PROCESSING:
            raise ValueError(f"answer_processing must be one of {list(ANSWER_PROCESSING)}, "
                             f"got {answer_processing!r}")
        check_records(records, VQARecord, "VQAEval", "CaptionEval")
        self.answer_processing = answer_processing
        super().__init__(model, processor, records, **kwargs)

    def default_prompter(self, processor: Any, family: str) -> Prompter:
        return Prompter(processor, family)

    def prompt(self, record: VQARecord) -> str:
        return self.prompter(record.question)

    def normalize(self, text: str) -> str:
        return normalize_answer(text)

    def task_meta(self) -> dict[str, Any]:
        return {"answer_processing": self.answer_processing}

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
    finished :class:`~vlprune.eval.sweep.Sweep` (``.rows``), written to ``paths`` (and the
    answers to the ``predictions`` folder) after every row by the main process.

    ``model`` is a LLaVA-style model on its device and dtype (unpatched) and ``processor``
    its processor. Every setting is patched once before the run (configuration errors
    surface before any question is answered). The model is left unpatched.
    """
    runner = VQAEval(model, processor, records, ctx=ctx or DistContext(), batch_size=batch_size,
                     max_new_tokens=max_new_tokens, answer_processing=answer_processing,
                     prompter=prompter, strict=strict, progress=progress,
                     predictions=predictions, unreadable=unreadable)
    return run_sweep(runner, settings, paths=paths, meta=meta, methods=methods, title=title,
                     on_row=on_row)
