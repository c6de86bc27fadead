"""``vlprune viz``: its options (one image, a timm model, one reduction setting, the layers
shown) and the run around :func:`vlprune.viz.visualize` (a line per layer, the PNG)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import nn

from ..core.scores import SCORE_NAMES
from ..viz import COLOR_MODES, DEFAULT_MODEL, visualize
from .args import (
    RunError,
    UsageError,
    load_weights_arg,
    parse_config_file,
    parse_int_tuple,
    parse_list,
)


def _merge_value(text: str) -> int | tuple[int, float] | list[int]:
    """``"8"`` -> 8; ``"8:0.5"`` -> ToMe's ``(r, inflection)``; ``"8,8,4"`` -> per-layer list."""
    try:
        if ":" in text:
            r, inflect = text.split(":", 1)
            return (int(r), float(inflect))
        if "," in text:
            return [int(v) for v in text.split(",") if v.strip()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad --merge-r {text!r}: an int, R:INFLECTION (e.g. 8:0.5) or a per-layer list (8,8,4)"
        ) from None


def _keep_value(text: str) -> float | tuple[float, ...]:
    """``"0.7"`` -> 0.7; ``"0.7,0.5"`` -> one rate per ``--prune-layers`` entry."""
    values = parse_list(text, float, f"bad --prune-keep {text!r}: a rate in (0, 1], or one per "
                        "--prune-layers entry (0.7,0.5)", empty="--prune-keep needs a value")
    return values[0] if len(values) == 1 else tuple(values)


def _int_list(text: str) -> tuple[int, ...]:
    values = parse_int_tuple(text)
    if not values:
        raise argparse.ArgumentTypeError("expected at least one layer index")
    return values


def add_viz_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``vlprune viz`` arguments (image, model, one reduction setting, layers, output)."""
    parser.add_argument("image", help="image file (JPEG, PNG, ...)")
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"timm model name (default: {DEFAULT_MODEL}); random weights unless "
                        "--weights or --pretrained")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="PATH",
                     help="local checkpoint (.npz, .safetensors, .pth) loaded into the model")
    src.add_argument("--pretrained", action="store_true",
                     help="timm's pretrained weights (downloads from the Hugging Face hub)")
    _add_setting_arguments(parser)
    parser.add_argument("--layers", type=_int_list, default=None,
                        help="blocks shown, comma-separated (default: four evenly spaced, the "
                        "last included)")
    parser.add_argument("--colors", choices=COLOR_MODES, default="mean",
                        help="mean: each group in its mean colour (ToMe's picture); palette: "
                        "a qualitative colour per group over the image")
    parser.add_argument("--out", "-o", default="viz.png", help="PNG written (default: viz.png)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    return parser


def _add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """The one reduction setting drawn: unlike the rows of the other commands, ``--merge-r``
    and ``--prune-keep`` take one value or a per-layer list, and fuse / recycle exclude each
    other."""
    parser.add_argument("--merge-r", type=_merge_value, default=None,
                        help="ToMe r per layer: an int, R:INFLECTION, or a per-layer list")
    parser.add_argument("--prune-keep", type=_keep_value, default=None,
                        help="pruning keep rate in (0, 1], or one per --prune-layers entry")
    parser.add_argument("--prune-layers", type=_int_list, default=None,
                        help="layers that prune (default: a quarter, half, three quarters in)")
    parser.add_argument("--prune-score", default=None, choices=SCORE_NAMES,
                        help="how tokens are ranked for pruning (default: cls_attn)")
    parser.add_argument("--config", type=parse_config_file, default=None, metavar="FILE",
                        help="a saved ReductionConfig (JSON from vlprune calibrate --out or "
                        "ReductionConfig.save) instead of the options above")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prune-fuse", action="store_true",
                      help="fuse the dropped tokens into one token (EViT)")
    mode.add_argument("--prune-recycle", action="store_true",
                      help="merge each dropped token into its most similar kept token")


def _setting_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.config is not None:
        if args.merge_r is not None or args.prune_keep is not None:
            raise ValueError("give --config FILE or --merge-r / --prune-keep, not both")
        return {k: getattr(args.config, k) for k in args.config.field_names()}
    setting: dict[str, Any] = {}
    if args.merge_r is not None:
        setting["merge_r"] = args.merge_r
    prune = dict(prune_layers=args.prune_layers, prune_score=args.prune_score,
                 prune_fuse=args.prune_fuse or None, prune_recycle=args.prune_recycle or None)
    given = {k: v for k, v in prune.items() if v is not None}
    if args.prune_keep is None:
        if given:
            names = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"{names} given without --prune-keep: they would be ignored")
    else:
        setting["prune_keep"] = args.prune_keep
        setting.update(given)
    if not setting:
        raise ValueError("give --merge-r and/or --prune-keep (e.g. --merge-r 8)")
    return setting


def _build_timm_model(args: argparse.Namespace) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        raise RunError("vlprune viz needs timm: pip install 'vlprune[timm]'") from e
    if not timm.is_model(args.model):
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:10]
        raise UsageError(f"unknown timm model {args.model!r}; similar names: {close}")
    if args.pretrained:
        try:
            model = timm.create_model(args.model, pretrained=True)
        except Exception as e:  # no network, no hub weights for this name, ...
            raise RunError(
                f"cannot load timm's pretrained weights for {args.model!r} ({type(e).__name__}: {e}); "
                "use --weights PATH for a local checkpoint"
            ) from None
        return model
    model = timm.create_model(args.model, pretrained=False)
    if args.weights:
        load_weights_arg(model, args.weights)
    return model


def run_viz(args: argparse.Namespace) -> int:
    """``vlprune viz``: build the model, draw the PNG, print a line per layer. Bad input
    raises (:class:`~vlprune.cli.args.UsageError`, ValueError, ...), which
    :func:`vlprune.cli.main.main` turns into one line and exit status 2."""
    setting = _setting_from_args(args)
    image = Path(args.image)
    if not image.is_file():
        raise UsageError(f"image not found: {image}")
    model = _build_timm_model(args).to(args.device)
    try:
        summary = visualize(model, image, path=args.out, layers=args.layers, colors=args.colors,
                            **setting)
    except ImportError as e:  # numpy, PIL or matplotlib missing (the message says which)
        raise RunError(str(e)) from e
    print(f"{args.model}  {setting}  grid {summary['grid'][0]}x{summary['grid'][1]}  "
          f"prefix tokens {summary['num_prefix']}")
    print(f"{'layer':>5} {'tokens':>6} {'groups':>6} {'dropped':>7} {'fused':>5}")
    for layer in summary["layers"]:
        print(f"{layer:>5} {summary['tokens'][layer]:>6} {summary['groups'][layer]:>6} "
              f"{summary['dropped'][layer]:>7} {summary['fused'][layer]:>5}")
    if Path(summary["path"]).is_file():
        print(f"wrote {summary['path']}")
    return 0
