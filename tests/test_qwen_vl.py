"""Qwen2.5-VL and Qwen3-VL: visual tokens reduced before the language model with their M-RoPE
positions kept, on tiny random models (dynamic image sizes, windowed / full-attention towers,
DeepStack, videos, left-padded batches)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import model_fixtures

import vlprune

transformers = pytest.importorskip("transformers")

from vlprune.models import ModelBuildError  # noqa: E402
from vlprune.models_qwen import build_qwen2_5_vl, build_qwen3_vl, dummy_inputs  # noqa: E402

FAMILIES = ("qwen2.5-vl", "qwen3-vl")
IMAGE, VIDEO, START, END = 250, 251, 252, 253
PAD = 0
PATCH_DIM = 3 * 2 * 4 * 4  # channels x temporal patch x patch x patch
SCORES = ("attn", "text", "diversity", "random")
# rows: text runs ("t", n), images ("img", h, w) and videos ("vid", t, h, w) in patches
R_IMG = (("t", 3), ("img", 6, 8), ("t", 4))  # 12 merged tokens, several windows
R_TWO = (("t", 2), ("img", 4, 4), ("t", 1), ("img", 4, 6), ("t", 3))  # 4 + 6 tokens
R_VID = (("t", 2), ("vid", 2, 4, 4), ("t", 3))  # 2 frames of 4 tokens
R_TXT = (("t", 6),)
R_SMALL = (("t", 5), ("img", 4, 4), ("t", 2))
MIXED = (R_IMG, R_TWO, R_VID, R_TXT)
# float32: a row's logits in a padded batch against the same prompt alone, at its positions
ROW_ATOL = 1e-5


def _build(family: str):
    torch.manual_seed(0)
    build = build_qwen2_5_vl if family == "qwen2.5-vl" else build_qwen3_vl
    m = build("tiny").eval()
    m.family = family
    return m


model, _unpatched = model_fixtures(_build, params=FAMILIES)


def _row_tokens(model, spec, seed: int):
    """(ids, types, [(kind, pixels, grid)]) of one prompt; Qwen3-VL videos put a timestamp
    token before each frame (its processor's layout)."""
    g = torch.Generator().manual_seed(1000 + seed)
    ids, types, items = [], [], []
    for n, part in enumerate(spec):
        if part[0] == "t":
            ids += torch.randint(3, IMAGE, (part[1],), generator=g).tolist()
            types += [0] * part[1]
            continue
        if part[0] == "img":
            t, h, w = 1, part[1], part[2]
        else:
            t, h, w = part[1:]
        pix = torch.randn(t * h * w, PATCH_DIM, generator=torch.Generator().manual_seed(seed * 10 + n))
        items.append((part[0], pix, [t, h, w]))
        per = h * w // 4
        if part[0] == "img":
            ids += [START] + [IMAGE] * per + [END]
            types += [0] + [1] * per + [0]
        elif model.family == "qwen3-vl":
            for _ in range(t):
                ids += [7, START] + [VIDEO] * per + [END]
                types += [0, 0] + [2] * per + [0]
        else:
            ids += [START] + [VIDEO] * (t * per) + [END]
            types += [0] + [2] * (t * per) + [0]
    return ids, types, items


def batch(model, specs, seeds=None) -> dict:
    """Left-padded prompts ``specs`` (``seeds``: each row's content seed, default its index)."""
    seeds = list(range(len(specs))) if seeds is None else seeds
    rows = [_row_tokens(model, s, seed) for s, seed in zip(specs, seeds)]
    L = max(len(r[0]) for r in rows)
    B = len(rows)
    ids = torch.full((B, L), PAD)
    types = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, (i, t, _) in enumerate(rows):
        ids[b, L - len(i):] = torch.tensor(i)
        types[b, L - len(t):] = torch.tensor(t)
        mask[b, L - len(i):] = 1
    out = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types)
    for kind, px, grid in (("img", "pixel_values", "image_grid_thw"),
                           ("vid", "pixel_values_videos", "video_grid_thw")):
        its = [it for r in rows for it in r[2] if it[0] == kind]
        if its:
            out[px] = torch.cat([it[1] for it in its])
            out[grid] = torch.tensor([it[2] for it in its])
    return out


def tokens_of(spec) -> list[int]:
    """Merged tokens of each image / video of a row spec."""
    return [p[1] * p[2] // 4 if p[0] == "img" else p[1] * p[2] * p[3] // 4
            for p in spec if p[0] != "t"]


