"""The generation loop shared by the VQA and caption tasks (:mod:`vlprune.eval.vqa`,
:mod:`vlprune.eval.caption`): one LLaVA-style model, one set of records, many settings.

The unpatched model answers (or captions) every record first, then each setting
(``visual_keep`` / ``visual_score``, FastV's ``llm_layer`` / ``llm_keep``, ``text_keep``,
tower merging, ...) does the same records with the same prompts. Batches are left padded and
answered by greedy ``generate(max_new_tokens=...)``; only the new tokens are decoded, then
stripped. :class:`GenerationEval` is the per-setting evaluation (a task subclass adds its
scores), :func:`run_sweep` the sweep around it. The cost columns, the same for both tasks
(:data:`COST_COLUMNS`):

``agreement``
    % of records whose output equals the unpatched model's, after the task's normalisation
    (100 for the unpatched row).
``visual_tokens``, ``visual_tokens_last``, ``llm_tokens``
    measured during a batch-1 prefill of the first readable record: the image placeholders
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
    records per second of ``generate`` time (prefill + decode; image loading and
    preprocessing excluded).
``n``, ``skipped``
    records evaluated, and records skipped because their image is missing or unreadable.
``seconds``
    wall time of the setting's pass, image loading included (slowest process).
``predictions``
    the JSONL file holding this setting's output for every record.

Under ``accelerate launch`` (or ``torchrun``) every process does a strided shard of the
records; the outputs are gathered in the data's order (:mod:`vlprune.eval.distributed`), so
every number but the timings equals a single process's. Only the main process writes.

Records whose image is missing or unreadable are skipped and counted (``skipped``), with a
warning naming a few (``skipped.jsonl`` in the predictions folder lists them all);
``strict=True`` refuses them instead, before the model is run (:func:`unreadable_images`,
:func:`report_unreadable`).
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import DistContext
from .flops import count_flops
from .image_data import UnreadableImagesError, image_problem, open_rgb
from .sweep import (
    BASELINE,
    OutputPaths,
    PlotSpec,
    Setting,
    Sweep,
    apply_setting,
    atomic_write,
    progress_bar,
    slug,
)
from .vlm import ARCHITECTURES, Prompter, vlm_family
from .vlm_bench import GenerateClock, llm_lengths
from .vqa_data import Record

__all__ = [
    "COST_COLUMNS",
    "COST_COMPARE",
    "DEFAULT_MAX_NEW_TOKENS",
    "TIMING",
    "BatchOutput",
    "Costs",
    "GenerationEval",
    "check_records",
    "report_unreadable",
    "run_sweep",
    "unreadable_images",
]

#: ``max_new_tokens`` per task when none is given
DEFAULT_MAX_NEW_TOKENS = {"vqa": 16, "caption": 30}

#: how the timing columns are measured (stored with the results)
TIMING = ("generate calls only (image loading and preprocessing excluded), synchronized; "
          "prefill: from the generate call to the end of its first forward, decode: the rest "
          "of the call; the first batch of each process is untimed (warm-up) when the process "
          "has more than one batch; prefill_ms: median over the timed batches of all "
          "processes; decode_tok_s: generated tokens after each row's first (up to its "
          "end-of-sequence token), all processes / slowest process's decode seconds; "
          "samples_per_s: questions (or images) timed / slowest process's generate seconds")

#: the cost columns, the same for both tasks
COST_COLUMNS = ("visual_tokens", "visual_tokens_last", "llm_tokens", "gflops_prefill",
                 "flops_ratio", "prefill_ms", "speedup", "decode_tok_s", "samples_per_s", "n",
                 "skipped", "seconds", "predictions")

#: the cost columns relative to the unpatched row, the same for both tasks
COST_COMPARE = {
    "speedup": ("prefill_ms", "inverse"),
    "flops_ratio": ("gflops_prefill", "inverse"),
}

#: the cost panels of both tasks' plots (column, axis label)
_COST_PANELS = (("gflops_prefill", "prefill GFLOPs / sample"), ("prefill_ms", "prefill ms / batch"))
_SHOWN_SKIPPED = 5


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
                seen[path] = image_problem(path)
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


def report_unreadable(new: Mapping[int, str], bad: Mapping[int, str],
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
class Costs:
    """The cost of one setting, from one batch-1 prefill: GFLOPs, the visual tokens reaching
    the language model, and the language model's input and output lengths."""

    gflops: float
    visual: int
    llm_in: int
    llm_out: int


