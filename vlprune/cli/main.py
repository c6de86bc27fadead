"""The ``vlprune`` command: the parser, the dispatch to one module per command, and the
errors turned into exit codes. ``bench`` and ``describe`` run on models built without
download (:mod:`vlprune.models`); ``eval imagenet`` / ``eval vqa`` on real weights and data;
``viz`` draws one image.

    vlprune bench --model vit_base_patch16_224 --merge-r 0,8,16 --batch-size 32
    vlprune bench --model open_clip:ViT-B-16 --merge-r 0,8 --prune-keep 0.7
    vlprune bench --model open_clip:ViT-B-16 --tower text --merge-r 0,2,4
    vlprune bench --model hf_clip:ViT-B-16 --tower text --merge-r 0,2,4
    vlprune describe --model vit_tiny_patch16_224 --merge-r 16
    vlprune bench --model llava:1.5-7b --llm-layers 4 --batch-size 1,8 \
        --visual-keep 192,128,64 --setting "llm_layer=2 llm_keep=64" --plot llava.png
    vlprune describe --model llava:1.5-7b --llm-layers 4 --visual-keep 64
    vlprune eval imagenet --model vit_tiny_patch16_224 --weights vit_ti.npz \
        --data imagenet-sample --merge-r 0,8,16 --prune-keep 0.7 --output results/vit_ti
"""

from __future__ import annotations

import argparse
import sys

from ..adapters import UnsupportedModelError
from . import bench, calibrate, check, describe, eval_imagenet, eval_vqa, tune
from .args import EXIT_FAILED, EXIT_STATUS_HELP, EXIT_USAGE, RunError, UsageError
from .viz import add_viz_arguments, run_viz


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` and its tasks to the top-level subcommands."""
    e = sub.add_parser("eval", help="speed-accuracy sweeps on real data (imagenet, vqa)",
                       description="Evaluate a model with real weights on real data, unpatched "
                       "and with each reduction setting, and plot accuracy against cost.")
    esub = e.add_subparsers(dest="task", required=True, metavar="TASK")
    eval_imagenet.add_parser(esub)
    eval_vqa.add_parser(esub)


def _name_commands(sub: argparse._SubParsersAction) -> None:
    """Give every command's parser its own name (``vlprune eval imagenet``) as the default
    ``cli_prog``, the prefix of its one-line errors (argparse's own errors use it too)."""
    for parser in sub.choices.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            _name_commands(nested[0])
        else:
            parser.set_defaults(cli_prog=parser.prog)


def make_parser() -> argparse.ArgumentParser:
    """The ``vlprune`` parser with every command."""
    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="vlprune", description="Training-free token reduction for vision transformers.",
        epilog=EXIT_STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vlprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    bench.add_parser(sub)
    describe.add_parser(sub)
    check.add_parser(sub)
    add_eval_parser(sub)
    calibrate.add_parser(sub)
    tune.add_parser(sub)

    v = sub.add_parser("viz", help="picture of merged and dropped patches per layer",
                       description="Run one image through a patched model and draw, for a few "
                       "layers, which patches were merged together (a colour per group) and "
                       "which were dropped.")
    add_viz_arguments(v)
    v.set_defaults(func=run_viz)
    _name_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``vlprune ARGS``; returns the exit status, one convention for every command
    (:data:`~vlprune.cli.args.EXIT_STATUS_HELP`):

    * 0: done;
    * 1: the run failed: :class:`~vlprune.cli.args.RunError` (a download or an optional
      package that is missing) prints one line; a check that failed returns 1 itself; any
      other error while running propagates with its traceback (Python exits with 1);
    * 2: bad command line or input: argparse's errors (it exits itself),
      :class:`~vlprune.cli.args.UsageError`, ValueError (invalid settings, unreadable
      checkpoints or images, ...), :class:`~vlprune.UnsupportedModelError` and
      FileNotFoundError print one line ``vlprune COMMAND: error: ...``.
    """
    parser = make_parser()
    args = parser.parse_args(argv)
    for name in ("rounds", "iters"):  # --batch-size: checked by parse_batch_list
        value = getattr(args, name, 1)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    prog = getattr(args, "cli_prog", parser.prog)
    try:
        return args.func(args)
    except RunError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (UsageError, ValueError, UnsupportedModelError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
