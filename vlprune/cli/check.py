"""``vlprune check``: the upstream-drift self-check on a model, and the fingerprint table."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import upstream
from ..adapters import UnsupportedModelError
from ..api import check, patch
from ..models import ModelBuildError, build_model, is_llava, is_vlm
from .args import add_model_args, model_from_args

# tiny random models of every supported family, and a setting that patches every part of each
RECORDING = (
    ("test_vit", "image", dict(merge_r=2, prune_keep=0.9, prune_layers=(1,))),
    ("open_clip:ViT-B-32", "image", dict(merge_r=2)),
    ("open_clip:ViT-B-32", "text", dict(merge_r=2)),
    ("hf_clip:ViT-B-32", "image", dict(merge_r=2)),
    ("hf_clip:ViT-B-32", "text", dict(merge_r=2)),
    ("hf_siglip:base-patch16-224", "image", dict(merge_r=2)),
    ("hf_siglip:base-patch16-224", "text", dict(merge_r=2)),
    ("llava:tiny", "image", dict(visual_keep=8, llm_layer=1, llm_keep=0.5)),
    ("qwen2.5-vl:tiny", "image", dict(visual_keep=0.5, visual_score="attn", llm_layer=1, llm_keep=0.5)),
    ("qwen3-vl:tiny", "image", dict(visual_keep=0.5, visual_score="attn", llm_layer=1, llm_keep=0.5)),
    ("internvl:tiny", "image", dict(visual_keep=0.5, llm_layer=1, llm_keep=0.5)),
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "check", help="self-check a patched model against its unpatched self (upstream drift)",
        description="Patch --model (random weights) with --merge-r and run vlprune.check: "
        "reducing nothing must equal the unpatched model, a reduced forward must be finite. "
        "Also lists the overridden upstream functions whose fingerprint is none of the tested "
        "versions'. --known checks every supported family's tiny model at once; --record adds "
        "the installed versions' fingerprints to vlprune/upstream_known.py.")
    add_model_args(c)
    c.add_argument("--merge-r", type=int, default=4, help="ToMe r of the reduced forward (default 4; "
                   "on qwen2.5-vl:, qwen3-vl: and internvl: models visual_keep=0.5 instead)")
    c.add_argument("--known", action="store_true",
                   help="exit 1 unless every overridden function of every family is a tested version")
    c.add_argument("--record", action="store_true",
                   help="add the installed versions' fingerprints to vlprune/upstream_known.py")
    c.set_defaults(func=cmd_check)


def _bert_family() -> list[torch.nn.Module]:
    """Tiny random BERT, RoBERTa and XLM-RoBERTa encoders (the ``hf_bert`` family)."""
    try:
        import transformers as tf
    except ImportError:
        return []
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 vocab_size=100, max_position_embeddings=160)
    return [getattr(tf, f"{n}Model")(getattr(tf, f"{n}Config")(**small)).eval()
            for n in ("Bert", "Roberta", "XLMRoberta")]


def _heads_and_bases() -> list[torch.nn.Module]:
    """Tiny CLIP / SigLIP image classifiers and the LLaVA base model (no LM head): classes
    whose overridden ``forward`` the :data:`RECORDING` models do not use."""
    try:
        import transformers as tf
    except ImportError:
        return []
    out = []
    for kind, tower in (("CLIP", "hf_clip:ViT-B-32"), ("Siglip", "hf_siglip:base-patch16-224")):
        vision = build_model(tower, None, "cpu", torch.float32, "image").config.to_dict()
        cfg = getattr(tf, f"{kind}Config")(vision_config=vision, num_labels=3)
        out.append(patch(getattr(tf, f"{kind}ForImageClassification")(cfg).eval(), merge_r=2))
    base = build_model("llava:tiny", None, "cpu", torch.float32, "image").model
    out.append(patch(base.eval(), visual_keep=8))
    return out


def recording_models() -> list[torch.nn.Module]:
    """The :data:`RECORDING` models and the BERT family, patched (a library that is not
    installed is left out)."""
    models = []
    for name, tower, settings in RECORDING:
        try:
            model = build_model(name, None, "cpu", torch.float32, tower)
        except ModelBuildError as e:
            print(f"left out {name} ({tower}): {e}")
            continue
        try:
            models.append(patch(model, **settings))
        except UnsupportedModelError as e:  # e.g. an adapter that needs newer transformers
            print(f"left out {name} ({tower}): {e}")
    models += [patch(m, prune_keep=0.5, prune_layers=(1,)) for m in _bert_family()]
    models += _heads_and_bases()
    return models


def _check_settings(args: argparse.Namespace) -> dict:
    """The reducing settings of a one-model check: ``--merge-r`` in the tower, or on a
    vision-language model whose tower is not reduced (Qwen-VL, InternVL) half of each image's
    visual tokens (by received attention on Qwen's class-token-free towers)."""
    if not is_vlm(args.model) or is_llava(args.model):
        return dict(merge_r=args.merge_r)
    score = "attn" if args.model.startswith("qwen") else "cls_attn"
    return dict(visual_keep=0.5, visual_score=score)


def cmd_check(args: argparse.Namespace) -> int:
    if args.record or args.known:
        models = recording_models()
        if args.record:
            path = Path(upstream.__file__).with_name("upstream_known.py")
            upstream.write_known(upstream.record(models), path)
            print(f"recorded {upstream.versions()} in {path}")
            return 0
        bad = {k: fp for m in models for k, fp in upstream.unknown(m).items()}
        for key, fp in sorted(bad.items()):
            print(f"untested: {key} {fp}")
        print(f"{len(bad)} overridden upstream functions are not among the tested versions "
              f"(installed: {upstream.versions()})")
        return 1 if bad else 0
    model = patch(model_from_args(args), **_check_settings(args))
    result = check(model)
    print(result)
    return 0 if result.ok else 1