class LMInputs:
    """Records the keyword inputs of every language-model call."""

    def __init__(self, model):
        self.calls = []
        inner = model.model if hasattr(model, "model") else model
        self.handle = inner.language_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run(model, inputs, generate: int = 0):
    with torch.no_grad(), LMInputs(model) as lm:
        if generate:
            out = model.generate(**inputs, max_new_tokens=generate, do_sample=False)
        else:
            out = model(**inputs).logits
    return out, lm.calls


def real_counts(call) -> torch.Tensor:
    """Tokens per row the language model receives (generate drops an all-ones mask)."""
    mask = call["attention_mask"]
    if mask is None:
        B, L = call["inputs_embeds"].shape[:2]
        return torch.full((B,), L)
    return mask.sum(dim=1)


def match_columns(full: torch.Tensor, reduced: torch.Tensor, mask_full, mask_red) -> list[int]:
    """For each real column of ``reduced`` (L', D), the column of ``full`` (L, D) holding the
    same vector, matched in order (the kept tokens are a subsequence of the prompt)."""
    cols, j = [], 0
    real_full = mask_full.bool().nonzero()[:, 0].tolist()
    for c in mask_red.bool().nonzero()[:, 0].tolist():
        while not torch.equal(full[real_full[j]], reduced[c]):
            j += 1
        cols.append(real_full[j])
        j += 1
    return cols


# -- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("specs", [(R_IMG,), (R_SMALL, R_SMALL, R_SMALL, R_SMALL), MIXED])
def test_keep_all_equals_unpatched(model, specs):
    inputs = batch(model, specs)
    ref_logits, _ = run(model, inputs)
    ref_gen, _ = run(model, inputs, generate=4)
    vlprune.patch(model, visual_keep=1.0)
    assert torch.equal(run(model, inputs)[0], ref_logits)
    assert torch.equal(run(model, inputs, generate=4)[0], ref_gen)
    if specs[0] == R_SMALL:  # every token kept through the rewrite path
        vlprune.patch(model, visual_keep=4, visual_score="random")
        torch.testing.assert_close(run(model, inputs)[0], ref_logits, rtol=0, atol=1e-5)
        assert torch.equal(run(model, inputs, generate=4)[0], ref_gen)


def test_unpatch_is_exact(model):
    inputs = batch(model, MIXED)
    ref, _ = run(model, inputs)
    cls = type(model)
    keys = list(model.state_dict())
    vlprune.patch(model, visual_keep=0.5, visual_score="attn", text_keep=0.5)
    assert run(model, inputs)[0].shape[1] < ref.shape[1]
    vlprune.unpatch(model)
    assert type(model) is cls and list(model.state_dict()) == keys
    assert not any(k.startswith("_vlprune") for m in model.modules() for k in m.__dict__)
    assert torch.equal(run(model, inputs)[0], ref)


# -- budgets and batches ----------------------------------------------------------------------


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("rows", [1, 4])
def test_every_score_generates_within_budget(model, score, rows):
    specs = MIXED[:rows] if rows == 4 else (R_TWO,)
    inputs = batch(model, specs)
    keep = 0.5
    vlprune.patch(model, visual_keep=keep, visual_score=score)
    out, calls = run(model, inputs, generate=3)
    L = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :L], inputs["input_ids"]) and out.shape[1] == L + 3
    real = inputs["attention_mask"].sum(dim=1)
    # the language model receives exactly each row's budget: every image and video keeps
    # ceil(keep * n) of its n tokens, the rest of the prompt stays
    want = torch.tensor([int(real[b]) - sum(n - math.ceil(keep * n) for n in tokens_of(s))
                         for b, s in enumerate(specs)])
    prefill = calls[0]
    assert torch.equal(real_counts(prefill), want)
    assert prefill["inputs_embeds"].shape[1] == int(want.max())
    assert all(c["inputs_embeds"].shape[1] == 1 for c in calls[1:])


@pytest.mark.parametrize("score", ["attn", "text"])
def test_rows_equal_their_prompt_alone(model, score):
    vlprune.patch(model, visual_keep=0.5, visual_score=score)
    inputs = batch(model, MIXED)
    logits, _ = run(model, inputs)
    for b, spec in enumerate(MIXED):
        alone = batch(model, (spec,), seeds=[b])
        if spec == R_TXT:
            alone = {k: v for k, v in alone.items() if k in ("input_ids", "attention_mask",
                                                             "mm_token_type_ids")}
        l1, _ = run(model, alone)
        torch.testing.assert_close(logits[b, -l1.shape[1]:], l1[0], rtol=0, atol=ROW_ATOL,
                                   msg=lambda m, b=b: f"row {b}: {m}")


