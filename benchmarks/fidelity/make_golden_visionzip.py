"""Golden outputs of the original VisionZip (LLaVA-1.5 path) on a fixed tiny CLIP tower.

    PYTHONPATH=/work/ref_deps python benchmarks/fidelity/make_golden_visionzip.py \
        --visionzip /work/.mirror/dvlab-research+VisionZip/repo --out tests/golden/

``--visionzip`` is a checkout, or a bare git mirror (read with ``git archive``), of
https://github.com/dvlab-research/VisionZip. Its ``visionzip`` package is extracted into a
temporary folder and imported from there (nothing of it is copied into this project); the
reference patches transformers 4.x's ``CLIPAttention`` / ``CLIPEncoderLayer`` (it calls
``self._shape`` and takes ``causal_attention_mask``), so run it with transformers 4.37.2 on
``PYTHONPATH`` (``pip install --target /work/ref_deps --no-deps transformers==4.37.2
tokenizers==0.15.2 huggingface_hub==0.20.3 requests``; LLaVA-1.5's own pin).

The reference runs exactly as its README says: ``visionzip(model, dominant=D, contextual=C)``
(which stores ``D - 1`` patches as ``dominant``: the class token is the D-th dominant token),
then LLaVA's ``CLIPVisionTower.forward`` (replaced by ``CLIPVisionTower_VisionZip.forward``)
on a batch of images. ``model`` is a stand-in with ``model.model.vision_tower.vision_tower``:
the seeded tiny tower of ``tiny_clip.py`` (LLaVA-1.5 geometry: 576 patches, 24 layers). The
``llava`` package the reference imports is stubbed (constants, ``get_anyres_image_grid_shape``,
the classes whose methods ``visionzip()`` replaces): nothing of it runs on this path.

Written to ``visionzip_llava15.npz``, per setting ``D+C`` (54+10 and 108+20): ``idx_<D>``
(images, D: VisionZip's ``all_indices``, the class token 0 then the top patches, best
first), ``tokens_<D>`` (images, D + C, 32: the tokens handed to the projector, dominant then
contextual), and ``hidden_head`` (images, 4, 32: the first rows of the unpatched tower's
``hidden_states[-2]``, to check the tests build the same tower).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_clip  # noqa: E402
from golden_assets import git_commit  # noqa: E402

REPO_URL = "https://github.com/dvlab-research/VisionZip"
SETTINGS = ((54, 10), (108, 20))
ADAPTATIONS = [
    "the llava package (LLaVA's repository) is not installed: stub modules give what "
    "visionzip/__init__.py and main.py import (llava.constants, llava.mm_utils."
    "get_anyres_image_grid_shape, llava.model.multimodal_encoder.clip_encoder.CLIPVisionTower, "
    "llava.model.llava_arch.LlavaMetaForCausalLM); only CLIPVisionTower.forward, replaced by "
    "the reference, runs",
    "the stand-in CLIPVisionTower holds the tiny tower as .vision_tower and gives .device / "
    ".dtype as LLaVA's does",
]

_STUBS = {
    "llava/__init__.py": "",
    "llava/constants.py": """
        IGNORE_INDEX = -100
        IMAGE_TOKEN_INDEX = -200
        DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
        DEFAULT_IM_START_TOKEN = "<im_start>"
        DEFAULT_IM_END_TOKEN = "<im_end>"
        """,
    "llava/mm_utils.py": """
        def get_anyres_image_grid_shape(*args, **kwargs):
            raise NotImplementedError("stub: anyres is not on the golden path")
        """,
    "llava/model/__init__.py": "",
    "llava/model/multimodal_encoder/__init__.py": "",
    "llava/model/multimodal_encoder/clip_encoder.py": """
        import torch.nn as nn

        class CLIPVisionTower(nn.Module):  # stand-in of LLaVA's: the tower and its device/dtype
            def __init__(self, vision_tower):
                super().__init__()
                self.vision_tower = vision_tower

            @property
            def device(self):
                return self.vision_tower.device

            @property
            def dtype(self):
                return self.vision_tower.dtype
        """,
    "llava/model/llava_arch.py": """
        class LlavaMetaForCausalLM:
            def prepare_inputs_labels_for_multimodal(self, *args, **kwargs):
                raise NotImplementedError("stub")
        """,
}


def extract(source: Path, dest: Path, folder: str) -> str | None:
    """``folder`` of the checkout or bare mirror ``source`` into ``dest``; its commit."""
    if (source / "HEAD").is_file() and not (source / ".git").exists():  # bare mirror
        archive = subprocess.run(["git", "--git-dir", str(source), "archive", "HEAD", folder],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        out = subprocess.run(["git", "--git-dir", str(source), "rev-parse", "HEAD"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    import shutil

    shutil.copytree(source / folder, dest / folder)
    return git_commit(source)


def write_stubs(dest: Path) -> None:
    for rel, text in _STUBS.items():
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--visionzip", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("tests/golden"))
    args = ap.parse_args()
    import transformers

    torch.set_grad_enabled(False)
    tmp = Path(tempfile.mkdtemp(prefix="visionzip_ref_"))
    commit = extract(args.visionzip, tmp, "visionzip")
    write_stubs(tmp)
    sys.path.insert(0, str(tmp))

    pixels = tiny_clip.pixels()
    plain = tiny_clip.build_tower()
    hidden_head = plain(pixels, output_hidden_states=True).hidden_states[-2][:, :4]

    import visionzip  # the reference package, from tmp
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    out = {"hidden_head": hidden_head.numpy()}
    summary = {}
    for dom, ctx in SETTINGS:
        tower = CLIPVisionTower(tiny_clip.build_tower())
        model = types.SimpleNamespace(model=types.SimpleNamespace(vision_tower=tower))
        visionzip.visionzip(model, dominant=dom, contextual=ctx)
        tokens, all_indices = tower.forward(pixels)  # CLIPVisionTower_VisionZip.forward
        assert tokens.shape == (pixels.shape[0], dom + ctx, tiny_clip.CONFIG["hidden_size"])
        out[f"idx_{dom}"] = all_indices.numpy()
        out[f"tokens_{dom}"] = tokens.numpy()
        summary[f"{dom}+{ctx}"] = {"tokens": dom + ctx, "dominant_with_class_token": dom,
                                   "contextual": ctx}
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "visionzip_llava15.npz", **out)
    meta = {
        "reference": {
            "repository": REPO_URL, "commit": commit, "imported_from": str(args.visionzip),
            "code": "visionzip.visionzip(model, dominant=D, contextual=C) (visionzip/main.py), then "
                    "CLIPVisionTower_VisionZip.forward (visionzip/clip_encoder.py) on a batch of "
                    "3 images, with the reference's patched CLIPAttention / CLIPEncoderLayer "
                    "forwards (visionzip/utils.py)",
            "adaptations": ADAPTATIONS,
        },
        "tower": {"config": tiny_clip.CONFIG, "seed": tiny_clip.SEED,
                  "init": "benchmarks/fidelity/tiny_clip.py init_weights"},
        "inputs": f"tiny_clip.pixels({tiny_clip.IMAGES}, seed={tiny_clip.PIXEL_SEED})",
        "settings": summary,
        "compared": "idx_D: dominant indices (class token first, then the reference's top-k); "
                    "tokens_D: the pre-projector tokens (dominant in position order, then "
                    "contextual); vlprune's projected tokens are compared with the model's "
                    "projector applied to tokens_D",
        "tolerance": "1e-5 absolute (float32; the same tower, attention recomputed from the "
                     "layer input instead of read from the reference's forward)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
        "command": "PYTHONPATH=/work/ref_deps python benchmarks/fidelity/make_golden_visionzip.py "
                   "--visionzip <VisionZip checkout or mirror> --out tests/golden/",
    }
    (args.out / "visionzip_llava15.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(summary), "->", args.out / "visionzip_llava15.npz")


if __name__ == "__main__":
    main()
