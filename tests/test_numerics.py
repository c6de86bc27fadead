"""Numerics of the token state in low precision, normalisation epsilons, deterministic ties,
pooling with the sizes of the right forward, and the random score in training mode.

Sizes are counts: bfloat16 holds integers exactly only up to 256 (float16: 2048), so they are
kept in float32 whatever the activation dtype; the size-weighted means are summed in float32
and cast back; the proportional-attention bias is ``log(size)`` cast to the attention dtype at
use. Tolerances: a low-precision model is compared with its float32 twin by the cosine of the
logits (>= 0.99: bfloat16 has 8 significant bits, and near-ties in the matching may flip);
sizes must be exact.
"""

from __future__ import annotations

import pytest
import torch

import vlprune
from vlprune.core import AttnInputs, Plan, TokenState
from vlprune.core.scores import attn_entropy, cls_attn_vnorm
from vlprune.core.select import prune_plan
from vlprune.core.visual import select_visual
from vlprune.merging import bipartite_soft_matching

timm = pytest.importorskip("timm")

LOW = (torch.bfloat16, torch.float16)


# ---- plans in low precision -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW)
def test_plan_sizes_stay_exact_counts_beyond_256(dtype):
    """One token absorbing 600 others: its size is 601 (bfloat16 would stop counting at 256)
    and it is the mean of what it holds, summed in float32."""
    g = torch.Generator().manual_seed(0)
    B, N, C = 2, 700, 8
    x = torch.randn(B, N, C, generator=g)
    keep = torch.tensor([[0, 650, 651]] * B)
    src = torch.arange(1, 601).expand(B, 600)
    plan = Plan(keep=keep, src=src, dst=torch.zeros_like(src), num_tokens=N)
    out, size = plan.apply(x.to(dtype))
    assert size.dtype == torch.float32
    assert size[:, :, 0].tolist() == [[601.0, 1.0, 1.0]] * B
    expected = x[:, :601].mean(dim=1)
    torch.testing.assert_close(out[:, 0].float(), expected, atol=1e-2, rtol=1e-2)
    assert out.dtype == dtype
    # a second merge of two big groups: 601 + 1 + 1, still exact
    plan2 = Plan(keep=torch.tensor([[0]] * B), src=torch.tensor([[1, 2]] * B),
                 dst=torch.zeros(B, 2, dtype=torch.long), num_tokens=3)
    _, size2 = plan2.apply(out, size)
    assert size2[:, 0, 0].tolist() == [603.0] * B


def test_token_state_keeps_float32_sizes_and_bias_in_attention_dtype():
    B, N, C = 1, 520, 4
    x = torch.randn(B, N, C).bfloat16()
    state = TokenState(num_protected=1, trace_source=True)
    src = torch.arange(2, 400).expand(B, -1)
    plan = Plan(keep=torch.tensor([[0, 1, 400, 401]]), src=src, dst=torch.ones_like(src), num_tokens=N)
    x = state.compact(plan, x)
    assert state.size.dtype == torch.float32 and state.size[0, 1, 0].item() == 399.0
    bias = state.attn_bias(torch.bfloat16)
    assert bias.dtype == torch.bfloat16
    assert torch.equal(bias, torch.log(state.size).transpose(1, 2).unsqueeze(1).bfloat16())
    assert state.source.dtype == torch.float32
    assert torch.equal(state.source.sum(-1, keepdim=True), state.size)


def test_fused_token_sums_in_float32():
    """EViT's fused token (weighted sum of every dropped token) is summed in float32."""
    g = torch.Generator().manual_seed(2)
    B, N, C = 1, 1000, 4
    x = torch.randn(B, N, C, generator=g)
    scores = torch.rand(B, N, generator=g)
    plan = prune_plan(scores, 10, 1, mode="fuse", fuse_weight=scores)
    out32, size32 = plan.apply(x)
    out16, size16 = plan.apply(x.bfloat16())
    assert size16.dtype == torch.float32 and torch.equal(size16, size32)
    assert size32[0, -1, 0].item() == N - 11
    # the only error left is the rounding of the inputs and of the result to bfloat16
    torch.testing.assert_close(out16[0, -1].float(), out32[0, -1], atol=0.05, rtol=1e-2)


# ---- normalisations ------------------------------------------------------------------------------


def test_bipartite_matching_with_zero_keys_has_no_nan():
    """All-zero keys (dead features, zero padding) have similarity 0, not NaN: every A token
    still finds its partner among the nonzero B tokens."""
    B, N, C = 1, 8, 4
    metric = torch.zeros(B, N, C)
    metric[:, 0::2] = torch.tensor([1.0, 0.2, 0.0, 0.0])  # A tokens
    metric[:, 5] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # the one nonzero B token
    plan = bipartite_soft_matching(metric, 2)
    out_pos_of_5 = plan.keep[0].tolist().index(5)
    assert plan.dst[0].tolist() == [out_pos_of_5] * 2
    assert plan.src[0].tolist() == [0, 2]  # equal similarities: the earlier A tokens first