# -- M-RoPE positions ----------------------------------------------------------------------------


def _positions(call) -> torch.Tensor:
    pos = call["position_ids"]
    return pos[1:] if pos.shape[0] == 4 else pos  # generate adds a text row first


@pytest.mark.parametrize("text_keep", [None, 0.5])
def test_kept_tokens_keep_upstream_positions(model, text_keep):
    inputs = batch(model, MIXED)
    _, ref = run(model, inputs)  # upstream's own positions, as its language model gets them
    _, ref_gen = run(model, inputs, generate=3)
    vlprune.patch(model, visual_keep=0.4, visual_score="attn", text_keep=text_keep)
    _, red = run(model, inputs)
    _, red_gen = run(model, inputs, generate=3)
    full_pos, red_pos = ref[0]["position_ids"], red[0]["position_ids"]
    assert full_pos.shape[0] == red_pos.shape[0] == 3
    for b in range(len(MIXED)):
        cols = match_columns(ref[0]["inputs_embeds"][b], red[0]["inputs_embeds"][b],
                             inputs["attention_mask"][b], red[0]["attention_mask"][b])
        real = red[0]["attention_mask"][b].bool()
        assert torch.equal(red_pos[:, b, real], full_pos[:, b, cols]), b
    # generate: the prefill's kept positions, then each decode step where upstream's goes
    gen_full, gen_red = _positions(ref_gen[0]), _positions(red_gen[0])
    for b in range(len(MIXED)):
        real = red_gen[0]["attention_mask"][b].bool()
        cols = match_columns(ref_gen[0]["inputs_embeds"][b], red_gen[0]["inputs_embeds"][b],
                             inputs["attention_mask"][b], red_gen[0]["attention_mask"][b])
        assert torch.equal(gen_red[:, b, real], gen_full[:, b, cols])
    for step_full, step_red in zip(ref_gen[1:], red_gen[1:]):
        assert torch.equal(_positions(step_red), _positions(step_full))


def test_without_mm_token_type_ids_as_upstream(model):
    """Without ``mm_token_type_ids`` upstream uses no 3-D positions (Qwen2.5-VL numbers the
    padded prompt 0..L-1) or refuses (Qwen3-VL); the reduced model does the same."""
    inputs = {k: v for k, v in batch(model, MIXED).items() if k != "mm_token_type_ids"}
    if model.family == "qwen3-vl":
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            run(model, inputs)
        vlprune.patch(model, visual_keep=0.5, visual_score="attn")
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            run(model, inputs)
        return
    _, ref = run(model, inputs)
    vlprune.patch(model, visual_keep=0.5, visual_score="attn")
    _, red = run(model, inputs)
    f, r = ref[0], red[0]
    full_pos = torch.arange(inputs["input_ids"].shape[1]).expand(3, len(MIXED), -1)
    assert f["position_ids"] is None or torch.equal(f["position_ids"], full_pos)
    for b in range(len(MIXED)):
        cols = match_columns(f["inputs_embeds"][b], r["inputs_embeds"][b],
                             inputs["attention_mask"][b], r["attention_mask"][b])
        real = r["attention_mask"][b].bool()
        assert torch.equal(r["position_ids"][:, b, real], full_pos[:, b, cols])


def test_generate_equals_manual_decode(model):
    """A reduced forward, then decode steps fed upstream's own decode positions (those of the
    unpatched generate): the same tokens as the reduced generate."""
    inputs = batch(model, MIXED)
    _, ref_gen = run(model, inputs, generate=4)
    vlprune.patch(model, visual_keep=0.5, visual_score="diversity")
    gen, _ = run(model, inputs, generate=4)
    L = inputs["input_ids"].shape[1]
    with torch.no_grad(), LMInputs(model) as lm:
        out = model(**inputs, use_cache=True)
        mask = lm.calls[0]["attention_mask"]
        tokens = []
        for step in ref_gen[1:]:
            nxt = out.logits[:, -1].argmax(dim=-1)
            tokens.append(nxt)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=mask, cache=out.cache,
                         position_ids=_positions(step), use_cache=True)
        tokens.append(out.logits[:, -1].argmax(dim=-1))
    assert torch.equal(after_eos(torch.stack(tokens, dim=1), model), gen[:, L:])


