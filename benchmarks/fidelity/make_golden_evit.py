"""Golden outputs of the original EViT implementation: one pruning/fusion step and ViT-Ti logits.

    python benchmarks/fidelity/make_golden_evit.py --evit /tmp/evit \
        --assets $VLPRUNE_ASSETS --out tests/golden/

``--evit`` is a checkout (or ``git archive``) of https://github.com/youweiliang/evit; its
``evit.py`` is imported from there (nothing of it is copied into this project). Two parts:

* the step: the reference ``Block(dim=192, num_heads=3, keep_rate=0.7, fuse_token=True)``
  (seeded init) runs on seeded tokens of ViT-Ti shape (B=2, N=197, C=192). Hooks read the
  reference's own values: the attention module's outputs (its class attention, heads
  averaged, and its top-k indices) and the sequence the block hands to its MLP (class token,
  kept tokens, the fused token last). Written to ``evit_step.npz``: ``x`` (the tokens the
  pruning sees: block input plus the attention branch), ``cls_attn`` (B, N-1, the class
  token's attention to every other token), ``idx`` (the reference's top-k, best first, into
  the N-1 non-class tokens), ``kept`` (the same as sorted positions in the N tokens),
  and ``fused`` (B, C, the extra token; the script checks that the rest of the pruned
  sequence is the class token and ``x`` at ``idx``);
* the model (``--assets``): AugReg ViT-Ti/16 weights loaded into the reference ``EViT``
  model (keep 0.7 at layers 3, 6, 9, ``fuse_token=True``), classifying the first ``--images``
  images of ``imagenet-sample/labels.csv`` (file names sorted) with timm's eval transform.
  Written to ``evit_vit_ti.npz``: ``files``, ``labels``, ``logits`` (images x 1000, one
  batch) and ``logits_unpatched`` (the same weights in timm's own model).

``evit_step.json`` / ``evit_vit_ti.json`` say where the numbers come from (repository, commit,
versions, the command, the adaptations). It uses only timm, torch, numpy, PIL and the EViT
checkout: not vlprune.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from golden_assets import MODEL, git_commit, load_images, load_timm_model

REPO_URL = "https://github.com/youweiliang/evit"
KEEP = 0.7
LAYERS = (3, 6, 9)
ADAPTATIONS = [
    "helpers.py imports torchprofile (used only by its get_macs, never called here); the "
    "script puts an empty torchprofile module in sys.modules before importing evit",
    "evit.py's timm imports (timm.models.helpers, timm.models.layers, timm.models.registry) "
    "work unchanged with timm 1.0.31 (deprecation warnings only); its @register_model "
    "entries overwrite timm's deit_* names in this process only (timm's ViT is built first)",
]


def import_evit(checkout: Path):
    """The reference ``evit`` module, imported from ``checkout``."""
    sys.modules.setdefault("torchprofile", types.ModuleType("torchprofile"))
    sys.modules["torchprofile"].profile_macs = None
    sys.path.insert(0, str(checkout.resolve()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import evit
    path = Path(evit.__file__).resolve()
    if checkout.resolve() not in path.parents:
        raise SystemExit(f"imported evit from {path}, not from {checkout}")
    return evit


def run_step(evit, seed: int) -> dict[str, np.ndarray]:
    """One reference block at keep 0.7 with fusion, on seeded ViT-Ti-shaped tokens."""
    torch.manual_seed(seed)
    B, N, C, H = 2, 197, 192, 3
    block = evit.Block(dim=C, num_heads=H, qkv_bias=True, keep_rate=KEEP, fuse_token=True).eval()
    with torch.no_grad():  # seeded weights large enough for a peaked class attention
        for p in block.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.05)
        x_in = torch.randn(B, N, C)
    seen: dict[str, object] = {}
    h1 = block.attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o))
    h2 = block.norm2.register_forward_pre_hook(lambda m, i: seen.__setitem__("out", i[0]))
    with torch.no_grad():
        block(x_in)
    h1.remove()
    h2.remove()
    tmp, _, idx, cls_attn, left = seen["attn"]
    out = seen["out"]
    assert out.shape == (B, 1 + left + 1, C), out.shape
    x = x_in + tmp  # Block.forward: x = x + drop_path(tmp), drop_path the identity here
    # the reference's pruned sequence: class token, x at its top-k (best first), fused token
    kept_ref = torch.cat([x[:, :1], x[:, 1:].gather(1, idx.unsqueeze(-1).expand(-1, -1, C))], 1)
    assert torch.equal(out[:, :-1], kept_ref)
    return {
        "x": x.numpy(),
        "cls_attn": cls_attn.numpy(),
        "idx": idx.numpy().astype(np.int64),
        "kept": (idx.sort(dim=1).values + 1).numpy().astype(np.int64),
        "fused": out[:, -1].numpy(),
        "keep_rate": np.array(KEEP),
    }


def reference_vit_ti(evit, state_dict: dict):
    """The reference ``EViT`` model (keep ``KEEP`` at ``LAYERS``, fusion on) with the ViT-Ti
    weights ``state_dict`` (timm keys), in eval mode."""
    keep_rate = tuple(KEEP if i in LAYERS else 1.0 for i in range(12))
    ref = evit.EViT(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4,
                    qkv_bias=True, keep_rate=keep_rate, fuse_token=True)
    missing, unexpected = ref.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not fit the reference model: {missing} {unexpected}")
    return ref.eval()


def run_model(evit, assets: Path, count: int) -> tuple[dict[str, np.ndarray], dict]:
    timm_model, sd = load_timm_model(assets)
    files, images, labels = load_images(assets, timm_model, count)
    ref = reference_vit_ti(evit, sd)
    with torch.no_grad():
        plain = timm_model(images).float()
        _, left, _ = ref.forward_features(images)
        logits = ref(images).float()
    tokens = int(left[-1]) + 1  # left_tokens excludes the class token
    top1 = logits.argmax(-1)
    summary = {
        "tokens_out": tokens,
        "tokens_per_layer": [int(n) + 1 for n in left],
        "top1_correct": int((top1 == labels).sum()),
        "top1_correct_unpatched": int((plain.argmax(-1) == labels).sum()),
        "max_abs_diff_vs_unpatched": float((logits - plain).abs().max()),
    }
    arrays = {
        "files": np.array(files),
        "labels": labels.numpy().astype(np.int64),
        "logits": logits.numpy(),
        "logits_unpatched": plain.numpy(),
        "tokens": np.array(tokens, dtype=np.int64),
    }
    return arrays, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--evit", type=Path, required=True, help="checkout of youweiliang/evit")
    ap.add_argument("--assets", type=Path, default=None,
                    help="the shared assets folder (without it, only the step golden)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the golden files")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commit", default=None,
                    help="commit of the checkout when it is not a git work tree (e.g. an archive)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    evit = import_evit(args.evit)
    commit = args.commit or git_commit(args.evit)
    if commit is None:
        raise SystemExit(f"{args.evit} is not a git work tree: pass --commit")
    torch.set_num_threads(args.threads)
    import timm

    reference = {
        "repository": REPO_URL,
        "commit": commit,
        "imported_from": str(Path(evit.__file__).resolve().parent),
        "adaptations": ADAPTATIONS,
    }
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    }
    command = ("python benchmarks/fidelity/make_golden_evit.py --evit <EViT checkout> "
               "--assets $VLPRUNE_ASSETS --out tests/golden/"
               + (f" --commit {args.commit}" if args.commit else ""))
    args.out.mkdir(parents=True, exist_ok=True)

    step = run_step(evit, args.seed)
    np.savez_compressed(args.out / "evit_step.npz", **step)
    meta = {
        "reference": {**reference, "code": "evit.Block(dim=192, num_heads=3, qkv_bias=True, "
                      f"keep_rate={KEEP}, fuse_token=True).forward, eval mode"},
        "inputs": f"torch.manual_seed({args.seed}); block parameters re-drawn N(0, 0.2) "
                  "(matrices) / N(0, 0.05) (vectors); x_in = randn(2, 197, 192)",
        "outputs": "x: tokens the pruning sees (x_in + attention branch); cls_attn: class "
                   "attention to the 196 other tokens, heads averaged; idx: reference top-k "
                   "(best first, into the 196); kept: sorted positions in the 197 tokens; "
                   "fused: the extra token (the rest of the reference's pruned sequence is the "
                   "class token and x at idx, checked)",
        "summary": {
            "kept_tokens": int(step["kept"].shape[1]),
            "dropped_attention_mass": [
                float(step["cls_attn"][b].sum() - step["cls_attn"][b][step["idx"][b]].sum())
                for b in range(2)
            ],
        },
        "versions": versions,
        "command": command,
        "argv": sys.argv[1:],
    }
    (args.out / "evit_step.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"step: kept {step['kept'].shape[1]} of 196, dropped attention mass "
          f"{meta['summary']['dropped_attention_mass']}")

    if args.assets is None:
        return
    arrays, summary = run_model(evit, args.assets, args.images)
    np.savez_compressed(args.out / "evit_vit_ti.npz", **arrays)
    meta = {
        "reference": {**reference, "code": "evit.EViT(patch_size=16, embed_dim=192, depth=12, "
                      "num_heads=3, qkv_bias=True, keep_rate=<0.7 at layers 3, 6, 9, else 1>, "
                      "fuse_token=True), eval mode"},
        "model": MODEL,
        "weights": f"$VLPRUNE_ASSETS/{MODEL}/{MODEL}.npz: timm's state dict, loaded into the "
                   "reference EViT (every key fits) and into timm's model",
        "images": {
            "folder": "$VLPRUNE_ASSETS/imagenet-sample",
            "selection": f"first {len(arrays['files'])} file names of labels.csv, sorted",
            "transform": "timm create_transform(**resolve_data_config({}, model=model)), eval",
        },
        "keep_rate": KEEP,
        "prune_layers": list(LAYERS),
        "logits": "logits: reference EViT(images); logits_unpatched: timm model(images); all "
                  "images in one batch, float32, CPU; tokens: tokens leaving the last block",
        "summary": summary,
        "versions": versions,
        "command": command,
        "argv": sys.argv[1:],
    }
    (args.out / "evit_vit_ti.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"model: {summary}")
    print(f"wrote {args.out}/evit_step.* and {args.out}/evit_vit_ti.*")


if __name__ == "__main__":
    main()
