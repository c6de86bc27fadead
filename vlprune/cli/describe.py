"""``vlprune describe``: tokens per layer and FLOPs of one setting on a named model."""

from __future__ import annotations

import argparse
import json

from ..api import describe, patch
from ..config import ADAPTIVE_VISUAL_SCORES, ReductionConfig
from ..models import is_llava
from .args import (
    UsageError,
    add_model_args,
    add_reduction_args,
    check_visual_score,
    model_from_args,
    prune_options,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``describe`` to the top-level subcommands."""
    d = sub.add_parser("describe", help="tokens per layer and FLOPs of one setting")
    add_model_args(d)
    add_reduction_args(d, many=False)
    d.add_argument("--json", metavar="PATH", help="write the description as JSON")
    d.set_defaults(func=cmd_describe)


def cmd_describe(args: argparse.Namespace) -> int:
    if len(args.merge_r or []) > 1 or len(args.prune_keep or []) > 1 or len(args.visual_keep or []) > 1:
        raise UsageError("describe takes one --merge-r, --prune-keep and/or --visual-keep value")
    prune = prune_options(args)
    check_visual_score(args)
    if args.config is not None:
        if args.merge_r or args.prune_keep or args.visual_keep:
            raise UsageError("give --config FILE or --merge-r / --prune-keep / --visual-keep, "
                             "not both")
        model = model_from_args(args)
        patch(model, args.config)
        return _print(describe(model), args.json)
    kw = dict(prune_keep=args.prune_keep[0], **prune) if args.prune_keep else {}
    if args.visual_score in ADAPTIVE_VISUAL_SCORES:
        kw["visual_score"] = args.visual_score
    elif args.visual_keep or (is_llava(args.model) and not kw and not args.merge_r):
        kw.update(visual_keep=args.visual_keep[0] if args.visual_keep else 64,
                  visual_score=args.visual_score)
    if args.merge_r or not kw:
        kw["merge_r"] = args.merge_r[0] if args.merge_r else 16
    model = model_from_args(args)
    patch(model, ReductionConfig(**kw))
    return _print(describe(model), args.json)


def _print(d, path: str | None) -> int:
    print(d)
    if path:
        with open(path, "w") as f:
            json.dump(d.to_dict(), f, indent=2)
    return 0