def after_eos(tokens: torch.Tensor, model) -> torch.Tensor:
    """Greedy tokens as generate returns them: padding after a row's first EOS."""
    eos = model.generation_config.eos_token_id
    done = torch.cumsum(tokens == eos, dim=1) - (tokens == eos).long() > 0
    return tokens.masked_fill(done, PAD)


def test_decode_without_positions_continues_upstream(model):
    """A decode step without position_ids or mask is placed by ``rope_deltas`` (upstream's
    path): after a reduced forward it lands where upstream's step after the full prompt does."""
    inputs = {k: v for k, v in batch(model, (R_IMG,)).items() if k != "attention_mask"}
    _, ref_gen = run(model, inputs, generate=3)
    vlprune.patch(model, visual_keep=0.5, visual_score="attn")
    gen, _ = run(model, inputs, generate=3)
    L = inputs["input_ids"].shape[1]
    with torch.no_grad(), LMInputs(model) as lm:
        out = model(**inputs, use_cache=True)
        tokens = []
        for _ in range(2):
            tokens.append(out.logits[:, -1].argmax(dim=-1))
            out = model(input_ids=tokens[-1][:, None], cache=out.cache, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(dim=-1))
    assert torch.equal(after_eos(torch.stack(tokens, dim=1), model), gen[:, L:])
    for step_full, step_red in zip(ref_gen[1:], lm.calls[1:]):
        assert torch.equal(_positions(step_red), _positions(step_full))


# -- the attention score -------------------------------------------------------------------------


@pytest.mark.parametrize("slice_entries", [None, 100])
def test_attn_score_equals_eager_reference(model, monkeypatch, slice_entries):
    """Reference: the eager attention weights of the scoring block (recorded from upstream's
    own eager attention), column means over heads and queries, the 2x2 patches of each merged
    token summed, put in the merger's output order by matching upstream's merger outputs.
    ``slice_entries=100``: the queries in slices of a few rows (as large images are)."""
    import importlib

    if slice_entries is not None:
        monkeypatch.setattr("vlprune.adapters.qwen_vl.encode.QUERY_ELEMENTS", slice_entries)

    from vlprune.adapters.qwen_vl.encode import encode

    inputs = batch(model, (R_IMG, R_TWO))
    visual = model.model.visual
    mod = importlib.import_module(type(visual).__module__)
    full = getattr(visual, "fullatt_block_indexes", None)
    block = max(full) if full is not None else len(visual.blocks) - 1
    weights, state = [], {"on": False}
    eager = mod.eager_attention_forward

    def record(*a, **kw):
        out = eager(*a, **kw)
        if state["on"]:
            weights.append(out[1][0])  # (H, n, n) of one attention segment
        return out

    monkeypatch.setattr(mod, "eager_attention_forward", record)
    monkeypatch.setattr(visual.config, "_attn_implementation", "eager")
    hooks = [visual.blocks[block].register_forward_pre_hook(lambda *_: state.update(on=True)),
             visual.blocks[block].register_forward_hook(lambda *_: state.update(on=False))]
    merged = []
    hooks.append(visual.merger.register_forward_hook(lambda m, a, o: merged.append(o)))
    try:
        with torch.no_grad():
            feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                   return_dict=True).pooler_output
    finally:
        for h in hooks:
            h.remove()
    per_patch = torch.cat([w.mean(dim=(0, 1)) for w in weights])  # tower order
    per_group = per_patch.view(-1, 4).sum(dim=1)
    tower_rows = merged[0]
    ref = []
    for f in feats:
        order = [int((tower_rows == row).all(dim=1).nonzero()[0]) for row in f]
        ref.append(per_group[order])
    monkeypatch.undo()
    vlprune.patch(model, visual_keep=3, visual_score="attn")
    with torch.no_grad():
        enc = encode(model, "image", inputs["pixel_values"], inputs["image_grid_thw"], True)
    for s, r in zip(enc.scores, ref):
        torch.testing.assert_close(s, r.float(), rtol=1e-4, atol=1e-6)
    # the kept tokens are each image's top 3 by the reference, in their order
    with torch.no_grad():
        kept = model(**inputs).image_outputs.pooler_output
    for k, f, r in zip(kept, feats, ref):
        # (feats: the eager run's, equal to the default kernel's up to rounding)
        torch.testing.assert_close(k, f[r.topk(3).indices.sort().values], rtol=0, atol=1e-5)


