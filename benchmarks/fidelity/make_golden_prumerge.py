"""Golden outputs of the original LLaVA-PruMerge and PruMerge+ on a fixed tiny CLIP tower.

    PYTHONPATH=/work/ref_deps python benchmarks/fidelity/make_golden_prumerge.py \
        --prumerge /work/.mirror/42Shawn+LLaVA-PruMerge/repo --out tests/golden/

``--prumerge`` is a checkout, or a bare git mirror (read with ``git archive``), of
https://github.com/42Shawn/LLaVA-PruMerge. Its ``llava/model/multimodal_encoder/clip_encoder.py``
is extracted into a temporary folder and imported from there as a module (nothing of it is
copied into this project); its ``CLIPVisionTower.token_prune_merge_advanced`` (PruMerge) and
``token_prune_merge_advanced_plus`` (PruMerge+, what its ``forward`` calls) run with
``if_adaptive=True`` (their default, the released setting) on the seeded tiny tower of
``tiny_clip.py`` (LLaVA-1.5 geometry: 576 patches, 24 layers, as ``layers[23]`` and the
hard-coded 575 need). The methods only hook ``q_proj`` / ``k_proj``, so any transformers
runs them; the golden files were made with transformers 4.37.2 (LLaVA-1.5's pin), the same
environment as the VisionZip ones.

One image per call: the reference pools the IQR statistics over the whole batch and its
PruMerge+ concatenates one sampled sequence to every row (it only runs at batch size 1, as
LLaVA's evaluation does). The reference's own values are recorded by wrapping its module
functions: ``outlier_dectection`` (the ratio it returns) and ``complement_idx`` (the kept
indices it is called with: top-k by class attention, then PruMerge+'s sampled ones).

Written to ``prumerge_llava15.npz``, for each method ``m`` in ``prumerge``, ``prumerge_plus``
(images concatenated): ``<m>_counts`` (images: tokens handed to the projector),
``<m>_kept_counts`` (images: kept patches), ``<m>_idx`` (the kept patch indices, in the
reference's order), ``<m>_ratio`` (images: the IQR outlier fraction), ``<m>_tokens``
(sum of counts, 32: the updated kept tokens then the extra token, per image).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_clip  # noqa: E402
from make_golden_visionzip import extract  # noqa: E402

REPO_URL = "https://github.com/42Shawn/LLaVA-PruMerge"
SOURCE = "llava/model/multimodal_encoder/clip_encoder.py"
ADAPTATIONS = [
    "clip_encoder.py imports matplotlib.pyplot at module level (never used on this path): an "
    "empty matplotlib.pyplot module is put in sys.modules when matplotlib is missing",
    "the file is imported alone (importlib, from the extracted copy), not through the llava "
    "package; CLIPVisionTower is built without __init__ (which loads pretrained weights): "
    "nn.Module.__init__, then vision_tower = the tiny tower, select_layer=-2, "
    "select_feature='patch' (LLaVA-1.5's settings), is_loaded=True",
    "outlier_dectection and complement_idx are wrapped (called through, results unchanged) to "
    "record the ratio and the kept indices",
]


def import_reference(path: Path):
    import importlib.util

    try:
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        mpl = types.ModuleType("matplotlib")
        mpl.pyplot = types.ModuleType("matplotlib.pyplot")
        sys.modules.setdefault("matplotlib", mpl)
        sys.modules.setdefault("matplotlib.pyplot", mpl.pyplot)
    spec = importlib.util.spec_from_file_location("prumerge_clip_encoder", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prumerge", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("tests/golden"))
    args = ap.parse_args()
    import transformers

    torch.set_grad_enabled(False)
    tmp = Path(tempfile.mkdtemp(prefix="prumerge_ref_"))
    commit = extract(args.prumerge, tmp, SOURCE)
    ref = import_reference(tmp / SOURCE)

    record = {}
    outlier, complement = ref.outlier_dectection, ref.complement_idx

    def outlier_rec(attn):
        record["ratio"] = outlier(attn)
        return record["ratio"]

    def complement_rec(idx, dim):
        record["idx"] = idx.clone()
        return complement(idx, dim)

    ref.outlier_dectection, ref.complement_idx = outlier_rec, complement_rec

    tower = ref.CLIPVisionTower.__new__(ref.CLIPVisionTower)
    torch.nn.Module.__init__(tower)
    tower.vision_tower = tiny_clip.build_tower()
    tower.select_layer, tower.select_feature, tower.is_loaded = -2, "patch", True

    pixels = tiny_clip.pixels()
    out, summary = {}, {}
    for name, method in (("prumerge", tower.token_prune_merge_advanced),
                         ("prumerge_plus", tower.token_prune_merge_advanced_plus)):
        counts, kept, idxs, ratios, toks = [], [], [], [], []
        for j in range(pixels.shape[0]):
            record.clear()
            feats = method(pixels[j:j + 1], if_adaptive=True, reduction_ratio=1 / 8)
            idx = record["idx"][0]
            assert feats.shape[1] == idx.shape[0] + 1
            counts.append(feats.shape[1])
            kept.append(idx.shape[0])
            idxs.append(idx.numpy())
            ratios.append(record["ratio"])
            toks.append(feats[0].numpy())
        out[f"{name}_counts"] = np.array(counts)
        out[f"{name}_kept_counts"] = np.array(kept)
        out[f"{name}_idx"] = np.concatenate(idxs)
        out[f"{name}_ratio"] = np.array(ratios)
        out[f"{name}_tokens"] = np.concatenate(toks)
        summary[name] = {"tokens_per_image": counts, "ratios": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "prumerge_llava15.npz", **out)
    meta = {
        "reference": {
            "repository": REPO_URL, "commit": commit, "imported_from": str(args.prumerge),
            "code": f"{SOURCE}: CLIPVisionTower.token_prune_merge_advanced (PruMerge) and "
                    "token_prune_merge_advanced_plus (PruMerge+), if_adaptive=True, one image per "
                    "call",
            "adaptations": ADAPTATIONS,
        },
        "tower": {"config": tiny_clip.CONFIG, "seed": tiny_clip.SEED,
                  "init": "benchmarks/fidelity/tiny_clip.py init_weights"},
        "inputs": f"tiny_clip.pixels({tiny_clip.IMAGES}, seed={tiny_clip.PIXEL_SEED}), one image a call",
        "settings": {"if_adaptive": True, "select_layer": -2, "select_feature": "patch",
                     "hooked_layer": 23, "knn": 32},
        "summary": summary,
        "compared": "ratio (IQR outlier fraction), counts (tokens per image), idx (kept patch "
                    "indices in the reference's order: top-k by class attention best first, then "
                    "PruMerge+'s sampled ones ascending), tokens (pre-projector: updated kept "
                    "tokens then the extra token); vlprune's projected tokens are compared with "
                    "the model's projector applied to tokens",
        "tolerance": "counts, ratios and indices exact; tokens 1e-5 absolute + 1e-5 relative "
                     "(float32; the tower's hidden states differ by ~5e-6 between transformers "
                     "4.37 and 5)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
        "command": "PYTHONPATH=/work/ref_deps python benchmarks/fidelity/make_golden_prumerge.py "
                   "--prumerge <LLaVA-PruMerge checkout or mirror> --out tests/golden/",
    }
    (args.out / "prumerge_llava15.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(summary), "->", args.out / "prumerge_llava15.npz")


if __name__ == "__main__":
    main()
