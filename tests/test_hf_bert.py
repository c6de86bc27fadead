"""BERT-style text encoders (transformers BertModel, RobertaModel): tiny random models, eager
and sdpa. No reduction equals upstream, unpatch is exact, per-row budgets, and a sentence's
embedding does not depend on its batch neighbours (alone, reordered, padded) for every score,
merging, and both outputs."""

from __future__ import annotations

import math

import pytest
import torch
from adapter_tester import AdapterTester, Family, Tower

import vlprune
from vlprune.core.scores import SCORE_NAMES, AttnInputs, received_attn

transformers = pytest.importorskip("transformers")

VOCAB = 60
LENGTHS = (7, 13, 4, 10)  # real tokens per row, [CLS] and [SEP] included
LAYERS = 4


def _bert(impl: str = "sdpa", **kw):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, attn_implementation=impl, **kw,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _roberta():
    cfg = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=40, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.RobertaModel(cfg).eval()


FAMILIES = {
    "bert_sdpa": (lambda: _bert("sdpa"), 0),
    "bert_eager": (lambda: _bert("eager"), 0),
    "roberta_sdpa": (_roberta, 1),
}


def _batch(lengths=LENGTHS, pad_id=0, seed=0):
    """Right-padded ids ([CLS] = 2, [SEP] = 3) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = 2, 3
        ids[i, 1 : n - 1] = torch.randint(5, VOCAB, (n - 2,), generator=g)
    mask = (torch.arange(ids.shape[1]) < torch.tensor(lengths).unsqueeze(1)).long()
    return ids, mask


def _embed(out, mask):
    """sentence-transformers mean pooling (full output) or the size-weighted mean (compact)."""
    h = out.last_hidden_state
    if "token_sizes" in out:
        w = out.token_sizes.unsqueeze(-1)
    else:
        w = mask.unsqueeze(-1).to(h.dtype)
    return (h * w).sum(1) / w.sum(1)


SETTINGS = {
    "merge": dict(merge_r=2),
    **{f"prune_{s}": dict(prune_keep=0.5, prune_layers=(1,), prune_score=s) for s in SCORE_NAMES},
    "recycle": dict(prune_keep=0.6, prune_layers=(1,), prune_recycle=True),
    "hybrid": dict(prune_keep=[0.7, 0.5], prune_layers=(0, 2), merge_r=1),
    "text_options": dict(text_prune_keep=0.5, text_prune_layers=(1,), text_prune_score="received_attn",
                         text_merge_r=1),
}


# --- the shared checks (tests/adapter_tester.py) on padded batches ----------------------------


def _inputs(pad):
    def inputs(batch, seed):
        lengths = tuple(LENGTHS[(seed + i) % len(LENGTHS)] for i in range(batch))
        ids, mask = _batch(lengths, pad_id=pad, seed=seed)
        return dict(input_ids=ids, attention_mask=mask)

    return inputs


def _real_outputs(out, inputs):
    """The real positions of the full-length output (padding positions are zero when
    reducing, upstream's values otherwise), and the pooled output."""
    return [out.last_hidden_state[inputs["attention_mask"].bool()], out.pooler_output]


def _towers(model, inputs):
    """[CLS] and the closing [SEP] are protected; the other real tokens of each row."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    return {"text": Tower(2, (mask.sum(1) - 2).tolist(), LAYERS, ids.shape[1])}


def _full_length_output(model, inputs, out, desc):
    assert out.last_hidden_state.shape == (*inputs["input_ids"].shape, 32)


COMMON = {
    "r0": dict(merge_r=0),
    "keep1": dict(prune_keep=1.0, prune_layers=(1, 2)),
    "merge": SETTINGS["merge"],
    "prune": dict(prune_keep=0.5, prune_layers=(1,)),
    "recycle": SETTINGS["recycle"],
    "hybrid": SETTINGS["hybrid"],
    "text_options": SETTINGS["text_options"],
}


class TestBertCommon(AdapterTester):
    families = {
        name: Family(
            build=build, inputs=_inputs(pad), settings=COMMON, identity={"r0": 0.0, "keep1": 0.0},
            towers=_towers, outputs=_real_outputs, check=_full_length_output,
            concurrency=("merge", "hybrid"),
        )
        for name, (build, pad) in FAMILIES.items()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_positions_are_upstream_when_nothing_reduces(family):
    """The shared tester compares real positions; here the padding positions too: bit-exact
    with r=0, under ``disabled`` and after ``unpatch``."""
    build, pad = FAMILIES[family]
    model = build()
    ids, mask = _batch(pad_id=pad)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        vlprune.patch(model, merge_r=0)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, ref)
        vlprune.patch(model, prune_keep=0.5, prune_layers=(1,), merge_r=1)
        with vlprune.disabled(model):
            assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, ref)
        vlprune.unpatch(model)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, ref)


@pytest.mark.parametrize("output", ["full", "compact"])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_independent_of_batch(family, setting, output):
    """Each sentence gives the same embedding (and pooled output, and tokens) alone, in a
    reordered batch and inside a padded batch."""
    build, pad = FAMILIES[family]
    model = build()
    vlprune.patch(model, text_output=output, **SETTINGS[setting])
    ids, mask = _batch(pad_id=pad)
    order = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        emb = _embed(out, mask)
        out_r = model(input_ids=ids[order], attention_mask=mask[order])
        torch.testing.assert_close(_embed(out_r, mask[order]), emb[order], atol=1e-5, rtol=1e-5)
        for i, n in enumerate(LENGTHS):
            alone = model(input_ids=ids[i : i + 1, :n])
            torch.testing.assert_close(_embed(alone, mask[i : i + 1, :n]), emb[i : i + 1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(alone.pooler_output, out.pooler_output[i : i + 1], atol=1e-5, rtol=1e-5)
            h = out.last_hidden_state[i]
            if output == "full":
                torch.testing.assert_close(alone.last_hidden_state[0], h[:n], atol=1e-5, rtol=1e-5)
                assert torch.all(h[n:] == 0)  # padding positions are zero
            else:
                k = alone.last_hidden_state.shape[1]
                assert int(out.attention_mask[i].sum()) == k
                torch.testing.assert_close(alone.last_hidden_state[0], h[:k], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(alone.token_sizes[0], out.token_sizes[i, :k])


def _expected_counts(n_real: int, keeps: dict[int, float], r: int) -> int:
    """Real tokens (protected included) a row of ``n_real`` keeps after the tiny model."""
    n = n_real - 2
    for layer in range(LAYERS):
        if layer in keeps:
            n = min(n, max(1, math.ceil(keeps[layer] * n)))  # README: ceil(keep * n), >= 1
        n -= min(r, n // 2)
    return n + 2


@pytest.mark.parametrize("recycle", [False, True])
def test_per_row_budgets_and_sizes(recycle):
    model = _bert()
    keeps = {0: 0.7, 2: 0.5}
    vlprune.patch(model, prune_keep=list(keeps.values()), prune_layers=tuple(keeps), merge_r=1,
                  prune_recycle=recycle, text_output="compact")
    ids, mask = _batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    counts = out.attention_mask.sum(1).tolist()
    assert counts == [_expected_counts(n, keeps, 1) for n in LENGTHS]
    assert out.last_hidden_state.shape[1] == max(counts)
    sizes = out.token_sizes.sum(1)
    if recycle:  # every real token is kept or merged: sizes sum to the real lengths
        assert sizes.tolist() == [float(n) for n in LENGTHS]
    else:
        assert all(s <= n for s, n in zip(sizes.tolist(), LENGTHS))  # pruned tokens are gone
        assert sizes[1] < LENGTHS[1]
    assert torch.all(out.token_sizes[out.attention_mask == 0] == 0)


def test_compact_sizes_sum_to_lengths_and_full_matches_compact():
    """Merging only: compact sizes sum to the real lengths, and the full output's masked mean
    equals the compact size-weighted mean (each position holds its merged token's value)."""
    model = _bert()
    ids, mask = _batch()
    with torch.no_grad():
        vlprune.patch(model, merge_r=2, text_output="compact")
        compact = model(input_ids=ids, attention_mask=mask)
        vlprune.configure(model, text_output="full")
        full = model(input_ids=ids, attention_mask=mask)
    assert compact.token_sizes.sum(1).tolist() == [float(n) for n in LENGTHS]
    assert full.last_hidden_state.shape == (*ids.shape, 32)
    torch.testing.assert_close(_embed(full, mask), _embed(compact, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.pooler_output, compact.pooler_output)


def test_full_output_keeps_pruned_values():
    """A pruned position keeps its token's output of the layer where it left. Pruning at the
    last layer therefore changes no real position of the full output (the attention saw every
    token), while the compact output holds the kept tokens only."""
    model = _bert()
    ids, mask = _batch()
    vlprune.patch(model, prune_keep=0.5, prune_layers=(LAYERS - 1,), text_output="full")
    real = mask.bool()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask)
        with vlprune.disabled(model):
            ref = model(input_ids=ids, attention_mask=mask)
        vlprune.configure(model, text_output="compact")
        compact = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(full.last_hidden_state[real], ref.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    kept = [2 + math.ceil(0.5 * (n - 2)) for n in LENGTHS]
    assert compact.attention_mask.sum(1).tolist() == kept
    # pruning earlier: pruned positions differ from the final values of every kept token
    vlprune.configure(model, prune_layers=(1,), text_output="full")
    with torch.no_grad():
        early = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(early[real], ref.last_hidden_state[real], atol=1e-3)


def test_received_attn_matches_reference():
    torch.manual_seed(0)
    B, H, N, D = 2, 3, 9, 4
    q, k = torch.randn(B, H, N, D), torch.randn(B, H, N, D)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, 6:] = False
    bias = torch.zeros(B, 1, N, N).masked_fill(~valid[:, None, None, :], float("-inf"))
    a = AttnInputs(q=q, k=k, v=k, scale=D**-0.5, bias=bias)
    p = ((q @ k.transpose(-1, -2)) * D**-0.5 + bias).softmax(-1).mean(1)  # (B, N, N)
    ref = (p * valid.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(received_attn(a, valid, chunk=4), ref)
    torch.testing.assert_close(received_attn(a, valid), ref)


def test_errors():
    model = _bert()
    ids, mask = _batch()
    vlprune.patch(model, prune_keep=0.5)
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with pytest.raises(ValueError, match="two real tokens"):
        model(input_ids=ids[:1, :1])
    with pytest.raises(ValueError, match="attention mask"):
        model(input_ids=ids, attention_mask=mask[:, None, None, :])
    with vlprune.disabled(model):  # the upstream path still gives hidden states
        assert len(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states) == LAYERS + 1
    with pytest.raises(ValueError, match="text_output"):
        vlprune.ReductionConfig(text_output="tokens")
    with pytest.raises(ValueError, match="prune_fuse"):
        vlprune.patch(_bert(), prune_keep=0.5, prune_fuse=True)
    with pytest.raises(vlprune.UnsupportedModelError, match="decoder"):
        vlprune.patch(_bert(is_decoder=True), merge_r=1)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16))
    with pytest.raises(ValueError, match="text_output"):
        vlprune.patch(clip, merge_r=1, text_output="compact")


def test_describe_and_return_dict():
    model = _bert()
    vlprune.patch(model, prune_keep=0.5, prune_layers=(1,), merge_r=1)
    rep = vlprune.describe(model, batch_size=2)
    assert "hf_bert" in str(rep)
    ids, mask = _batch()
    with torch.no_grad():
        tup = model(input_ids=ids, attention_mask=mask, return_dict=False)
        out = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(tup[0], out.last_hidden_state)