# -- DeepStack, videos, prompt dropping, base models ---------------------------------------------


def test_deepstack_follows_kept_tokens(model):
    if model.family != "qwen3-vl":
        pytest.skip("DeepStack is Qwen3-VL's")
    inputs = batch(model, MIXED)
    _, ref = run(model, inputs)
    vlprune.patch(model, visual_keep=0.5, visual_score="random")
    _, red = run(model, inputs)
    f, r = ref[0], red[0]
    assert len(r["deepstack_visual_embeds"]) == len(f["deepstack_visual_embeds"]) >= 1
    # the visual positions' DeepStack features are the full prompt's at the same tokens
    for layer_full, layer_red in zip(f["deepstack_visual_embeds"], r["deepstack_visual_embeds"]):
        full_at = torch.zeros(*f["inputs_embeds"].shape[:2], layer_full.shape[-1])
        full_at[f["visual_pos_masks"]] = layer_full
        red_at = torch.zeros(*r["inputs_embeds"].shape[:2], layer_red.shape[-1])
        red_at[r["visual_pos_masks"]] = layer_red
        for b in range(len(MIXED)):
            cols = match_columns(f["inputs_embeds"][b], r["inputs_embeds"][b],
                                 inputs["attention_mask"][b], r["attention_mask"][b])
            real = r["attention_mask"][b].bool()
            assert torch.equal(red_at[b, real], full_at[b, cols])
    assert int(r["visual_pos_masks"].sum()) == sum(
        math.ceil(0.5 * n) for s in MIXED for n in tokens_of(s))


def test_video_keeps_its_budget(model):
    inputs = batch(model, (R_VID,))
    vlprune.patch(model, visual_keep=3, visual_score="attn")
    out, calls = run(model, inputs, generate=2)
    real = int(inputs["attention_mask"].sum())
    assert int(real_counts(calls[0])) == real - (8 - 3)
    with torch.no_grad():
        kept = model(**inputs).video_outputs.pooler_output
    assert [k.shape[0] for k in kept] == [3]


@pytest.mark.parametrize("keep", [1.0, 2])
def test_temporal_keep_merges_repeated_places(model, keep):
    """Reference (a 2-frame video): frame 0 stays; of frame 1, the ``keep`` tokens least
    cosine-similar to the same place of frame 0 stay, each other one is averaged into that
    place of frame 0. Kept tokens keep upstream's positions; DeepStack features are averaged
    alike."""
    inputs = batch(model, (R_VID, R_IMG))
    _, ref = run(model, inputs)
    ref_gen, ref_steps = run(model, inputs, generate=3)
    vlprune.patch(model, temporal_keep=keep)
    out, red = run(model, inputs)
    if keep == 1.0:  # merging nothing is upstream exactly
        assert torch.equal(run(model, inputs, generate=3)[0], ref_gen)
        return
    f, r = ref[0], red[0]
    vid_cols = (inputs["input_ids"][0] == VIDEO).nonzero()[:, 0]
    feats = f["inputs_embeds"][0, vid_cols].view(2, 4, -1)
    sim = torch.nn.functional.cosine_similarity(feats[1], feats[0], dim=-1)
    stay1 = sim.argsort()[:keep].sort().values
    merged = feats[0].clone()
    gone = [i for i in range(4) if i not in stay1.tolist()]
    merged[gone] = (feats[0, gone] + feats[1, gone]) / 2
    want_feats = torch.cat([merged, feats[1, stay1]])
    kept_cols = torch.cat([vid_cols[:4], vid_cols[4 + stay1]])
    # the reduced row 0: the prompt without the merged places, video tokens in order
    real = r["attention_mask"][0].bool()
    assert int(real.sum()) == int(inputs["attention_mask"][0].sum()) - (4 - keep)
    full_keep = inputs["attention_mask"][0].bool().clone()
    full_keep[vid_cols] = False
    full_keep[kept_cols] = True
    torch.testing.assert_close(r["inputs_embeds"][0, real],
                               _expected(f["inputs_embeds"][0], full_keep, kept_cols, want_feats),
                               rtol=0, atol=1e-6)
    assert torch.equal(r["position_ids"][:, 0, real], f["position_ids"][:, 0, full_keep])
    gen, steps = run(model, inputs, generate=3)
    assert gen.shape == ref_gen.shape
    for step_full, step_red in zip(ref_steps[1:], steps[1:]):
        assert torch.equal(_positions(step_red), _positions(step_full))
    if model.family == "qwen3-vl":
        for layer_f, layer_r in zip(f["deepstack_visual_embeds"], r["deepstack_visual_embeds"]):
            full_vis = f["visual_pos_masks"][0].nonzero()[:, 0].tolist()
            d = layer_f[[full_vis.index(int(c)) for c in vid_cols]].view(2, 4, -1)
            dm = d[0].clone()
            dm[gone] = (d[0, gone] + d[1, gone]) / 2
            want = torch.cat([dm, d[1, stay1]])
            assert int(r["visual_pos_masks"][0].sum()) == 4 + keep
            torch.testing.assert_close(layer_r[:4 + keep], want, rtol=0, atol=1e-6)


