"""``vlprune eval vqa`` (``--task vqa`` or ``--task caption``): its options, their checks, and
the run around :func:`vlprune.eval.vqa.eval_vqa` / :func:`vlprune.eval.caption.eval_captions`
(records and model from the options, a line per finished setting, the final table and the
``--result`` JSON)."""

from __future__ import annotations

import argparse
import textwrap
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..eval.caption import caption_scorers_available, eval_captions
from ..eval.distributed import init_distributed
from ..eval.generation import DEFAULT_MAX_NEW_TOKENS, report_unreadable, unreadable_images
from ..eval.sweep import Setting, output_paths, slug
from ..eval.vlm import ANSWER_SUFFIX, CAPTION_INSTRUCTION, Prompter, load_vlm
from ..eval.vqa import eval_vqa
from ..eval.vqa_data import (
    CAPTION_FORMATS,
    VQA_FORMATS,
    Record,
    detect_caption_format,
    detect_format,
    load_captions,
    load_vqa,
)
from ..eval.vqa_metric import ANSWER_PROCESSING
from .args import (
    RunError,
    UsageError,
    add_reduction_args,
    eval_settings_from_args,
    parse_dtype,
    parse_keep_list,
    parse_named_setting,
    print_sweep_result,
    visual_score_help,
)

#: the values of ``--task``
TASKS = ("vqa", "caption")

#: the visual-token rows of ``vlprune eval vqa`` when no setting is given
DEFAULT_VISUAL_KEEP = [192, 128, 64]


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



DESCRIPTION = (
    "Visual question answering (--task vqa) or captioning (--task caption) with a LLaVA-style or Qwen-VL "
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
                   help="a Hugging Face LLaVA or Qwen-VL model (e.g. llava-hf/llava-1.5-7b-hf, "
                   "Qwen/Qwen2.5-VL-7B-Instruct) or a local folder with its weights and "
                   "processor; llava:<shape> (tiny, 1.5-7b), qwen2.5-vl:<shape> (tiny, 7b) and "
                   "qwen3-vl:<shape> build one with random weights and an offline processor "
                   "(default: llava:tiny)")
    m.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights of llava:<shape> / qwen*:<shape> (default: 0)")
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
    m.add_argument("--dtype", type=parse_dtype, default=None,
                   help="float32, float16, bfloat16 (default: float16 on CUDA, else float32)")
    m.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads per process (default: torch's)")

    r = parser.add_argument_group("settings (the unpatched model is always evaluated first)")
    r.add_argument("--visual-keep", type=parse_keep_list, default=None,
                   help="visual tokens kept per image (one row each), counts or ratios, e.g. "
                   f"576,192,64 (default when no setting is given: "
                   f"{','.join(map(str, DEFAULT_VISUAL_KEEP))})")
    r.add_argument("--visual-score", default="cls_attn",
                   help=visual_score_help())
    add_reduction_args(r, many=True, visual=False, setting=False)
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


def add_parser(subparsers: Any) -> Any:
    """Add the ``vqa`` command to an ``eval`` subparsers object; returns its parser."""
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
    """The task's records and the data format (exits for a missing file)."""
    try:
        if args.task == "caption":
            fmt = args.format or detect_caption_format(args.data)
            return load_captions(args.data, args.images, format=fmt, limit=args.limit), fmt
        fmt = args.format or detect_format(args.data)
        records = load_vqa(args.data, args.images, annotations=args.annotations, format=fmt,
                           image_pattern=args.image_pattern, limit=args.limit)
        return records, fmt
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e


def run_vqa(args: Any) -> int:
    """``vlprune eval vqa`` after argument parsing (see :func:`add_vqa_arguments`)."""
    for name in ("batch_size", "limit", "max_new_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    _check_task_options(args)
    caption = args.task == "caption"
    noun = "images" if caption else "questions"
    if caption:
        try:
            caption_scorers_available()
        except ImportError as e:
            raise RunError(str(e)) from e
    max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[args.task]
    settings, methods = _settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    records, fmt = _load_records(args)
    if not records:
        raise UsageError(f"no {noun} in {args.data}")
    progress = not args.no_progress
    # before the model is loaded: a --strict run with a missing image stops here
    bad = unreadable_images(records, ctx, progress=progress)
    report_unreadable(bad, bad, records, strict=args.strict, ctx=ctx, noun=noun)

    dtype = args.dtype or (torch.float16 if ctx.device.type == "cuda" else torch.float32)
    try:
        vlm = load_vlm(args.model, records=records, device=ctx.device, dtype=dtype,
                       seed=args.seed)
    except RuntimeError as e:  # no transformers, weights or processor that cannot be loaded
        raise RunError(str(e)) from e
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
        print_sweep_result(sweep, table, paths,
                           {"model": args.model, "task": args.task, noun: len(records)},
                           (*keys, "agreement", "visual_tokens", "gflops_prefill", "prefill_ms",
                            "decode_tok_s", "n", "skipped"), also=[predictions])
    ctx.close()
    return 0
