"""The ``vlprune`` command: ``bench`` and ``describe`` on models built without download,
and ``eval imagenet`` on real weights and images.

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
import json
import sys
import textwrap

import torch

DEFAULT_MODEL = "vit_base_patch16_224"


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


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; allowed: {sorted(table)}")
    return table[name]


def _add_model_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--dtype", type=_dtype, default=torch.float32, help="float32, float16, bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def parse_float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_keep_list(text: str) -> list[int | float]:
    """``"192,0.25"`` -> ``[192, 0.25]`` (ints stay counts, other numbers are ratios)."""
    out: list[int | float] = []
    for v in text.split(","):
        v = v.strip()
        if not v:
            continue
        try:
            out.append(int(v))
        except ValueError:
            try:
                out.append(float(v))
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("--visual-keep needs at least one value")
    return out


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
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def parse_setting(text: str) -> dict:
    """``"prune_keep=0.7 prune_layers=3,6 merge_r=8"`` -> ReductionConfig keywords."""
    import ast

    from .config import ReductionConfig

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


def _add_reduction_args(p: argparse.ArgumentParser, many: bool, *, visual: bool = True,
                        setting: bool = True) -> None:
    """The reduction options; ``visual=False`` leaves out the llava-only ones and
    ``setting=False`` the free-form ``--setting`` (a command adding its own)."""
    rows = " (one row each)" if many else ""
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
                       help="llava: how visual tokens are ranked: cls_attn, random, diversity, "
                       "pool")
    else:
        p.set_defaults(visual_keep=None, visual_score="cls_attn")
    if many and setting:
        p.add_argument("--setting", action="append", type=parse_setting, default=[],
                       metavar='"KEY=VALUE ..."',
                       help="one more row from ReductionConfig fields, e.g. "
                       '"prune_keep=0.7 prune_layers=3 merge_r=8"; repeatable')


def _prune_options(args: argparse.Namespace) -> dict:
    """The shared --prune-* options; refused without --prune-keep (they would do nothing)."""
    prune = dict(
        prune_layers=args.prune_layers, prune_score=args.prune_score, prune_fuse=args.prune_fuse,
        prune_recycle=args.prune_recycle, prune_seed=args.prune_seed,
    )
    defaults = dict(prune_layers=None, prune_score="cls_attn", prune_fuse=False,
                    prune_recycle=False, prune_seed=0)
    if not args.prune_keep and prune != defaults:
        stray = sorted("--" + k.replace("_", "-") for k in prune if prune[k] != defaults[k])
        raise SystemExit(f"{', '.join(stray)} given without --prune-keep: they would be ignored")
    return prune


def settings_from_args(args: argparse.Namespace, default_merge: list,
                       default_visual: list | None = None) -> list:
    """The rows asked for on the command line (merge rows, prune rows, visual-token rows,
    free-form rows); with none, ``default_visual`` visual rows when given, else merge rows."""
    from .eval.bench import Setting

    prune = _prune_options(args)
    if args.visual_score != "cls_attn" and not args.visual_keep:
        raise SystemExit("--visual-score given without --visual-keep: it would be ignored")
    rows = [Setting.of(merge_r=r) for r in (args.merge_r or [])]
    rows += [Setting.of(visual_keep=k, visual_score=args.visual_score)
             for k in (args.visual_keep or [])]
    rows += [Setting.of(prune_keep=k, **prune) for k in (args.prune_keep or [])]
    rows += [Setting.of(**kw) for kw in getattr(args, "setting", [])]
    if not rows and default_visual is not None:
        return [Setting.of(visual_keep=k, visual_score="cls_attn") for k in default_visual]
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
    from .eval.bench import Setting

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
        raise SystemExit(f"setting(s) asked for twice: {dupes}; give each once")
    return rows, methods


# Hugging Face towers built from configs (no download): the public checkpoints' shapes.
HF_SHAPES = {
    "hf_clip": {
        "ViT-B-32": dict(vision=dict(patch_size=32), text={}),
        "ViT-B-16": dict(vision=dict(patch_size=16), text={}),
        "ViT-L-14": dict(
            vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                        num_attention_heads=16, patch_size=14),
            text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        ),
    },
    "hf_siglip": {
        # SigLIP's tokenizer: pad = eos = 1 (the config's defaults are CLIP's ids)
        "base-patch16-224": dict(vision={}, text=dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)),
        "so400m-patch14-384": dict(
            vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                        num_attention_heads=16, patch_size=14, image_size=384),
            text=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                      num_attention_heads=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        ),
    },
}


# LLaVA models built from configs: the vision tower, projector and language-model widths of
# the public checkpoints; the language model is built shallower (``llm_layers``) so that a
# prefill fits a CPU run. The real depth is in ``real_llm_layers``.
LLAVA_SHAPES = {
    "1.5-7b": dict(  # CLIP ViT-L/14-336 (576 visual tokens) + a Llama-2-7B-shaped LLM
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, patch_size=14, image_size=336, projection_dim=768),
        text=dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                  pad_token_id=0),
        image_token_index=32000, llm_layers=4, real_llm_layers=32,
    ),
    "tiny": dict(  # the same 336 px / patch 14 grid (576 visual tokens), tiny widths: tests
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, patch_size=14, image_size=336, projection_dim=32),
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024,
                  pad_token_id=0),
        image_token_index=300, llm_layers=2, real_llm_layers=2,
    ),
}


def is_llava(name: str) -> bool:
    return name.partition(":")[0] == "llava"


def build_llava(shape: str, img_size: int | None = None, llm_layers: int | None = None,
                vision_layers: int | None = None):
    """A ``LlavaForConditionalGeneration`` of a :data:`LLAVA_SHAPES` shape, random weights
    (LLaVA-1.5 wiring: penultimate vision layer, class token dropped)."""
    try:
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
        )
    except ImportError as e:
        raise SystemExit("LLaVA models need transformers: pip install 'vlprune[hf]'") from e
    if shape not in LLAVA_SHAPES:
        raise SystemExit(f"unknown llava shape {shape!r}; known: {sorted(LLAVA_SHAPES)}")
    spec = LLAVA_SHAPES[shape]
    vision = dict(spec["vision"])
    if img_size:
        vision["image_size"] = img_size
    if vision_layers is not None:
        if vision_layers < 2:
            raise SystemExit("--vision-layers must be >= 2 (LLaVA reads the penultimate layer)")
        vision["num_hidden_layers"] = vision_layers
    n_llm = spec["llm_layers"] if llm_layers is None else llm_layers
    if n_llm < 1:
        raise SystemExit("--llm-layers must be >= 1")
    grid = (vision["image_size"] // vision["patch_size"]) ** 2
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(num_hidden_layers=n_llm, **spec["text"]),
        image_token_index=spec["image_token_index"], image_seq_length=grid,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(cfg)


def build_model(name: str, img_size: int | None, device: str, dtype: torch.dtype,
                tower: str = "image", llm_layers: int | None = None,
                vision_layers: int | None = None):
    """A model with random weights (no download), in eval mode on ``device``/``dtype``.

    ``name`` is a timm model name, ``open_clip:<config>`` (e.g. ``open_clip:ViT-B-16``), or
    ``hf_clip:<shape>`` / ``hf_siglip:<shape>`` (see :data:`HF_SHAPES`). For the CLIP
    families ``tower`` picks the image tower or a text tower of the same shape.
    """
    family, _, config = name.partition(":")
    if family != "llava" and (llm_layers is not None or vision_layers is not None):
        raise SystemExit(f"--llm-layers / --vision-layers need a llava: model, got {name!r}")
    if tower != "image" and family not in ("open_clip", *HF_SHAPES):
        raise SystemExit(f"--tower {tower} needs an open_clip:, hf_clip: or hf_siglip: model, got {name!r}")
    if family == "llava":
        model = build_llava(config, img_size, llm_layers, vision_layers)
    elif family == "open_clip":
        model = _build_open_clip_tower(config, img_size, tower)
    elif family in HF_SHAPES:
        model = _build_hf_tower(family, config, img_size, tower)
    else:
        model = _build_timm(name, img_size)
    return model.to(device=device, dtype=dtype).eval()


def _build_hf_tower(family: str, shape: str, img_size: int | None, tower: str):
    try:
        import transformers
    except ImportError as e:
        raise SystemExit("Hugging Face models need transformers: pip install 'vlprune[hf]'") from e
    shapes = HF_SHAPES[family]
    if shape not in shapes:
        raise SystemExit(f"unknown {family} shape {shape!r}; known: {sorted(shapes)}")
    kw = dict(shapes[shape][tower if tower == "text" else "vision"])
    if img_size and tower == "image":
        kw["image_size"] = img_size
    prefix = "CLIP" if family == "hf_clip" else "Siglip"
    kind = "Vision" if tower == "image" else "Text"
    config = getattr(transformers, f"{prefix}{kind}Config")(**kw)
    return getattr(transformers, f"{prefix}{kind}Model")(config)


def _build_timm(name: str, img_size: int | None):
    try:
        import timm
    except ImportError as e:
        raise SystemExit("timm models need timm: pip install 'vlprune[timm]'") from e
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise SystemExit(
            f"unknown timm model {name!r}; similar names: {close} (open_clip towers: "
            "open_clip:<config>, e.g. open_clip:ViT-B-16)"
        )
    kwargs = {"img_size": img_size} if img_size else {}
    return timm.create_model(name, pretrained=False, **kwargs)


def _build_open_clip_tower(config: str, img_size: int | None, tower: str):
    try:
        import open_clip
    except ImportError as e:
        raise SystemExit("open_clip models need open_clip_torch: pip install 'vlprune[clip]'") from e
    if config not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if config.split("-")[0].lower() in m.lower()][:10]
        raise SystemExit(f"unknown open_clip config {config!r}; similar: {close}")
    if tower == "text":
        # the text tower of that config as a TextTransformer (CLIP keeps it inline)
        from open_clip.model import _build_text_tower

        cfg = open_clip.get_model_config(config)
        if "hf_model_name" in cfg.get("text_cfg", {}):
            raise SystemExit(f"{config} has a Hugging Face text encoder, which vlprune does not patch")
        return _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    kwargs = {"force_image_size": img_size} if img_size else {}
    return open_clip.create_model(config, pretrained=None, **kwargs).visual


def _model_from_args(args: argparse.Namespace):
    return build_model(args.model, args.img_size, args.device, args.dtype, args.tower,
                       args.llm_layers, args.vision_layers)


def cmd_bench(args: argparse.Namespace) -> int:
    from .eval.bench import run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available here")
    llava = is_llava(args.model)
    if not llava and (args.text_tokens is not None or args.new_tokens is not None):
        raise SystemExit("--text-tokens / --new-tokens need a llava: model")
    batch_sizes = args.batch_size or [1 if llava else 32]
    if not llava and len(batch_sizes) > 1:
        raise SystemExit(f"--batch-size {','.join(map(str, batch_sizes))}: a list of batch "
                         "sizes needs a llava: model; give one batch size")
    settings = settings_from_args(args, default_merge=[0, 8, 16],
                                  default_visual=[192, 128, 64] if llava else None)
    model = _model_from_args(args)
    if llava:
        from .eval.vlm_bench import run_vlm_bench

        result = run_vlm_bench(
            model, settings, model_name=args.model, batch_size=batch_sizes,
            text_tokens=40 if args.text_tokens is None else args.text_tokens,
            new_tokens=8 if args.new_tokens is None else args.new_tokens,
            rounds=args.rounds, iters=args.iters, warmup=args.warmup,
            measure_memory=not args.no_memory, progress=not args.no_progress,
        )
        _write_outputs(result, args)
        batches = {
            str(b): {
                r.setting: {
                    "visual_tokens": r.visual_tokens,
                    "visual_tokens_last": r.visual_tokens_last,
                    "llm_tokens": r.llm_tokens,
                    "gflops_prefill": round(r.gflops_prefill, 2),
                    "prefill_ms": round(r.prefill_ms, 1),
                    "flops_ratio": round(r.flops_ratio, 3),
                    "speedup": round(r.speedup, 3),
                    "efficiency": round(r.efficiency, 3),
                    "decode_tok_s": None if r.decode_tok_s is None else round(r.decode_tok_s, 2),
                }
                for r in result.rows if r.batch_size == b
            }
            for b in result.batch_sizes
        }
        # "rows": the first batch size (as with one batch size); "batches": all of them
        rows = batches[str(result.batch_size)]
        print("--result")
        print(json.dumps({"model": result.model, "batch_size": result.batch_size,
                          "batch_sizes": result.batch_sizes, "rows": rows, "batches": batches}))
        return 0
    result = run_bench(
        model,
        settings,
        model_name=args.model if args.tower == "image" else f"{args.model} ({args.tower})",
        batch_size=batch_sizes[0],
        rounds=args.rounds,
        iters=args.iters,
        warmup=args.warmup,
        measure_memory=not args.no_memory,
        progress=not args.no_progress,
    )
    _write_outputs(result, args)
    summary = {
        "model": result.model,
        "batch_size": result.batch_size,
        "rows": {
            r.setting: {
                "img_per_s": round(r.img_per_s, 2),
                "flops_ratio": round(r.flops_ratio, 3),
                "speedup": round(r.speedup, 3),
                "efficiency": round(r.efficiency, 3),
            }
            for r in result.rows
        },
    }
    print("--result")
    print(json.dumps(summary))
    return 0


def _write_outputs(result, args: argparse.Namespace) -> None:
    print(result.table())
    if result.load_warning:
        print(f"WARNING: {result.load_warning}", file=sys.stderr)
    if args.json:
        result.write_json(args.json)
    if args.csv:
        result.write_csv(args.csv)
    if args.plot:
        result.plot(args.plot)


def cmd_describe(args: argparse.Namespace) -> int:
    from .api import describe, patch
    from .config import ReductionConfig

    if len(args.merge_r or []) > 1 or len(args.prune_keep or []) > 1 or len(args.visual_keep or []) > 1:
        raise SystemExit("describe takes one --merge-r, --prune-keep and/or --visual-keep value")
    prune = _prune_options(args)
    if args.visual_score != "cls_attn" and not args.visual_keep:
        raise SystemExit("--visual-score given without --visual-keep: it would be ignored")
    kw = dict(prune_keep=args.prune_keep[0], **prune) if args.prune_keep else {}
    if args.visual_keep or (is_llava(args.model) and not kw and not args.merge_r):
        kw.update(visual_keep=args.visual_keep[0] if args.visual_keep else 64,
                  visual_score=args.visual_score)
    if args.merge_r or not kw:
        kw["merge_r"] = args.merge_r[0] if args.merge_r else 16
    model = _model_from_args(args)
    patch(model, ReductionConfig(**kw))
    d = describe(model)
    print(d)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(d.to_dict(), f, indent=2)
    return 0


def cmd_eval_imagenet(args: argparse.Namespace) -> int:
    from .eval.eval_imagenet import run_cli

    if args.data is None and not args.dataset:
        raise SystemExit("vlprune eval imagenet: give --data DIR (an ImageFolder tree or a "
                         "folder with labels.csv) or --dataset NAME (a timm dataset)")
    if args.pretrained and args.weights:
        raise SystemExit("give --pretrained (hub weights) or --weights FILE, not both")
    for name in ("batch_size", "limit", "num_classes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers < 0:
        raise SystemExit(f"--workers must be >= 0, got {args.workers}")
    settings, methods = eval_settings_from_args(args, default_merge=EVAL_DEFAULT_MERGE)
    return run_cli(args, settings, methods)


#: the merge rows of ``vlprune eval imagenet`` when no setting is given
EVAL_DEFAULT_MERGE = [8, 16]


def _add_eval_imagenet_parser(esub: argparse._SubParsersAction) -> None:
    i = esub.add_parser(
        "imagenet", help="top-1/top-5, agreement, img/s, GFLOPs and memory per setting",
        description=textwrap.fill(
            "ImageNet-style validation of a timm classifier, unpatched and with each "
            "reduction setting: top-1, top-5, agreement with the unpatched model's "
            "predictions, img/s, GFLOPs/img, peak memory and tokens at the last layer; CSV, "
            "JSON and a speed-accuracy plot, rewritten after every setting. Runs under "
            "`accelerate launch` (data split across processes, results identical to one "
            "process).", 88),
        epilog="examples:\n"
        "  vlprune eval imagenet --model vit_tiny_patch16_224 --weights vit_ti.npz "
        "--data imagenet-sample --merge-r 0,8,16\n"
        "  vlprune eval imagenet --model deit_small_patch16_224 --pretrained --data "
        "/data/imagenet/val --merge-r 8,16 --prune-keep 0.7,0.5 --prune-layers 3,6,9 "
        '--setting "name=hybrid prune_keep=0.7 prune_layers=3 merge_r=8"\n'
        "  accelerate launch --num_processes 4 -m vlprune.cli eval imagenet ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = i.add_argument_group("data")
    g.add_argument("--data", "--data-dir", metavar="DIR", default=None,
                   help="path to the images: an ImageFolder tree (class folders, in sorted order "
                   "= class index) or a folder with labels.csv (filename,class_index; images "
                   "next to it or in images/); the root of --dataset when given")
    g.add_argument("--dataset", "-d", metavar="NAME", default=None,
                   help='timm dataset type + name ("<type>/<name>", e.g. hfds/imagenet-1k, '
                   "torch/imagenet) (default: the --data folder)")
    g.add_argument("--split", metavar="NAME", default="validation",
                   help="dataset split of --dataset (default: validation)")
    g.add_argument("--dataset-download", action="store_true",
                   help="allow --dataset to download (torch/ datasets)")
    g.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate the first N images only (a tree: round-robin over classes)")
    g.add_argument("--strict", action="store_true",
                   help="fail on a missing or unreadable image (default: skip it and count it "
                   "in the 'skipped' column)")
    g.add_argument("--preload", choices=("auto", "yes", "no"), default="auto",
                   help="decode the images once into memory and reuse them for every setting; "
                   "auto: when a process's images take at most 4 GiB (default: auto)")
    g.add_argument("--workers", "-j", type=int, default=4, metavar="N",
                   help="number of data loading workers (default: 4)")
    g.add_argument("--img-size", type=int, default=None, metavar="N",
                   help="input image dimension, uses model default if empty")
    g.add_argument("--crop-pct", type=float, default=None, metavar="PCT",
                   help="input image center crop pct (default: the model's)")
    g.add_argument("--interpolation", default=None, metavar="NAME",
                   help="image resize interpolation type (overrides model)")
    g.add_argument("--mean", type=float, nargs=3, default=None, metavar="MEAN",
                   help="override mean pixel value of dataset")
    g.add_argument("--std", type=float, nargs=3, default=None, metavar="STD",
                   help="override std deviation of dataset")

    m = i.add_argument_group("model")
    m.add_argument("--model", "-m", required=True, metavar="NAME",
                   help="timm model name, optionally with its pretrained tag (e.g. "
                   "vit_tiny_patch16_224.augreg_in21k_ft_in1k), which also sets the "
                   "preprocessing")
    m.add_argument("--pretrained", action="store_true",
                   help="use pre-trained model (downloads from the hub)")
    m.add_argument("--weights", "--checkpoint", metavar="PATH", default=None,
                   help="local weights file (.npz timm or big_vision, .safetensors, "
                   ".pth/.pt/.bin read with weights_only=True)")
    m.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="number classes in dataset (default: the model's)")
    m.add_argument("--batch-size", "-b", type=int, default=50, metavar="N",
                   help="mini-batch size (default: 50)")
    m.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda when available; under a "
                   "launcher each process takes its own GPU)")
    m.add_argument("--dtype", type=_dtype, default=torch.float32,
                   help="float32, float16, bfloat16 (default: float32)")
    m.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads per process (default: torch's)")

    r = i.add_argument_group("settings (the unpatched model is always evaluated first)")
    _add_reduction_args(r, many=True, visual=False, setting=False)
    r.add_argument("--setting", action="append", type=parse_named_setting, default=[],
                   metavar='"[name=NAME] KEY=VALUE ..."',
                   help="one more row from ReductionConfig fields, e.g. "
                   '"name=hybrid prune_keep=0.7 prune_layers=3 merge_r=8"; rows with the '
                   "same name form one curve in the plot; repeatable (default when no "
                   f"setting is given: --merge-r {','.join(map(str, EVAL_DEFAULT_MERGE))})")

    o = i.add_argument_group("output")
    o.add_argument("--output", "-o", metavar="PREFIX", default=None,
                   help="write PREFIX.csv, PREFIX.json and PREFIX.png (default: "
                   "results/eval_imagenet_<model>)")
    o.add_argument("--csv", metavar="PATH", default=None, help="CSV path (overrides --output)")
    o.add_argument("--json", metavar="PATH", default=None, help="JSON path (overrides --output)")
    o.add_argument("--plot", metavar="PATH", default=None, help="PNG path (overrides --output)")
    o.add_argument("--no-plot", action="store_true", help="no PNG")
    o.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    i.set_defaults(func=cmd_eval_imagenet)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="speed-accuracy sweeps on real data (imagenet, vqa)",
                       description="Evaluate a model with real weights on real data, unpatched "
                       "and with each reduction setting, and plot accuracy against cost.")
    esub = e.add_subparsers(dest="task", required=True, metavar="TASK")
    _add_eval_imagenet_parser(esub)
    from .eval.eval_vqa import add_vqa_parser

    add_vqa_parser(esub)


def make_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vlprune", description="Training-free token reduction for vision transformers."
    )
    parser.add_argument("--version", action="version", version=f"vlprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="throughput, FLOPs and memory of reduction settings",
                       description="Benchmark an unpatched model against reduction settings, "
                       "interleaved, with medians, speedup and efficiency (speedup / FLOPs ratio). "
                       "On llava: models: prefill latency and FLOPs, decode tokens/s and the "
                       "visual tokens reaching the language model (and its last layer) per "
                       "visual_keep / llm_keep setting, at one or several batch sizes.")
    _add_model_args(b)
    _add_reduction_args(b, many=True)
    b.add_argument("--batch-size", "-b", type=parse_batch_list, default=None,
                   help="default: 32; 1 for llava: models, which also take a list (e.g. 1,8: "
                   "rows per batch size)")
    b.add_argument("--text-tokens", type=int, default=None,
                   help="llava: text tokens of the longest prompt (default 40); rows of a batch "
                   "are 3 tokens shorter each, left padded")
    b.add_argument("--new-tokens", type=int, default=None,
                   help="llava: tokens generated per timed call (default 8): the prefill gives the "
                   "first, the decode timing covers the others; 0 or 1: prefill only")
    b.add_argument("--rounds", type=int, default=5, help="timed rounds over all settings")
    b.add_argument("--iters", type=int, default=2, help="timed calls per setting and round")
    b.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    b.add_argument("--csv", metavar="PATH", help="write one CSV row per setting (and batch size)")
    b.add_argument("--plot", metavar="PATH", help="write a PNG of speedup against FLOPs reduction "
                   "(llava: prefill, one series per batch size)")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("describe", help="tokens per layer and FLOPs of one setting")
    _add_model_args(d)
    _add_reduction_args(d, many=False)
    d.add_argument("--json", metavar="PATH", help="write the description as JSON")
    d.set_defaults(func=cmd_describe)

    _add_eval_parser(sub)

    from .viz import add_viz_arguments, run_viz

    v = sub.add_parser("viz", help="picture of merged and dropped patches per layer",
                       description="Run one image through a patched model and draw, for a few "
                       "layers, which patches were merged together (a colour per group) and "
                       "which were dropped.")
    add_viz_arguments(v)
    v.set_defaults(func=run_viz)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    for name in ("rounds", "iters"):  # --batch-size: checked by parse_batch_list
        value = getattr(args, name, 1)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:  # configuration errors: one line, no traceback
        from .adapters.base import UnsupportedModelError

        if isinstance(e, (ValueError, UnsupportedModelError)):
            print(f"vlprune: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