def _expected(full_embeds, full_keep, kept_cols, video_feats):
    """The reduced row's expected LM inputs: the kept places of the full row, the video
    places holding ``video_feats`` in order."""
    out = full_embeds.clone()
    out[kept_cols] = video_feats
    return out[full_keep]


def test_text_keep_drops_prompt_tokens(model):
    long = (("t", 20), ("img", 4, 4), ("t", 12))
    inputs = batch(model, (long, R_IMG))
    vlprune.patch(model, text_keep=0.5, text_protect_last=2)
    _, calls = run(model, inputs, generate=2)
    kept = real_counts(calls[0])
    # droppable: the text tokens minus the last 2 of each row; half of them stay
    droppable = torch.tensor([32 - 2, 7 - 2])
    real = inputs["attention_mask"].sum(dim=1)
    assert torch.equal(kept, real - (droppable - torch.ceil(droppable * 0.5).long()))


def test_base_model_forward(model):
    inner = model.model
    base = type(inner)(model.config).eval()
    base.load_state_dict(inner.state_dict())
    inputs = batch(model, MIXED)
    vlprune.patch(model, visual_keep=0.5, visual_score="attn")
    vlprune.patch(base, visual_keep=0.5, visual_score="attn")
    with torch.no_grad():
        logits = model(**inputs).logits
        hidden = base(**inputs).last_hidden_state
    assert hidden.shape[1] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(model.lm_head(hidden), logits, rtol=0, atol=1e-6)
    vlprune.unpatch(base)


def test_dummy_inputs_run(model):
    x = dummy_inputs(model, 3, 5, image_size=24)
    vlprune.patch(model, visual_keep=0.5, visual_score="random")
    _, calls = run(model, x)
    assert torch.equal(calls[0]["attention_mask"].sum(dim=1),
                       x["attention_mask"].sum(dim=1) - (9 - 5))


# -- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    (dict(merge_r=2), "inside the vision tower"),
    (dict(visual_keep=4, prune_keep=0.5), "patch merger needs each 2x2"),
    (dict(visual_keep=4, visual_score="attn", temporal_keep=2, trace_source=True), "inside the vision tower"),
    (dict(visual_keep=4, visual_score="dominant_contextual"), "no single 3-D"),
    (dict(visual_keep=4, visual_score="pool"), "no single 3-D"),
    (dict(visual_keep=4, visual_score="visionzip"), "no class token"),
    (dict(visual_keep=4), "no class token; visual_score='attn'"),
    (dict(visual_score="prumerge"), "no class token"),
])
def test_refusals_say_why(model, kwargs, words):
    with pytest.raises(ValueError, match=words):
        vlprune.patch(model, **kwargs)
    assert not vlprune.is_patched(model)


def test_older_transformers_refused(model, monkeypatch):
    from vlprune.adapters import hf_common

    monkeypatch.setattr(hf_common, "transformers_version", lambda: "5.23.0")
    with pytest.raises(vlprune.UnsupportedModelError,
                       match=r"needs transformers >= 5\.25 \(installed: 5\.23\.0\)"):
        vlprune.patch(model, visual_keep=0.5, visual_score="attn")
    assert not vlprune.is_patched(model)


def test_count_above_an_image_is_refused_at_run(model):
    vlprune.patch(model, visual_keep=5, visual_score="attn")
    with pytest.raises(ValueError, match="only 4 visual tokens"):
        run(model, batch(model, (R_SMALL,)))


