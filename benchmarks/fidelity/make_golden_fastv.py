"""Golden prefill of the authors' FastV (inplace token dropping) on a tiny seeded Llama.

    .venv/bin/pip install --target /work/fastv_deps --no-deps tokenizers==0.13.3 \
        huggingface_hub==0.16.4 requests urllib3 idna charset_normalizer certifi
    .venv/bin/python benchmarks/fidelity/make_golden_fastv.py \
        --fastv /work/.mirror/pkunlp-icler+FastV/repo --deps /work/fastv_deps --out tests/golden/

``--fastv`` is a clone (work tree or bare mirror) of https://github.com/pkunlp-icler/FastV.
The script ``git archive``s its ``src/transformers/src/transformers`` (the authors' fork of
transformers 4.31.0, whose ``LlamaModel.forward`` holds FastV) at ``--rev`` into a temporary
folder and imports ``transformers`` from there: nothing of it is copied into this project.
That fork needs the dependency pins of 4.31 (tokenizers < 0.14, huggingface_hub < 1.0), which
``--deps`` holds (a ``pip install --target`` folder outside the repository, see above); torch
and numpy come from the running interpreter. The script must run in a fresh process (it fails
when another ``transformers`` is already imported), and it does not import vlprune.

Inputs (seeded, ``torch.manual_seed(0)``): a ``LlamaForCausalLM`` of the fork with hidden 64,
intermediate 128, 5 layers, 4 heads, 2 key/value heads (the fork's ``repeat_kv``), vocabulary
128, every parameter re-drawn (normal; q/k std 0.15 so the attention is far from uniform) and
rounded to float16 values (stored as float16, loaded exactly as float32); a LLaVA-1.5 prompt
layout: 35 system-prompt tokens (BOS and 34 text ids), 576 image tokens, 30 text tokens (641
in all, one row, no padding); the image features are ``randn(576, 64)`` rounded to float16.
The reference runs ``inputs_embeds`` (text rows: ``embed_tokens(input_ids)``, image rows: the
features), float32 on CPU, ``use_cache=False, output_attentions=True`` (as the authors'
``inference_aokvqa.py``), FastV configured as their ``eval_*_fastv_inplace.sh`` does
(``use_fast_v=True, fast_v_inplace=True``, ``fast_v_sys_length=35``,
``fast_v_image_token_length=576``, ``fast_v_attention_rank`` = kept count,
``fast_v_agg_layer`` = K). Per case ``k{K}_r{rank}`` it writes to ``fastv_llama.npz``:

* ``kept_k{K}_r{rank}``: the reference's ``keep_indexs`` (its ``position_ids`` from layer K
  on, read by a pre-hook on decoder layer K), sorted positions in the 641 tokens;
* ``scores_k{K}_r{rank}``: what the reference ranked with (layer K-1's output attention map,
  heads averaged, last row, over the 576 image tokens), for diagnosis;
* ``hidden_k{K}_r{rank}``: the final hidden states (after ``model.norm``) of every kept
  position, and ``logits_k{K}_r{rank}``: the last token's logits;

and ``weights/<name>`` (the parameters, Llama names, float16), ``input_ids`` (image positions
hold ``image_token_id``), ``image_features`` (float16), ``logits_unpruned`` (the last token's
logits with FastV off). ``fastv_llama.json`` records the source (repository, commit, file and
line numbers), the settings, what is compared, the tolerances and the margins of each cut.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO_URL = "https://github.com/pkunlp-icler/FastV"
FORK = "src/transformers/src/transformers"
MODELING = f"{FORK}/models/llama/modeling_llama.py"
SYS, N_IMG, N_TEXT = 35, 576, 30
VOCAB, IMAGE_ID, BOS = 128, 127, 1
CASES = [(2, 288), (2, 144), (3, 288), (3, 144)]  # (K, kept visual tokens): R = 50%, 75%
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=BOS, eos_token_id=2,
            tie_word_embeddings=False)


def git(repo: Path, *args: str, binary: bool = False):
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True)
    return out.stdout if binary else out.stdout.decode().strip()


def import_fork(repo: Path, rev: str, deps: Path | None, tmp: Path):
    """The authors' transformers fork, extracted from ``repo`` at ``rev`` and imported."""
    if "transformers" in sys.modules:
        raise SystemExit("transformers is already imported: run this script in a fresh process")
    data = git(repo, "archive", "--format=tar", rev, FORK, binary=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp, filter="data")
    root = tmp / Path(FORK).parent
    sys.path.insert(0, str(root))
    if deps is not None:
        sys.path.insert(1, str(deps))
    import transformers
    from transformers.models.llama import modeling_llama

    if Path(modeling_llama.__file__).resolve() != (tmp / MODELING).resolve():
        raise SystemExit(f"imported {modeling_llama.__file__}, not the fork under {tmp}")
    return transformers, modeling_llama