def test_scores_are_finite_on_degenerate_inputs():
    B, H, N, D = 2, 2, 16, 8
    q = torch.randn(B, H, N, D)
    k = torch.randn(B, H, N, D)
    a = AttnInputs(q, k, torch.zeros(B, H, N, D), scale=D**-0.5)  # all values zero
    assert torch.isfinite(cls_attn_vnorm(a)).all()
    # float16 attention rows with exact zeros: the entropy is taken in float32
    peaked = AttnInputs((q * 50).half(), (k * 50).half(), k.half(), scale=D**-0.5)
    ent = attn_entropy(peaked)
    assert torch.isfinite(ent).all()
    ref = attn_entropy(AttnInputs((q * 50).half().float(), (k * 50).half().float(), k, scale=D**-0.5))
    torch.testing.assert_close(ent, ref, atol=1e-3, rtol=1e-3)


# ---- deterministic ties ----------------------------------------------------------------------------


def test_prune_ties_keep_the_earlier_tokens_in_every_batch_layout():
    N, P, keep = 300, 1, 100
    scores = torch.zeros(1, N)
    scores[0, 250:] = 1.0  # 50 clear winners, then ties among the rest
    plan = prune_plan(scores, keep, P)
    expected = [0, *range(1, 51), *range(250, 300)]
    assert plan.keep[0].tolist() == expected
    # the same row inside a bigger batch, at another place, gives the same choice
    batch = torch.cat([torch.rand(3, N), scores, torch.rand(2, N)])
    assert prune_plan(batch, keep, P).keep[3].tolist() == expected


def test_visual_select_ties_keep_the_earlier_tokens():
    scores = torch.zeros(500)
    scores[400:] = 2.0
    kept = select_visual(scores, 150)
    assert kept.tolist() == [*range(50), *range(400, 500)]


def test_bipartite_ties_merge_the_earlier_tokens():
    B, N, C = 1, 401, 4
    metric = torch.ones(B, N, C)  # every pair equally similar
    plan = bipartite_soft_matching(metric, 150, 1)
    assert plan.src[0].tolist() == [2 * i for i in range(1, 151)]


# ---- models in low precision ---------------------------------------------------------------------

# one token ends holding > 256 inputs: 785 tokens, 2 % kept at layer 1, the rest recycled
HEAVY = dict(prune_keep=0.02, prune_layers=(1,), prune_recycle=True, merge_r=[0, 0, 4, 4, 4, 4])


def _vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", img_size=224, patch_size=8, global_pool="avg").eval()


def _heavy_pair(dtype):
    ref, low = _vit(), _vit()
    low.load_state_dict(ref.state_dict())
    vlprune.patch(ref, trace_source=True, **HEAVY)
    vlprune.patch(low.to(dtype), trace_source=True, **HEAVY)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return ref, low, x


def _check_exact_sizes(model, n0=785):
    state = model._vlprune.state
    assert state.size.dtype == torch.float32
    assert torch.equal(state.size, state.size.round())
    assert state.size.sum(dim=1).flatten().tolist() == [float(n0)] * state.size.shape[0]
    assert state.size.max().item() > 256  # the case bfloat16 cannot count
    source = vlprune.get_source(model)
    assert source.dtype == torch.float32
    assert torch.equal(source.sum(dim=-1, keepdim=True), state.size)


@pytest.mark.parametrize("dtype", LOW)
def test_heavy_merging_in_low_precision_keeps_exact_sizes(dtype):
    ref, low, x = _heavy_pair(dtype)
    with torch.no_grad():
        expected = ref(x)
        try:
            out = low(x.to(dtype))
        except RuntimeError as e:  # no CPU kernel for this dtype in this torch
            pytest.skip(f"{dtype} forward unavailable on CPU: {e}")
    assert torch.isfinite(out).all() and out.dtype == dtype
    _check_exact_sizes(low)
    assert torch.nn.functional.cosine_similarity(out.float(), expected, dim=-1).min() > 0.99


def test_heavy_merging_under_cpu_autocast():
    ref, model, x = _heavy_pair(torch.float32)
    with torch.no_grad():
        expected = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert torch.isfinite(out).all()
    _check_exact_sizes(model)
    # 785 tokens end as 3 here, so one flipped near-tie moves the output more than in bfloat16
    # weights: 0.98
    assert torch.nn.functional.cosine_similarity(out.float(), expected, dim=-1).min() > 0.98