def test_unknown_shape_names_known():
    with pytest.raises(ModelBuildError, match="known: .*tiny"):
        build_qwen2_5_vl("huge")
    with pytest.raises(ModelBuildError, match="known: .*8b"):
        build_qwen3_vl("nope")


# -- FastV inside the language model ----------------------------------------------------------


R_IMG2 = (("t", 6), ("img", 6, 8), ("t", 1))  # R_IMG's image shape, other text lengths


def test_fastv_keep_all_equals_unpatched(model):
    inputs = batch(model, (R_IMG, R_IMG2))
    ref, _ = run(model, inputs)
    ref_gen, _ = run(model, inputs, generate=4)
    vlprune.patch(model, llm_layer=1, llm_keep=1.0)
    assert torch.equal(run(model, inputs)[0], ref)
    assert torch.equal(run(model, inputs, generate=4)[0], ref_gen)
    vlprune.patch(model, llm_layer=1, llm_keep=12)  # every visual token, through the pruning path
    torch.testing.assert_close(run(model, inputs)[0], ref, rtol=0, atol=1e-5)
    assert torch.equal(run(model, inputs, generate=4)[0], ref_gen)


@pytest.mark.parametrize("visual_keep", [None, 0.5])
def test_fastv_keeps_mrope_positions(model, visual_keep):
    """The pruned layers get the rotary (cos, sin) of the kept tokens' own 3-D positions:
    each kept column's equals upstream's at one prompt place, in order, every text place
    kept, each image down to its budget."""
    inputs = batch(model, (R_IMG, R_IMG2))
    layer = model.model.language_model.layers[1].self_attn
    seen = []
    hook = layer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_embeddings"]), with_kwargs=True)
    try:
        ref, _ = run(model, inputs)
        extra = {} if visual_keep is None else dict(visual_keep=visual_keep, visual_score="attn")
        vlprune.patch(model, llm_layer=1, llm_keep=0.5, **extra)
        out, _ = run(model, inputs, generate=3)  # prefill, then decode steps on the kept cache
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        red, _ = run(model, inputs)
    finally:
        hook.remove()
    (cos_f, sin_f), (cos_r, sin_r) = seen[0], seen[-1]
    n_vis = 12 if visual_keep is None else 6
    for b in range(2):
        cols = []
        for c in range(cos_r.shape[1]):
            hit = ((cos_f[b] == cos_r[b, c]).all(dim=1) & (sin_f[b] == sin_r[b, c]).all(dim=1))
            cols.append(int(hit.nonzero()[0]) if hit.any() else -1)
        real = inputs["attention_mask"][b].bool()
        visual = (inputs["input_ids"][b] == IMAGE) & real
        text_cols = (real & ~visual).nonzero()[:, 0].tolist()
        got = [c for c in cols if c >= 0 and real[c]]
        assert got == sorted(set(got))
        assert set(text_cols) <= set(got)
        assert sum(bool(visual[c]) for c in got) == math.ceil(0.5 * n_vis)


def test_fastv_prunes_videos_too(model):
    inputs = batch(model, (R_VID,))
    vlprune.patch(model, llm_layer=1, llm_keep=0.5)
    logits, _ = run(model, inputs)
    assert logits.shape[1] == int(inputs["attention_mask"].sum()) - 4  # 8 video tokens -> 4
    out, _ = run(model, inputs, generate=2)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_fastv_refusals(model):
    with pytest.raises(ValueError, match="3-D"):
        vlprune.patch(model, llm_layer=1, llm_keep=0.5, llm_renumber_positions=True)
    with pytest.raises(ValueError, match="out of range"):
        vlprune.patch(model, llm_layer=2, llm_keep=0.5)
    if model.family == "qwen3-vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        from vlprune.models_qwen import SHAPES

        spec = SHAPES["qwen3-vl"]["tiny"]
        cfg = Qwen3VLConfig(vision_config=dict(spec["vision"], deepstack_visual_indexes=[0, 1]),
                            text_config=dict(spec["text"], num_hidden_layers=3), **spec["ids"])
        deep = Qwen3VLForConditionalGeneration(cfg)
        with pytest.raises(ValueError, match="DeepStack .* give llm_layer >= 2"):
            vlprune.patch(deep, llm_layer=1, llm_keep=0.5)
        vlprune.patch(deep, llm_layer=2, llm_keep=0.5)