def draw_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter re-drawn, rounded to float16 values."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            w = 0.15 * torch.randn(p.shape, generator=g)
        elif name == "model.embed_tokens.weight":
            w = torch.randn(p.shape, generator=g)
        else:
            w = 0.1 * torch.randn(p.shape, generator=g)
        out[name] = w.half()
        with torch.no_grad():
            p.copy_(w.half().float())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fastv", type=Path, required=True, help="clone of pkunlp-icler/FastV")
    ap.add_argument("--rev", default="HEAD", help="revision of the clone to extract")
    ap.add_argument("--deps", type=Path, default=None,
                    help="folder with the fork's pinned dependencies (pip install --target)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the golden files")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    commit = git(args.fastv, "rev-parse", f"{args.rev}^{{commit}}")
    modeling_src = git(args.fastv, "show", f"{commit}:{MODELING}")
    lines = modeling_src.splitlines()
    # the inplace branch, located in the file (so the json cites the lines actually run)
    start = next(i for i, s in enumerate(lines, 1) if "if USE_FAST_V and FASTV_INPLACE:" in s)
    end = next(i for i, s in enumerate(lines, 1) if i > start and "elif USE_FAST_V:" in s) - 1
    while not lines[end - 1].strip() or lines[end - 1].strip().startswith("#"):
        end -= 1

    tmp = Path(tempfile.mkdtemp(prefix="fastv_ref_"))
    try:
        run_reference(args, commit, start, end, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_reference(args, commit: str, start: int, end: int, tmp: Path) -> None:
    transformers, modeling = import_fork(args.fastv, commit, args.deps, tmp)
    from transformers.models.llama.configuration_llama import LlamaConfig

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = LlamaConfig(**TEXT, use_fast_v=False, fast_v_inplace=True, fast_v_sys_length=SYS,
                         fast_v_image_token_length=N_IMG, fast_v_attention_rank=N_IMG,
                         fast_v_agg_layer=2)
    model = modeling.LlamaForCausalLM(config).eval()
    weights = draw_weights(model)

    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, IMAGE_ID, (SYS - 1 + N_TEXT,), generator=g)
    input_ids = torch.cat([torch.tensor([BOS]), text[:SYS - 1],
                           torch.full((N_IMG,), IMAGE_ID), text[SYS - 1:]])[None]
    image = torch.randn(N_IMG, TEXT["hidden_size"], generator=g).half()
    L = input_ids.shape[1]
    with torch.no_grad():
        embeds = model.model.embed_tokens(input_ids)
        embeds[0, SYS:SYS + N_IMG] = image.float()

    def run():
        with torch.no_grad():
            return model(inputs_embeds=embeds, use_cache=False, output_attentions=True,
                         output_hidden_states=True, return_dict=True)

    model.config.use_fast_v = False
    model.model.reset_fastv()
    plain = run()
    out: dict[str, np.ndarray] = {f"weights/{k}": v.numpy() for k, v in weights.items()}
    out.update(input_ids=input_ids[0].numpy().astype(np.int64), image_features=image.numpy(),
               logits_unpruned=plain.logits[0, -1].float().numpy())

    summary = {}
    for K, rank in CASES:
        model.config.use_fast_v = True
        model.config.fast_v_inplace = True
        model.config.fast_v_agg_layer = K
        model.config.fast_v_attention_rank = rank
        model.model.reset_fastv()
        seen = {}

        def hook(module, a, kw, seen=seen):
            seen["position_ids"] = kw["position_ids"].clone()
            seen["length"] = (a[0] if a else kw["hidden_states"]).shape[1]

        handle = model.model.layers[K].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            res = run()
        finally:
            handle.remove()
        kept = seen["position_ids"][0]
        n_kept = L - N_IMG + rank
        assert kept.shape == (n_kept,) and seen["length"] == n_kept, (kept.shape, seen["length"])
        hidden = res.hidden_states[-1][0]  # after model.norm
        assert hidden.shape[0] == n_kept
        # what the reference ranked with: layer K-1's output attention, heads averaged, last row
        scores = res.attentions[K - 1].mean(dim=1)[0, -1, SYS:SYS + N_IMG]
        top = scores.sort(descending=True).values
        want = (scores.topk(rank).indices + SYS).sort().values
        assert torch.equal(kept[SYS:SYS + rank], want)
        assert torch.equal(kept[:SYS], torch.arange(SYS))
        assert torch.equal(kept[SYS + rank:], torch.arange(SYS + N_IMG, L))
        name = f"k{K}_r{rank}"
        out[f"kept_{name}"] = kept.numpy().astype(np.int64)
        out[f"scores_{name}"] = scores.float().numpy()
        out[f"hidden_{name}"] = hidden.float().numpy()
        out[f"logits_{name}"] = res.logits[0, -1].float().numpy()
        summary[name] = {
            "K": K, "kept_visual": rank, "tokens_from_layer_K": n_kept,
            "cut_margin": float(top[rank - 1] - top[rank]),
            "cut_margin_relative": float((top[rank - 1] - top[rank]) / top[rank - 1]),
            "max_abs_logit_change_vs_unpruned": float(
                (res.logits[0, -1] - plain.logits[0, -1]).abs().max()),
        }
        print(f"K={K} rank={rank}: {n_kept} tokens from layer {K}, cut margin "
              f"{summary[name]['cut_margin']:.3e}")

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "fastv_llama.npz", **out)
    meta = {
        "reference": {
            "repository": REPO_URL,
            "commit": commit,
            "file": MODELING,
            "code": f"LlamaModel.forward, the inplace branch 'if USE_FAST_V and FASTV_INPLACE:' "
                    f"(lines {start}-{end}); ranking: layer_outputs[1] of layer K-1 (its "
                    "attention map, softmax in float32), torch.mean(dim=1)[0] (heads averaged, "
                    "batch row 0), [-1] (last row), [SYS:SYS+IMAGE] then topk(ATTENTION_RANK); "
                    "layers >= K get hidden_states[:, keep_indexs], position_ids = keep_indexs "
                    "(original positions), a fresh causal mask",
            "imported_from": f"git archive {commit} {FORK} into a temporary folder",
            "transformers_fork_version": transformers.__version__,
            "dependencies": "tokenizers 0.13.3, huggingface_hub 0.16.4 (+ requests) from --deps; "
                            "torch and numpy of the running interpreter",
            "adaptations": [],
            "notes": [
                "fast_v_attention_rank is a count: the authors' eval_*_fastv_*.sh pass 72/144/"
                "288/432, '(1-R)*N_Image_Tokens'; their HF port uses round(576*(1-R)), their "
                "lmms-eval fastv_kvcache.py int(576*ratio) (K=3, ratio 0.5 hard-coded)",
                "fast_v_sys_length is configured, not detected: 36 in their eval_*.sh, 35 in "
                "fastv_kvcache.py; here 35, where the image starts in this prompt",
                "one row only (batch row 0 ranks for all rows), no padding; the inplace branch "
                "supports no KV cache (the authors run generate with use_cache=False, "
                "output_attentions=True), so every decoding step re-ranks the whole sequence",
            ],
        },
        "model": {**TEXT, "image_token_id": IMAGE_ID, "attention": "the fork's eager "
                  "LlamaAttention (rotary cached for seq_len=1000, as the fork hard-codes)",
                  "weights": "weights/<name>: torch.manual_seed(0)-drawn, rounded to float16; "
                             "norms 1+0.1*randn, q/k 0.15*randn, embed_tokens randn, "
                             "others 0.1*randn"},
        "inputs": {
            "layout": f"BOS + {SYS - 1} text ids (system prompt, fast_v_sys_length={SYS}), "
                      f"{N_IMG} image tokens, {N_TEXT} text ids; one row, no padding",
            "input_ids": "image positions hold image_token_id",
            "inputs_embeds": "embed_tokens(input_ids), image rows replaced by image_features",
            "call": "model(inputs_embeds=..., use_cache=False, output_attentions=True, "
                    "output_hidden_states=True), float32, CPU",
        },
        "fastv": {"use_fast_v": True, "fast_v_inplace": True, "fast_v_sys_length": SYS,
                  "fast_v_image_token_length": N_IMG,
                  "cases": [{"fast_v_agg_layer": K, "fast_v_attention_rank": r}
                            for K, r in CASES]},
        "compared": {
            "kept_k{K}_r{rank}": "the kept positions, exactly (reference keep_indexs)",
            "hidden_k{K}_r{rank}": "final hidden states of every kept position (after norm)",
            "logits_k{K}_r{rank}": "last token's logits",
        },
        "tolerance": {"kept": "exact", "hidden": 1e-4, "logits": 1e-4},
        "summary": summary,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__},
        "command": "python benchmarks/fidelity/make_golden_fastv.py --fastv <FastV clone> "
                   "--deps <pinned deps folder> --out tests/golden/",
        "argv": sys.argv[1:],
    }
    (args.out / "fastv_llama.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out / 'fastv_llama.npz'} and {args.out / 'fastv_llama.json'}")


if __name__ == "__main__":
    main()
