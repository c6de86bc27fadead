"""The argparse helpers shared by the commands: value parsers (``--merge-r``,
``--prune-keep``, ``--visual-keep``, ``--batch-size``, ``--setting``, ``--dtype``; comma lists:
:func:`parse_list`), the model
and reduction option groups, the settings (:class:`vlprune.eval.sweep.Setting` rows) a
command line asks for, and the closing output of the eval commands
(:func:`print_sweep_result`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import ADAPTIVE_VISUAL_SCORES, VISUAL_SCORES
from ..eval.sweep import OutputPaths, Setting, Sweep, config_label
from ..models import HF_SHAPES, LLAVA_SHAPES, ModelBuildError, build_model

#: the ``--model`` of bench and describe when none is given
DEFAULT_MODEL = "vit_base_patch16_224"

#: the exit statuses of every command (:func:`vlprune.cli.main.main`)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: how the exit statuses read in ``vlprune --help``
EXIT_STATUS_HELP = (
    "exit status:\n"
    "  0  done\n"
    "  1  the run failed: a check that failed (vlprune check), a download or a package that\n"
    "     is missing (one line), or an error while running (with its traceback)\n"
    "  2  bad command line or input: options, model names, settings, missing or unreadable\n"
    "     files (one line: 'vlprune COMMAND: error: ...')"
)


class UsageError(Exception):
    """A command line or input the command cannot use (option values or combinations, model
    names, missing or unreadable files): one line on stderr, exit status 2."""


class RunError(Exception):
    """The command could not finish for a reason outside its command line (a download that
    failed, an optional package that is missing): one line on stderr, exit status 1."""



def visual_score_help() -> str:
    """Help text of ``--visual-score``: the scores a ``--visual-keep`` count goes with, and
    where the ones with their own count go."""
    fixed = [s for s in VISUAL_SCORES if s not in ADAPTIVE_VISUAL_SCORES]
    return (f"how visual tokens are ranked with --visual-keep: {', '.join(fixed)} (default: "
            f"cls_attn); or, without --visual-keep, a score that chooses each image's count "
            f"itself: {', '.join(ADAPTIVE_VISUAL_SCORES)}")


def check_visual_score(args: argparse.Namespace) -> None:
    """``--visual-score`` goes with ``--visual-keep``, except the adaptive scores, which
    refuse it (exits with the reason)."""
    score, keep = getattr(args, "visual_score", "cls_attn"), getattr(args, "visual_keep", None)
    if score in ADAPTIVE_VISUAL_SCORES:
        if keep:
            raise UsageError(f"--visual-score {score} chooses each image's token count itself; "
                             "drop --visual-keep")
    elif score != "cls_attn" and not keep:
        raise UsageError("--visual-score given without --visual-keep: it would be ignored")

def parse_merge_list(text: str) -> list:
    """``"0,8,16"`` -> ``[0, 8, 16]``; an item ``R:INFLECT`` is ToMe's ``(r, inflection)``."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            if ":" in item:
                r, inflect = item.split(":", 1)
                out.append((int(r), float(inflect)))
            else:
                out.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad merge-r item {item!r}: use comma-separated ints, or R:INFLECTION (e.g. 16:0.5)"
            ) from None
    if not out:
        raise argparse.ArgumentTypeError("--merge-r needs at least one value")
    return out


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (float32, float16, bfloat16)."""
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; allowed: {sorted(table)}")
    return table[name]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` and how it is built and run (bench, describe)."""
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="timm model name; open_clip:<config> (e.g. open_clip:ViT-B-16); "
                   f"hf_clip:<shape> ({', '.join(HF_SHAPES['hf_clip'])}) or hf_siglip:<shape> "
                   f"({', '.join(HF_SHAPES['hf_siglip'])}) for Hugging Face towers built from "
                   f"a config; llava:<shape> ({', '.join(LLAVA_SHAPES)}) for a LLaVA model "
                   f"built from a config (language-model depth reduced, see --llm-layers); all "
                   f"with random weights (default: {DEFAULT_MODEL})")
    p.add_argument("--tower", choices=("image", "text"), default="image",
                   help="which tower of an open_clip / hf_clip / hf_siglip model to run "
                   "(default: image); text runs full-length random texts")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--llm-layers", type=int, default=None,
                   help="llava: language-model layers built (default: the shape's reduced depth, "
                   "4 for 1.5-7b, whose checkpoint has 32); widths stay the real ones")
    p.add_argument("--vision-layers", type=int, default=None,
                   help="llava: vision-tower layers built (default: the real depth)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", type=parse_dtype, default=torch.float32, help="float32, float16, bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def parse_list(text: str, convert: Callable[[str], Any], bad: str,
               empty: str | None = None) -> list:
    """The comma-separated items of ``text`` (blank ones skipped) through ``convert``; an
    item it refuses (ValueError) raises ArgumentTypeError(``bad``), and no item at all
    ArgumentTypeError(``empty``) when ``empty`` is given."""
    try:
        out = [convert(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(bad) from None
    if not out and empty is not None:
        raise argparse.ArgumentTypeError(empty)
    return out


def parse_float_list(text: str) -> list[float]:
    """``"0.7,0.5"`` -> ``[0.7, 0.5]``."""
    return parse_list(text, float, f"expected comma-separated numbers, got {text!r}")


def _count_or_ratio(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_keep_list(text: str) -> list[int | float]:
    """``"192,0.25"`` -> ``[192, 0.25]`` (ints stay counts, other numbers are ratios)."""
    return parse_list(text, _count_or_ratio, f"expected comma-separated numbers, got {text!r}",
                      empty="--visual-keep needs at least one value")


def parse_batch_list(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]``: distinct batch sizes >= 1 (a list needs a llava: model)."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    try:
        out = [int(v) for v in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad batch size list {text!r}: use comma-separated ints >= 1, e.g. 8 or 1,8"
        ) from None
    if not out or any(b < 1 for b in out):
        raise argparse.ArgumentTypeError(f"bad batch size list {text!r}: every batch size must be >= 1")
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"bad batch size list {text!r}: a batch size is repeated")
    return out


def parse_int_tuple(text: str) -> tuple[int, ...]:
    """``"3,6,9"`` -> ``(3, 6, 9)``."""
    return tuple(parse_list(text, int, f"expected comma-separated layer indices, got {text!r}"))


def parse_setting(text: str) -> dict:
    """``"prune_keep=0.7 prune_layers=3,6 merge_r=8"`` -> ReductionConfig keywords."""
    import ast

    from ..config import ReductionConfig

    out = {}
    for item in text.replace(";", " ").split():
        key, sep, value = item.partition("=")
        if not sep or key not in ReductionConfig.field_names():
            import difflib

            names = list(ReductionConfig.field_names())
            close = difflib.get_close_matches(key, names, n=3) if sep else []
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            what = f"unknown key {key!r}{hint}" if sep else "not KEY=VALUE"
            raise argparse.ArgumentTypeError(
                f"bad setting item {item!r}: {what}; use KEY=VALUE with KEY in {names}"
            )
        try:
            val = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            val = value  # a bare word, e.g. prune_score=cls_attn
        if key == "prune_layers" and isinstance(val, int):
            val = (val,)
        if key == "merge_r" and isinstance(val, tuple) and len(val) != 2:
            val = list(val)
        out[key] = val
    if not out:
        raise argparse.ArgumentTypeError("empty --setting")
    return out


def parse_config_file(text: str):
    """``--config FILE``: a :class:`~vlprune.ReductionConfig` saved as JSON (by
    ``vlprune calibrate --out`` or ``ReductionConfig.save``)."""
    from ..config import ReductionConfig

    try:
        return ReductionConfig.load(text)
    except (FileNotFoundError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_reduction_args(p: argparse.ArgumentParser, many: bool, *, visual: bool = True,
                        setting: bool = True) -> None:
    """The reduction options; ``visual=False`` leaves out the llava-only ones and
    ``setting=False`` the free-form ``--setting`` (a command adding its own). ``--config
    FILE`` (a saved config; one row per file when ``many``) unless the command has its own."""
    rows = " (one row each)" if many else ""
    if "--config" not in p._option_string_actions:
        if many:
            p.add_argument("--config", action="append", type=parse_config_file, default=[],
                           metavar="FILE", help="a saved ReductionConfig (JSON from vlprune "
                           "calibrate --out or ReductionConfig.save): one more row; repeatable")
        else:
            p.add_argument("--config", type=parse_config_file, default=None, metavar="FILE",
                           help="a saved ReductionConfig (JSON from vlprune calibrate --out or "
                           "ReductionConfig.save) instead of the reduction options")
    p.add_argument("--merge-r", type=parse_merge_list, default=None,
                   help=f"ToMe r values{rows}, e.g. 0,8,16; R:INFLECTION for a ramp (16:0.5)")
    p.add_argument("--prune-keep", type=parse_float_list, default=None,
                   help=f"pruning keep rates in (0, 1]{rows}, e.g. 0.7,0.5")
    p.add_argument("--prune-layers", type=parse_int_tuple, default=None,
                   help="layers that prune (default: a quarter, half, three quarters in)")
    p.add_argument("--prune-score", default="cls_attn",
                   help="cls_attn, cls_attn_vnorm, key_norm, attn_entropy, diversity, random")
    p.add_argument("--prune-fuse", action="store_true", help="fuse dropped tokens into one (EViT)")
    p.add_argument("--prune-recycle", action="store_true",
                   help="merge dropped tokens into their most similar kept token")
    p.add_argument("--prune-seed", type=int, default=0, help="seed of the random score")
    if visual:
        p.add_argument("--visual-keep", type=parse_keep_list, default=None,
                       help=f"llava: visual tokens kept per image{rows}, counts or ratios, e.g. "
                       "192,128,64 (default on llava: 192,128,64 for bench, 64 for describe)")
        p.add_argument("--visual-score", default="cls_attn",
                       help="llava: " + visual_score_help())
    else:
        p.set_defaults(visual_keep=None, visual_score="cls_attn")
    if many and setting:
        p.add_argument("--setting", action="append", type=parse_setting, default=[],
                       metavar='"KEY=VALUE ..."',
                       help="one more row from ReductionConfig fields, e.g. "
                       '"prune_keep=0.7 prune_layers=3 merge_r=8"; repeatable')


def prune_options(args: argparse.Namespace) -> dict:
    """The shared --prune-* options; refused without --prune-keep (they would do nothing)."""
    prune = dict(
        prune_layers=args.prune_layers, prune_score=args.prune_score, prune_fuse=args.prune_fuse,
        prune_recycle=args.prune_recycle, prune_seed=args.prune_seed,
    )
    defaults = dict(prune_layers=None, prune_score="cls_attn", prune_fuse=False,
                    prune_recycle=False, prune_seed=0)
    if not args.prune_keep and prune != defaults:
        stray = sorted("--" + k.replace("_", "-") for k in prune if prune[k] != defaults[k])
        raise UsageError(f"{', '.join(stray)} given without --prune-keep: they would be ignored")
    return prune


def settings_from_args(args: argparse.Namespace, default_merge: list,
                       default_visual: list | None = None,
                       default_score: str = "cls_attn") -> list:
    """The rows asked for on the command line (merge rows, prune rows, visual-token rows,
    free-form rows); with none, ``default_visual`` visual rows when given, else merge rows."""
    prune = prune_options(args)
    check_visual_score(args)
    rows = [Setting.of(merge_r=r) for r in (args.merge_r or [])]
    rows += [Setting.of(visual_keep=k, visual_score=args.visual_score)
             for k in (args.visual_keep or [])]
    if args.visual_score in ADAPTIVE_VISUAL_SCORES:
        rows.append(Setting.of(visual_score=args.visual_score))
    rows += [Setting.of(prune_keep=k, **prune) for k in (args.prune_keep or [])]
    rows += [Setting.of(**kw) for kw in getattr(args, "setting", [])]
    rows += [Setting(config_label(cfg), cfg) for cfg in getattr(args, "config", None) or []]
    if not rows and default_visual is not None:
        return [Setting.of(visual_keep=k, visual_score=default_score) for k in default_visual]
    return rows or [Setting.of(merge_r=r) for r in default_merge]


def parse_named_setting(text: str) -> tuple[str | None, dict]:
    """``"name=hybrid prune_keep=0.7 merge_r=8"`` -> ``("hybrid", {...})``.

    ``name=`` is optional and names the row's method (its curve in the plot; settings sharing
    a name form one curve); the other items are :func:`parse_setting`'s.
    """
    name, rest = None, []
    for item in text.replace(";", " ").split():
        key, sep, value = item.partition("=")
        if key == "name" and sep:
            if not value or name is not None:
                raise argparse.ArgumentTypeError(
                    f"bad setting {text!r}: give one non-empty name=LABEL (no spaces)"
                )
            name = value
        else:
            rest.append(item)
    if not rest:
        raise argparse.ArgumentTypeError(
            f"setting {text!r} has no KEY=VALUE item besides name=; e.g. "
            '"name=hybrid prune_keep=0.7 prune_layers=3 merge_r=8"'
        )
    try:
        return name, parse_setting(" ".join(rest))
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (and name=LABEL to name the row's method)") from None


def eval_settings_from_args(args: argparse.Namespace,
                            default_merge: list) -> tuple[list, dict[str, str]]:
    """The rows of an ``eval`` command and the method (curve) of each named one.

    Merge and prune rows as in :func:`settings_from_args`, then one row per ``--setting``
    (labelled ``NAME: <config>`` when named). ``default_merge`` rows only when nothing at
    all is asked for. Repeated rows are refused.
    """
    named = list(getattr(args, "setting", []) or [])
    rest = argparse.Namespace(**{**vars(args), "setting": []})
    rows = settings_from_args(rest, default_merge=[] if named else default_merge)
    methods: dict[str, str] = {}
    for name, kw in named:
        row = Setting.of(**kw)
        if name:
            row = Setting(f"{name}: {row.label}", row.config)
            methods[row.label] = name
        rows.append(row)
    labels = [r.label for r in rows]
    dupes = sorted({lb for lb in labels if labels.count(lb) > 1})
    if dupes:
        raise UsageError(f"setting(s) asked for twice: {dupes}; give each once")
    return rows, methods


def model_from_args(args: argparse.Namespace):
    """The ``--model`` of bench / describe / check, built
    (:func:`vlprune.models.build_model`); a model that cannot be built raises
    :class:`UsageError` (:class:`RunError` when its library is not installed)."""
    try:
        return build_model(args.model, args.img_size, args.device, args.dtype, args.tower,
                           args.llm_layers, args.vision_layers)
    except ModelBuildError as e:
        if isinstance(e.__cause__, ImportError):
            raise RunError(str(e)) from e
        raise UsageError(str(e)) from e


def print_sweep_result(sweep: Sweep, table: Sequence[tuple[str, str, str]], paths: OutputPaths,
                       head: Mapping[str, Any], keys: Sequence[str],
                       also: Sequence[str | os.PathLike] = ()) -> None:
    """The end of an eval command: the sweep's ``table``, the files its last save wrote and
    those of ``also`` that exist, on stderr (a file that was not written is not named), then
    ``--result`` and one JSON line: ``head`` and, per setting, its ``keys`` (floats rounded to
    4 places)."""
    print(sweep.table(table))
    order = [p for p in (paths.csv, paths.json, paths.plot) if p in sweep.written]
    written = [str(p) for p in order if Path(p).exists()]
    written += [f"{p}{os.sep}" if Path(p).is_dir() else str(p) for p in also if Path(p).exists()]
    if written:
        print(f"wrote {', '.join(written)}", file=sys.stderr)
    print("--result")
    print(json.dumps({
        **head,
        "rows": {
            r["setting"]: {k: (round(r[k], 4) if isinstance(r[k], float) else r[k]) for k in keys}
            for r in sweep.rows
        },
    }))


#: the image towers ``tune`` and ``calibrate`` build by name (their weights from --weights)
TOWER_PREFIXES = ("open_clip:", "hf_clip:", "hf_siglip:")


def image_model_from_args(args: argparse.Namespace, verb: str) -> torch.nn.Module:
    """The image model of ``--model`` (a timm classifier, or an ``open_clip:`` /
    ``hf_clip:`` / ``hf_siglip:`` image tower) with ``--weights`` or ``--pretrained``, in eval
    mode on the CPU (``tune`` and ``calibrate``; ``--num-classes`` / ``--img-size`` where the
    command has them)."""
    from ..models import ModelBuildError, build_model, is_vlm

    name = args.model
    num_classes, img_size = getattr(args, "num_classes", None), getattr(args, "img_size", None)
    if is_vlm(name):
        raise UsageError(f"{name}: {verb} takes image classifiers and image towers (timm, "
                         f"{', '.join(TOWER_PREFIXES)}), not vision-language models")
    if name.startswith(TOWER_PREFIXES):
        if args.pretrained or num_classes is not None:
            raise UsageError(f"--pretrained / --num-classes apply to timm models, not {name}; "
                             "give its image tower's weights with --weights")
        try:
            model = build_model(name, img_size, "cpu", torch.float32, "image")
        except ModelBuildError as e:
            if isinstance(e.__cause__, ImportError):
                raise RunError(str(e)) from e
            raise UsageError(str(e)) from e
    else:
        from ..eval.imagenet import build_classifier

        try:
            model = build_classifier(name, pretrained=args.pretrained, num_classes=num_classes,
                                     img_size=img_size)
        except RuntimeError as e:  # no hub, no timm
            raise RunError(str(e)) from e
    if args.weights is not None:
        load_weights_arg(model, args.weights)
    return model.eval()


def load_weights_arg(model: torch.nn.Module, path: str) -> None:
    """``--weights PATH`` into ``model``; a checkpoint that does not fit it is bad input
    (:class:`UsageError`)."""
    from ..eval.weights import load_weights

    try:
        load_weights(model, path)
    except RuntimeError as e:
        raise UsageError(str(e)) from e
