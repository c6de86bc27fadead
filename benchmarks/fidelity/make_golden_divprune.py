"""Golden picks of the original DivPrune selection on seeded LLaVA-1.5-shaped visual tokens.

    python benchmarks/fidelity/make_golden_divprune.py --divprune /tmp/divprune \
        --out tests/golden/

``--divprune`` is a checkout (or ``git archive`` export, then give ``--commit``) of
https://github.com/vbdi/divprune. The selection lives in two methods of
``LLaVA/llava/model/llava_arch.py`` (``pairwise_cosine_similarity`` and ``DivPrune``), whose
module imports the whole LLaVA package; the script parses that file, compiles those two
methods alone (unchanged source) and calls them, so nothing of them is part of vlprune.

Inputs: 576 projected visual tokens of width 64 (LLaVA-1.5's 24 x 24 grid), seeded: 48
cluster centres plus noise, so that the diverse subset is not simply every token. DivPrune
picks ``int(round(ratio * 576))`` tokens (its ``SUBSET_RATIO``) for each ratio; the golden
file holds ``feats``, and per ratio the picks in DivPrune's order (``picks_<ratio>``).
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import sys
import types
from pathlib import Path

import numpy as np
import torch
from golden_assets import git_commit

REPO_URL = "https://github.com/vbdi/divprune"
SOURCE = "LLaVA/llava/model/llava_arch.py"
METHODS = ("pairwise_cosine_similarity", "DivPrune")
RATIOS = (0.098, 0.25, 0.5)


def load_divprune(checkout: Path):
    """An object with the reference's two methods bound, compiled from ``SOURCE``."""
    path = checkout / SOURCE
    tree = ast.parse(path.read_text(), filename=str(path))
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in METHODS:
            found[node.name] = node
    if set(found) != set(METHODS):
        raise SystemExit(f"{path} lacks {sorted(set(METHODS) - set(found))}")
    module = ast.Module(body=[found[n] for n in METHODS], type_ignores=[])
    namespace: dict = {"torch": torch}
    exec(compile(module, str(path), "exec"), namespace)
    ref = types.SimpleNamespace()
    for name in METHODS:
        setattr(ref, name, types.MethodType(namespace[name], ref))
    return ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--divprune", type=Path, required=True, help="checkout of vbdi/divprune")
    ap.add_argument("--out", type=Path, required=True, help="folder for the golden files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commit", default=None,
                    help="commit of the checkout when it is not a git work tree (e.g. an archive)")
    args = ap.parse_args()
    commit = args.commit or git_commit(args.divprune)
    if commit is None:
        raise SystemExit(f"{args.divprune} is not a git work tree: pass --commit")
    ref = load_divprune(args.divprune)

    g = torch.Generator().manual_seed(args.seed)
    n, width, clusters = 576, 64, 48
    centres = torch.randn(clusters, width, generator=g)
    member = torch.randint(0, clusters, (n,), generator=g)
    feats = centres[member] + 0.6 * torch.randn(n, width, generator=g)

    out = {"feats": feats.numpy()}
    counts = {}
    for ratio in RATIOS:
        picks, _ = ref.DivPrune(feats, n, None, threshold_ratio=ratio)
        assert len(set(picks.tolist())) == len(picks), "the reference picked a token twice"
        out[f"picks_{ratio}"] = picks.numpy().astype(np.int64)
        counts[str(ratio)] = int(picks.numel())
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "divprune_llava15.npz", **out)
    meta = {
        "reference": {"repository": REPO_URL, "commit": commit, "file": SOURCE,
                      "code": "LlavaMetaForCausalLM.DivPrune(visual_tokens, 576, None, "
                              "threshold_ratio=ratio) and pairwise_cosine_similarity, compiled "
                              "from the file unchanged and called with a stand-in self"},
        "inputs": f"torch.Generator().manual_seed({args.seed}); 48 centres randn(48, 64); "
                  "member = randint(0, 48, (576,)); feats = centres[member] + 0.6 * randn(576, 64)",
        "outputs": "picks_<ratio>: the reference's picks, in pick order, int(round(ratio * 576)) "
                   "of them",
        "counts": counts,
        "compared": "vlprune.core.scores.diversity_order and the LLaVA visual_score='diversity' "
                    "selection must pick the same tokens in the same order (exact)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__},
        "command": "python benchmarks/fidelity/make_golden_divprune.py --divprune <checkout> "
                   "--out tests/golden/" + (f" --commit {args.commit}" if args.commit else ""),
        "argv": sys.argv[1:],
    }
    (args.out / "divprune_llava15.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"picks per ratio: {counts}")


if __name__ == "__main__":
    main()
