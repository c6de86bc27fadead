"""torch.compile of patched models.

Image towers (timm ViTs, open_clip ``VisionTransformer``, HF CLIP / SigLIP vision models) with
merging, every pruning score and hybrids compile with ``fullgraph=True``: token counts are
fixed by the settings and the input size, the call state of a traced forward is a plain
attribute (no context variable), and the ``random`` score is a counter hash (no generator).
Each case checks three things that fail on a wrong implementation: ``fullgraph=True`` raises on
any graph break; ``error_on_recompile`` raises on a second compilation for a shape already
seen; compiled outputs must equal eager ones. The matrix uses the ``aot_eager`` backend (the
graph capture and AOTAutograd trace that every backend shares, seconds per case on a CPU);
one case runs through inductor.

Padded text (BERT, CLIP text towers) compiles with graph breaks: each reducing layer reads
the batch's new width, the longest row's kept count, from the attention mask (a host sync,
``Tensor.item()``). The test checks that these are the only breaks and that the compiled
model equals eager.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch._dynamo as dynamo

import vlprune

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

IMG = 96
BACKEND = "aot_eager"
PRUNE = dict(prune_keep=0.5, prune_layers=(1,))


def _open_clip():
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=IMG, patch_size=16, width=64, layers=4, heads=2,
                             mlp_ratio=2.0, output_dim=32)


def _hf(kind: str):
    common = dict(image_size=IMG, patch_size=16, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=2, attn_implementation="sdpa")
    if kind == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))


MODELS = {
    "timm": lambda: timm.create_model("test_vit", img_size=IMG),
    "timm_reg_avg": lambda: timm.create_model("test_vit2", img_size=IMG),  # no class token
    "open_clip": _open_clip,
    "hf_clip": lambda: _hf("clip"),
    "hf_siglip": lambda: _hf("siglip"),  # no class token
}

SCORES = ("cls_attn", "cls_attn_vnorm", "key_norm", "attn_entropy", "received_attn", "random")
SETTINGS = {
    "merge": dict(merge_r=4),
    "merge_ramp": dict(merge_r=(4, 0.5)),
    **{f"prune_{s}": {**PRUNE, "prune_score": s} for s in SCORES},
    "prune_two_layers": dict(prune_keep=[0.7, 0.6], prune_layers=(1, 2), prune_score="key_norm"),
    "hybrid_recycle": dict(merge_r=3, prune_keep=0.5, prune_layers=(2,), prune_recycle=True),
    "hybrid_fuse": dict(merge_r=2, prune_keep=0.6, prune_layers=(1,), prune_fuse=True),
    "prune_diversity": {**PRUNE, "prune_score": "diversity"},
}
# Every setting on the timm ViT; on the others merging, scores and a hybrid. A compilation
# costs ~5 s on a CPU, so the settings with the most state (merging, a hybrid, the random
# score) run at two batch sizes (one static graph each), the rest at one.
NO_CLASS_TOKEN = {"timm_reg_avg", "hf_siglip"}
TWO_BATCHES = {"merge", "hybrid_recycle", "prune_random"}
CASES = [("timm", s) for s in SETTINGS] + [
    (m, s)
    for m in ("open_clip", "hf_clip")
    for s in ("merge", "prune_cls_attn", "prune_random", "hybrid_recycle")
] + [
    (m, s)
    for m in sorted(NO_CLASS_TOKEN)
    for s in ("merge", "prune_attn_entropy", "prune_received_attn", "hybrid_fuse")
]


def _build(name: str, **kw):
    if name in NO_CLASS_TOKEN and "prune_keep" in kw and "prune_score" not in kw:
        kw = {**kw, "prune_score": "attn_entropy"}  # class-token scores need a class token
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    if kw:
        vlprune.patch(model, **kw)
    return model


def _x(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _out(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("model_name, setting", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_fullgraph_matches_eager_without_recompiling(model_name, setting):
    model = _build(model_name, **SETTINGS[setting])
    # one static graph per batch size (dynamic shapes would trace the batch as a symbol)
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND, dynamic=False)
    with torch.no_grad():
        for batch in (1, 3) if setting in TWO_BATCHES and model_name in ("timm", "hf_clip") else (3,):
            x = _x(batch, seed=batch)
            eager = _out(model(x))
            got = _out(compiled(x))  # compiles for this batch size
            with dynamo.config.patch(error_on_recompile=True):
                again = _out(compiled(_x(batch, seed=batch + 10)))
                eager_again = _out(model(_x(batch, seed=batch + 10)))
            torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(again, eager_again, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_inductor_fullgraph_matches_eager():
    """The default backend (inductor: generated kernels) on a hybrid with the random score."""
    model = _build("timm", merge_r=3, prune_keep=0.5, prune_layers=(2,), prune_score="random")
    x = _x(2)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_model_follows_configure_disabled_and_unpatch():
    """A compiled model never runs a stale graph: configure, ``disabled`` and unpatch change
    what the settings say, and the compiled outputs follow (a recompile is expected)."""
    model = _build("timm", merge_r=4)
    plain = _build("timm")
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    x = _x(2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
        vlprune.configure(model, merge_r=0, prune_keep=0.5, prune_layers=(1,))
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(compiled(x), plain(x), atol=1e-3)
        with vlprune.disabled(model):
            torch.testing.assert_close(compiled(x), plain(x), atol=1e-5, rtol=1e-5)
        vlprune.unpatch(model)
        torch.testing.assert_close(compiled(x), plain(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sources_after_compiled_and_eager_calls():
    """``get_source`` reads the latest forward, compiled or eager, and interleaving the two
    does not recompile."""
    model = _build("timm", merge_r=4, trace_source=True)
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    a, b = _x(2, seed=1), _x(2, seed=2)
    with torch.no_grad():
        model(a)
        eager_a = vlprune.get_source(model).clone()
        model(b)
        eager_b = vlprune.get_source(model).clone()
        assert not torch.equal(eager_a, eager_b)
        compiled(a)
        torch.testing.assert_close(vlprune.get_source(model), eager_a, atol=0, rtol=0)
        with dynamo.config.patch(error_on_recompile=True):
            model(b)
            torch.testing.assert_close(vlprune.get_source(model), eager_b, atol=0, rtol=0)
            compiled(a)
            torch.testing.assert_close(vlprune.get_source(model), eager_a, atol=0, rtol=0)


@pytest.mark.slow
def test_training_random_draws_anew_without_recompiling():
    """The random score's training steps draw anew in a compiled graph too (the step counter
    is a tensor), in the same sequence as eager training steps."""
    kw = dict(prune_keep=0.5, prune_layers=(1,), prune_score="random", trace_source=True)
    model, twin = _build("timm", **kw).train(), _build("timm", **kw).train()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    x = _x(2)
    kept, eager_kept = [], []
    with torch.no_grad():
        compiled(x)
        twin(x)
        with dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                compiled(x)
                kept.append(vlprune.get_source(model).sum(dim=1) > 0)
                twin(x)
                eager_kept.append(vlprune.get_source(twin).sum(dim=1) > 0)
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])
    assert all(torch.equal(a, b) for a, b in zip(kept, eager_kept))


@pytest.mark.slow
def test_compiled_model_serves_threads():
    """Four threads run one compiled model at once; each gets its own input's output."""
    model = _build("timm", merge_r=3, prune_keep=0.5, prune_layers=(2,), prune_recycle=True)
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    inputs = [_x(2, seed=s) for s in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
        compiled(inputs[0])
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        with torch.no_grad():
            for _ in range(3):
                results[i] = compiled(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1, 2, 3]
    for i, exp in enumerate(expected):
        torch.testing.assert_close(results[i], exp, atol=1e-5, rtol=1e-5)


# --- padded text: compiles with breaks at the width reads ---------------------------------------


def _bert_batch():
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=32, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    lengths = (7, 13, 4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (3, 13), generator=g)
    mask = (torch.arange(13) < torch.tensor(lengths)[:, None]).long()
    return model, dict(input_ids=ids * mask, attention_mask=mask)


def _clip_text_batch():
    cfg = transformers.CLIPTextConfig(vocab_size=60, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=2,
                                      max_position_embeddings=16, eos_token_id=59, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(cfg).eval()
    lengths = (7, 13, 4)
    ids = torch.zeros(3, 13, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate(lengths):
        ids[i, : n - 1] = torch.randint(1, 58, (n - 1,), generator=g)
        ids[i, n - 1] = 59
    mask = (torch.arange(13) < torch.tensor(lengths)[:, None]).long()
    return model, dict(input_ids=ids, attention_mask=mask)


TEXT = {"bert": _bert_batch, "hf_clip_text": _clip_text_batch}
TEXT_SETTINGS = {"merge": dict(merge_r=2), "prune": dict(prune_keep=0.5, prune_layers=(1,), prune_score="key_norm")}


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(TEXT_SETTINGS))
@pytest.mark.parametrize("name", list(TEXT))
def test_padded_text_compiles_breaking_only_at_width_reads(name, setting):
    model, inputs = TEXT[name]()
    vlprune.patch(model, **TEXT_SETTINGS[setting])
    from torch._dynamo.utils import counters

    counters.clear()
    with torch.no_grad():
        eager = model(**inputs).last_hidden_state
        compiled = torch.compile(model, backend=BACKEND)(**inputs).last_hidden_state
    reasons = {r.split("\n")[0] for r in counters["graph_break"]}
    assert reasons  # the width of a padded batch is data-dependent
    # host reads of data-dependent widths, and (BERT's full-length output with pruning) a
    # boolean-mask index of the tokens that left: nothing else breaks the graph
    allowed = ("Tensor.item()", "Dynamic shape operator")
    assert all(r.startswith(allowed) or "item()" in r for r in reasons), reasons
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