class GenerationEval(ABC):
    """The per-setting evaluation of one LLaVA-style model on one set, in this process: the
    generation loop and the cost columns, shared by :class:`VQAEval` and :class:`CaptionEval`.

    Call :meth:`prepare` (finds the unreadable images, unless ``unreadable`` is given) and
    :meth:`costs` once with all settings (validates them; FLOPs and visual tokens), then call
    the object with a :class:`~vlprune.eval.sweep.Setting` for its metrics, the unpatched
    setting first (the reference of ``agreement``). With ``predictions`` (a folder) the main
    process writes every setting's outputs there as JSONL (``NN_<setting>.jsonl``, one line
    per evaluated record in data order: ``index``, the fields of :meth:`prediction_fields`,
    ``agrees`` (same normalised output as unpatched)) and ``skipped.jsonl``.

    A task subclass sets :attr:`task`, :attr:`noun`, :attr:`id_field` and what its sweep
    writes (:attr:`columns`, :attr:`compare`, :attr:`kind`, :attr:`metric`), implements
    :meth:`default_prompter`, :meth:`prompt`, :meth:`normalize`, :meth:`score` and
    :meth:`prediction_fields`, and may add facts to the results (:meth:`task_meta`).
    """

    #: the task's name (a :data:`TASKS` value)
    task = ""
    #: what a record is, in messages and counts (``questions`` or ``images``)
    noun = "questions"
    #: the record attribute that names it in ``skipped.jsonl`` and the predictions
    id_field = "question_id"
    #: the sweep's columns, in order
    columns: tuple[str, ...] = ()
    #: the columns computed against the unpatched row (:class:`~vlprune.eval.sweep.Sweep`)
    compare: Mapping[str, tuple[str, str]] = COST_COMPARE
    #: the ``kind`` of the results file
    kind = ""
    #: the plotted metric: column and axis label
    metric = ("", "")

    def __init__(self, model: nn.Module, processor: Any, records: Sequence[Record], *,
                 ctx: DistContext | None = None, batch_size: int = 8, max_new_tokens: int = 16,
                 prompter: Prompter | None = None, strict: bool = False, progress: bool = True,
                 predictions: str | os.PathLike | None = None,
                 unreadable: Mapping[int, str] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not records:
            raise ValueError(f"no {self.noun} to evaluate")
        family = vlm_family(model)
        if family is None:
            raise ValueError(f"{type(model).__name__} is not a supported vision-language model; supported: "
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
        self._costs: dict[str, Costs] = {}
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

    def task_meta(self) -> dict[str, Any]:
        """The task's own facts stored with the results (after ``max_new_tokens``)."""
        return {}

    # -- setup --------------------------------------------------------------------------

    def prepare(self) -> None:
        """Find the records whose image is missing or unreadable (all processes) and
        report them: an error with ``strict`` (or when no record is left), else a warning."""
        if self.bad is None:
            self.bad = unreadable_images(self.records, self.ctx, progress=self.progress)
            report_unreadable(self.bad, self.bad, self.records, strict=self.strict,
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
                image = open_rgb(Path(r.image))
            except Exception:
                continue
            return self.inputs([r], [image])
        raise UnreadableImagesError(f"no {_SINGULAR[self.noun]} has a readable image")

    def costs(self, settings: Sequence[Setting]) -> dict[str, Costs]:
        """Prefill FLOPs, visual tokens reaching the LLM (and its last layer) and the LLM's
        prompt length of the unpatched model and of every setting, from one batch-1 prefill
        each (a ``generate`` of one token). Patching every setting here also validates them
        before the long evaluation starts. Leaves the model unpatched."""
        x1 = self._example()
        kw = dict(self.gen_kwargs, max_new_tokens=1)
        out: dict[str, Costs] = {}
        try:
            with torch.inference_mode():
                for s in [Setting(BASELINE, None), *settings]:
                    if s.label in out:
                        continue
                    try:
                        apply_setting(self.model, s)
                    except (ValueError, TypeError) as e:
                        raise type(e)(f"setting {s.label!r}: {e}") from e
                    visual, llm_in, llm_out, flops = llm_lengths(
                        self.model,
                        lambda: count_flops(lambda: self.model.generate(**x1, **kw)),
                    )
                    out[s.label] = Costs(flops / 1e9, visual, llm_in, llm_out)
        finally:
            apply_setting(self.model, Setting(BASELINE, None))
        self._costs.update(out)
        return out

    # -- one batch ----------------------------------------------------------------------

    def _run_batch(self, records: Sequence[Record], images: Sequence[Any],
                   clock: GenerateClock) -> BatchOutput:
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
        apply_setting(self.model, setting)
        try:
            with torch.inference_mode(), GenerateClock(self.model, self.device) as clock, \
                    progress_bar(len(chunks), self.progress, f"{self.task} {setting.label}") as bar:
                for b, chunk in enumerate(chunks):
                    recs, images, idx = [], [], []
                    for i in chunk:
                        try:
                            images.append(open_rgb(Path(self.records[i].image)))
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
            apply_setting(self.model, Setting(BASELINE, None))
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
            report_unreadable(dict(sorted(new_bad.items())), self.bad, self.records,
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
        write_lines(path, lines)
        return path

    def _write_skipped(self) -> None:
        if self.predictions is None or not self.ctx.is_main:
            return
        lines = [json.dumps({"index": i, self.id_field: getattr(self.records[i], self.id_field),
                             "image": str(self.records[i].image), "error": why})
                 for i, why in (self.bad or {}).items()]
        write_lines(self.predictions / "skipped.jsonl", lines)


def check_records(records: Sequence[Record], kind: type, name: str, other: str) -> None:
    """Refuse records of the other task (``name`` evaluates ``kind``; ``other`` takes the
    rest)."""
    for r in records:
        if not isinstance(r, kind):
            raise TypeError(f"{name} evaluates {kind.__name__} records, got a "
                            f"{type(r).__name__} ({other} takes those)")


def write_lines(path: Path, lines: Sequence[str]) -> None:
    """Write ``lines`` to ``path``, one a line, atomically."""
    atomic_write(path, "".join(line + "\n" for line in lines))


def run_sweep(runner: GenerationEval, settings: Sequence[Setting], *, paths: OutputPaths | None,
              meta: Mapping[str, Any] | None, methods: Mapping[str, str] | None, title: str,
              on_row: Callable[[dict[str, Any]], None] | None) -> Sweep:
    """Prepare ``runner``, measure every setting's costs, then run the sweep (``meta`` gets
    the run's facts: task, counts, prompt, device, timing; the plot is the task's metric
    against the prefill costs)."""
    ctx = runner.ctx
    runner.prepare()
    runner.costs(settings)
    full_meta = {**(meta or {}), "task": runner.task, runner.noun: len(runner.records),
                 "batch_size": runner.batch_size, "max_new_tokens": runner.max_new_tokens,
                 **runner.task_meta(), "prompt": runner.prompt_description(),
                 "prompt_source": runner.prompter.kind, "world_size": ctx.world_size,
                 "device": str(runner.device), "dtype": str(runner.dtype).replace("torch.", ""),
                 "threads": torch.get_num_threads(), "timing": TIMING}
    if runner.predictions is not None:
        full_meta["predictions_dir"] = str(runner.predictions)
    y, ylabel = runner.metric
    spec = PlotSpec(y=y, ylabel=ylabel, panels=_COST_PANELS,
                    title=title or str(full_meta.get("model", "")))
    sweep = Sweep(paths or OutputPaths(), meta=full_meta, plot=spec, compare=runner.compare,
                  columns=runner.columns, write=ctx.is_main, kind=runner.kind)
    sweep.run(settings, runner, methods=methods, on_row=on_row)
    return sweep