def test_size_weighted_pool_in_bfloat16_uses_exact_sizes():
    _, low, x = _heavy_pair(torch.bfloat16)
    with torch.no_grad():
        feats = low.forward_features(x.bfloat16())
        pooled = low.pool(feats)
    # the exact counts, from the source map's 0/1 entries summed in float64
    size = vlprune.get_source(low).double().sum(dim=-1, keepdim=True)[:, 1:]
    expected = (feats[:, 1:].double() * size.double()).sum(1) / size.double().sum(1)
    assert pooled.dtype == torch.bfloat16
    # summed in float32 with exact sizes: the exact mean rounded once to bfloat16 (a float32
    # sum may cross a rounding boundary only rarely)
    same = pooled == expected.to(torch.bfloat16)
    assert same.float().mean() >= 0.98, (pooled.double() - expected).abs().max()


# ---- pooling with the sizes of another forward ---------------------------------------------------


def test_pool_refuses_tokens_from_another_forward():
    model = _vit()
    vlprune.patch(model, merge_r=8)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        model.forward_features(x[:2])  # the latest forward: 2 images
        with pytest.raises(RuntimeError, match="latest forward"):
            model.forward_head(feats)
        vlprune.configure(model, merge_r=20)
        model.forward_features(x)  # 3 images, fewer tokens
        with pytest.raises(RuntimeError, match="latest forward"):
            model.forward_head(feats)
        # the right features pool fine; unreduced features pool inside disabled()
        assert model.forward_head(model.forward_features(x)).shape[0] == 3
        with vlprune.disabled(model):
            full = model.forward_features(x)
            assert model.forward_head(full).shape[0] == 3


def test_open_clip_avg_pool_refuses_tokens_from_another_forward():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(image_size=32, patch_size=4, width=32, layers=3, heads=2, mlp_ratio=2.0,
                              output_dim=16, pool_type="avg").eval()
    del open_clip
    vlprune.patch(tower, merge_r=4)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = tower.transformer(tower.ln_pre(tower.conv1(x).flatten(2).transpose(1, 2)))
        tower(x[:2])  # the latest forward: 2 images, merged
        with pytest.raises(RuntimeError, match="latest forward"):
            tower._global_pool(tokens)


# ---- the random score in training mode -----------------------------------------------------------


def _kept(model, x):
    model(x)
    src = vlprune.get_source(model)
    return (src.sum(dim=1) > 0)  # (B, N0): input tokens still held


def test_random_score_draws_anew_each_training_step_and_repeats_per_seed():
    model = _vit()
    vlprune.patch(model, prune_keep=0.5, prune_layers=(1,), prune_score="random", prune_seed=5,
                  trace_source=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        evals = [_kept(model, x) for _ in range(2)]
        assert torch.equal(evals[0], evals[1])  # eval: the same draw every forward
        model.train()
        first = [_kept(model, x) for _ in range(3)]
        assert not torch.equal(first[1], first[2]) and not torch.equal(first[0], first[1])
        model.eval()
        assert torch.equal(_kept(model, x), evals[0])  # eval is unchanged by training
        vlprune.configure(model, prune_seed=5)  # configure restarts the training sequence
        model.train()
        again = [_kept(model, x) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_step_keys_are_distinct_per_seed_and_step():
    from vlprune.core.scores import step_key

    keys = {int(step_key(seed, torch.tensor(step))) for seed in range(10) for step in range(200)}
    assert len(keys) == 10 * 200


def test_text_towers_draw_anew_in_training():
    """A padded-text tower (BERT) with the random score: each training forward draws anew
    (seeded sequence), eval forwards repeat one draw."""
    tf = pytest.importorskip("transformers")

    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = vlprune.patch(tf.BertModel(cfg), prune_keep=0.5, prune_layers=(0,), prune_score="random",
                          text_output="compact")
    ids = torch.randint(1, 100, (1, 20))
    with torch.no_grad():
        model.train()
        first, second = (model(ids).last_hidden_state for _ in range(2))
        assert not torch.allclose(first, second)
        vlprune.configure(model, prune_seed=0)  # restarts the sequence
        assert torch.equal(model(ids).last_hidden_state, first)
        model.eval()
        assert torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)


@pytest.mark.parametrize("merge_r", [0, 2])
def test_bert_compact_token_sizes_are_float32_in_bf16(merge_r):
    """``token_sizes`` of the compact output: float32 whether or not anything merged, so a
    bf16 model's counts stay exact."""
    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100)
    model = tf.BertModel(cfg).eval().to(torch.bfloat16)
    settings = dict(merge_r=merge_r) if merge_r else dict(prune_keep=0.5, prune_layers=(1,))
    vlprune.patch(model, text_output="compact", **settings)
    with torch.no_grad():
        out = model(torch.randint(1, 100, (2, 12)))
    assert out.token_sizes.dtype == torch.float32
