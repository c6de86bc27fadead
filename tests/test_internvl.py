"""InternVL (transformers InternVLForConditionalGeneration / InternVLModel, the tiny shape of
vlprune.models_internvl): visual tokens reduced before the language model per image over all
its tiles, prompt dropping and FastV, in forward and generate; left-padded batches with
several images, different tile counts and a text-only row."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from adapter_tester import AdapterTester, Family
from helpers import model_fixtures

import vlprune

transformers = pytest.importorskip("transformers")
from vlprune.models import ModelBuildError, left_pad  # noqa: E402
from vlprune.models_internvl import build_internvl, dummy_inputs  # noqa: E402

IMAGE, START, END, PAD = 255, 253, 254, 0
T = 16  # tokens per 56 px tile: 8x8 patches of 7 px, 2x2 patches per token
PATCH_SIDE = 8
# each prompt: text lengths (ints) and images (lists holding the tile count), in order
PROMPTS = (
    (3, [2], 2),
    (5, [1], 1, [3], 9),
    (2, [1], 6),
    (7,),  # text only
    (4, [1], 3),
)
# float32: a row batched and alone sums in different orders; measured <= 1.2e-7 on logits of
# magnitude < 0.8 (about 2 ulps); 1e-6 leaves room for that noise, not for a leak between rows
ROW_ATOL = 1e-6
NEW = 3
SCORES = ("cls_attn", "attn", "diversity", "random", "text", "dominant_contextual")


def _build():
    torch.manual_seed(0)
    return build_internvl("tiny").eval()


model, _unpatched = model_fixtures(_build)


def _row(i: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prompt i: its token ids and its images' tiles."""
    g = torch.Generator().manual_seed(100 + i)
    ids, tiles = [], []
    for part in PROMPTS[i]:
        if isinstance(part, int):
            ids.append(torch.randint(1, 200, (part,), generator=g))
        else:
            n = part[0]
            ids += [torch.tensor([START]), torch.full((n * T,), IMAGE), torch.tensor([END])]
            tiles.append(torch.randn(n, 3, 56, 56, generator=g))
    return torch.cat(ids), tiles


def _batch(rows) -> dict:
    """Left-padded prompts (as a tokenizer pads for generation) and their images' tiles."""
    seqs, tiles = zip(*(_row(i) for i in rows))
    ids, mask = left_pad(seqs, PAD)
    out = dict(input_ids=ids, attention_mask=mask)
    pixels = [t for row in tiles for t in row]
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
    return out


def _images(rows) -> list[int]:
    """Tile counts of the images of ``rows``, in order."""
    return [p[0] for i in rows for p in PROMPTS[i] if not isinstance(p, int)]


def _real_text(i: int) -> int:
    """Text tokens of prompt i, markers included."""
    return sum(p if isinstance(p, int) else 2 for p in PROMPTS[i])


def _count(keep, n):
    return keep if isinstance(keep, int) else math.ceil(keep * n)


def _logits(m, inputs):
    with torch.no_grad():
        return m(**inputs).logits


def _generate(m, inputs):
    with torch.no_grad():
        return m.generate(**inputs, max_new_tokens=NEW, do_sample=False)


class _LM:
    """What the language model really receives: per call, each row's real (unmasked) input
    count, and the ``inputs_embeds``; plus the token ids embedded."""

    def __init__(self, m):
        self.real, self.embeds, self.ids = [], [], []
        lm = m.model.language_model if hasattr(m, "lm_head") else m.language_model
        self.handles = [
            lm.register_forward_pre_hook(self._lm, with_kwargs=True),
            lm.embed_tokens.register_forward_pre_hook(self._embed),
        ]

    def _embed(self, module, args):
        if args[0].dim() == 2:  # the whole (B, L) prompt, not one row's text for scoring
            self.ids.append(args[0])

    def _lm(self, module, args, kwargs):
        x = kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        self.real.append(mask.sum(dim=1).tolist() if mask is not None else [x.shape[1]] * x.shape[0])
        self.embeds.append(x)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _expected_real(rows, keep) -> list[int]:
    """Each row's LM input count under ``visual_keep=keep``: its text and marker tokens, and
    each image's budget of its tiles' tokens."""
    out = []
    for i in rows:
        imgs = [p[0] * T for p in PROMPTS[i] if not isinstance(p, int)]
        out.append(_real_text(i) + sum(_count(keep, n) for n in imgs))
    return out


@pytest.mark.parametrize("rows", [(1,), (0, 1, 2, 3)])
def test_keep_one_equals_unpatched(model, rows):
    inputs = _batch(rows)
    ref_logits, ref_gen = _logits(model, inputs), _generate(model, inputs)
    for kw in (dict(visual_keep=1.0), dict(llm_layer=1, llm_keep=1.0)):
        vlprune.patch(model, **kw)
        assert torch.equal(_logits(model, inputs), ref_logits)
        assert torch.equal(_generate(model, inputs), ref_gen)
    # every token kept through the rewrite path (a ratio just below 1 keeps all): the same
    vlprune.patch(model, visual_keep=0.999)
    torch.testing.assert_close(_logits(model, inputs), ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(model, inputs), ref_gen)


@pytest.mark.parametrize("rows", [(1,), (0, 1, 2, 3)])
@pytest.mark.parametrize("score", SCORES)
def test_every_score_generates_the_budget(model, score, rows):
    keep = 0.25
    vlprune.patch(model, visual_keep=keep, visual_score=score)
    inputs = _batch(rows)
    with _LM(model) as lm:
        out = _generate(model, inputs)
    L = inputs["input_ids"].shape[1]
    assert lm.real[0] == _expected_real(rows, keep)
    assert all(e.shape[1] == 1 for e in lm.embeds[1:])  # decode steps: one token, KV cache
    assert torch.equal(out[:, :L], inputs["input_ids"]) and out.shape[1] == L + NEW


def test_count_budget_per_image(model):
    vlprune.patch(model, visual_keep=5, visual_score="cls_attn")
    rows = (0, 1, 2, 3)
    with _LM(model) as lm:
        _logits(model, _batch(rows))
    assert lm.real[0] == _expected_real(rows, 5)
    with pytest.raises(ValueError, match="only 16 visual tokens"):
        vlprune.patch(model, visual_keep=17)
        _logits(model, _batch((2,)))


@pytest.mark.parametrize("kw", [
    dict(visual_keep=0.25),
    dict(visual_keep=3, visual_score="attn"),
    dict(visual_keep=0.5, visual_score="text", text_keep=0.5, text_protect_last=2),
])
def test_rows_match_alone(model, kw):
    vlprune.patch(model, **kw)
    rows = (0, 1, 2, 3)
    inputs = _batch(rows)
    with _LM(model) as lm:
        logits = _logits(model, inputs)
    for b, i in enumerate(rows):
        with _LM(model) as lm1:
            l1 = _logits(model, _batch((i,)))
        n = l1.shape[1]
        torch.testing.assert_close(lm.embeds[0][b, -n:], lm1.embeds[0][0], rtol=0, atol=ROW_ATOL)
        torch.testing.assert_close(logits[b, -n:], l1[0], rtol=0, atol=ROW_ATOL)


def _reference_scores(m, pixels, layer: int, kind: str) -> torch.Tensor:
    """Per-token scores (tiles, T) from the eager tower's own attention weights at the
    feature layer, grouped by pixel_shuffle's blocks: token (i, j) of the 4x4 token grid holds
    patches (2i + a, 2j + b), a, b in {0, 1}, of the 8x8 patch grid (row-major)."""
    tower = copy.deepcopy(m.model.vision_tower)
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        att = tower(pixel_values=pixels, output_attentions=True).attentions[layer]
    if kind == "cls_attn":
        patch = att[:, :, 0, 1:].mean(dim=1)
    else:  # attn: the mean attention each patch receives, over heads and every query row
        patch = att[:, :, :, 1:].mean(dim=(1, 2))
    grid = patch.reshape(-1, PATCH_SIDE, PATCH_SIDE)
    side = PATCH_SIDE // 2
    out = torch.zeros(grid.shape[0], side, side)
    for i in range(side):
        for j in range(side):
            out[:, i, j] = grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].sum(dim=(1, 2))
    return out.reshape(grid.shape[0], -1)


@pytest.mark.parametrize("kind, layer, keep", [
    ("cls_attn", -1, 4), ("cls_attn", -1, 11), ("cls_attn", -2, 6), ("attn", -1, 7),
])
def test_tower_scores_match_eager_attention(model, kind, layer, keep):
    _check_tower_scores(model, kind, layer, keep)


def test_tower_scores_with_qk_norm():
    """InternViT-6B's layout: RMS norms and q/k norms inside the attention."""
    torch.manual_seed(1)
    m = _tiny_internvl(vision=dict(use_qk_norm=True, norm_type="rms_norm"))
    with torch.no_grad():  # the norms' weights away from their all-ones start
        for layer in m.model.vision_tower.encoder.layer:
            for norm in (layer.attention.q_norm, layer.attention.k_norm, layer.layernorm_before):
                norm.weight.uniform_(0.5, 1.5)
    _check_tower_scores(m, "cls_attn", -1, 5)


def _check_tower_scores(m, kind, layer, keep):
    """The kept features the language model receives are each image's ``keep`` best tokens
    by the reference scores (:func:`_reference_scores`), one ranking over its tiles, in order."""
    rows = (0, 1)
    inputs = _batch(rows)
    pixels = inputs["pixel_values"]
    ref = _reference_scores(m, pixels, layer, kind)
    with torch.no_grad():
        full = m.model.get_image_features(pixel_values=pixels, vision_feature_layer=layer,
                                          return_dict=True).pooler_output
    tiles = _images(rows)
    starts = [sum(tiles[:j]) for j in range(len(tiles))]
    expected, other = [], []
    for s, n in zip(starts, tiles):
        score = ref[s:s + n].reshape(-1)  # one ranking over the image's tiles
        idx = score.topk(keep).indices.sort().values
        expected.append(full[s:s + n].reshape(-1, full.shape[-1])[idx])
        # the same patches grouped column-major would pick other tokens: the check can fail
        wrong = _reference_scores_transposed(ref, s, n)
        other.append(not torch.equal(wrong.topk(keep).indices.sort().values, idx))
    assert any(other)
    vlprune.patch(m, visual_keep=keep, visual_score=kind)
    try:
        with _LM(m) as lm:
            _logits(m, dict(inputs, vision_feature_layer=layer))
    finally:
        vlprune.unpatch(m)
    embeds, ids = lm.embeds[0], lm.ids[0]
    torch.testing.assert_close(embeds[ids == IMAGE], torch.cat(expected), rtol=0, atol=1e-6)


def _tiny_internvl(vision=None, text_config=None):
    """A tiny InternVL built here (not by the library's builder), random class token and
    position embeddings; ``vision``: extra vision options; ``text_config``: another LM."""
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        Qwen2Config,
    )

    text = text_config or Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, pad_token_id=PAD)
    cfg = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=56, patch_size=7, **(vision or {})),
        text_config=text, image_token_id=IMAGE, image_seq_length=T,
    )
    m = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        m.model.vision_tower.embeddings.cls_token.normal_()
        m.model.vision_tower.embeddings.position_embeddings.normal_(std=0.1)
    return m


def test_llama_language_model():
    """InternVL with a Llama language model (as InternVL2.5's InternLM2 models convert):
    visual_keep and FastV on its decoder."""
    from transformers import LlamaConfig

    torch.manual_seed(2)
    m = _tiny_internvl(text_config=LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, pad_token_id=PAD))
    rows = (2, 4)
    inputs = _batch(rows)
    ref_logits, ref_gen = _logits(m, inputs), _generate(m, inputs)
    vlprune.patch(m, visual_keep=1.0, llm_layer=1, llm_keep=1.0)
    assert torch.equal(_logits(m, inputs), ref_logits)
    assert torch.equal(_generate(m, inputs), ref_gen)
    vlprune.patch(m, visual_keep=0.5, llm_layer=1, llm_keep=3)
    with _LM(m) as lm:
        seen, out = _mlp_lengths(m, inputs)
    assert lm.real[0] == _expected_real(rows, 0.5)
    # each row keeps 3 of its image's 8 tokens from layer 1 on; the batch is its longest row
    assert seen[0] == max(_real_text(i) + 3 for i in rows)
    assert out.shape[1] == inputs["input_ids"].shape[1] + NEW


def _reference_scores_transposed(ref, s, n):
    """The image's token scores with each tile's 4x4 token grid transposed (a wrong grouping)."""
    side = PATCH_SIDE // 2
    return ref[s:s + n].reshape(n, side, side).transpose(1, 2).reshape(-1)


def test_text_keep_keeps_image_marks(model):
    vlprune.patch(model, visual_keep=0.25, text_keep=0.3, text_protect_last=1)
    rows = (1, 3)
    inputs = _batch(rows)
    with _LM(model) as lm:
        _logits(model, inputs)
    ids = lm.ids[0]
    for b, i in enumerate(rows):
        real = ids[b][-lm.real[0][b]:]
        img = real == IMAGE
        # every run of image tokens still sits between <img> and </img>
        starts = (img[1:] & ~img[:-1]).nonzero()[:, 0]
        ends = (img[:-1] & ~img[1:]).nonzero()[:, 0] + 1
        assert (real[starts] == START).all() and (real[ends] == END).all()
        # droppable: text tokens other than the marks and the last one; ceil(0.3 * n) kept
        n_text = sum(p for p in PROMPTS[i] if isinstance(p, int))
        if img.any():
            n_img = sum(_count(0.25, p[0] * T) for p in PROMPTS[i] if not isinstance(p, int))
            marks = 2 * len(_images((i,)))
            assert lm.real[0][b] == n_img + marks + math.ceil(0.3 * (n_text - 1)) + 1
        else:  # a text-only row is not dropped (no image to be guided by)
            assert lm.real[0][b] == n_text


def _mlp_lengths(m, inputs) -> tuple[list[int], torch.Tensor]:
    """A greedy generation and the sequence lengths the MLP of decoder layer 1 receives (after
    FastV's selection, which happens inside the layer), one per forward."""
    seen = []
    h = m.model.language_model.layers[1].mlp.register_forward_pre_hook(
        lambda mod, a: seen.append(a[0].shape[1]))
    try:
        out = _generate(m, inputs)
    finally:
        h.remove()
    return seen, out


def test_fastv_keeps_the_budget_in_the_decoder(model):
    vlprune.patch(model, llm_layer=1, llm_keep=3)
    for rows in [(1,), (2, 4)]:  # two images in a row; two rows of one one-tile image each
        inputs = _batch(rows)
        seen, out = _mlp_lengths(model, inputs)
        L = inputs["input_ids"].shape[1]
        visual = [sum(p[0] * T for p in PROMPTS[i] if not isinstance(p, int)) for i in rows]
        kept = [3 * len(_images((i,))) for i in rows]
        assert seen[0] == L - (visual[0] - kept[0])
        assert all(s == 1 for s in seen[1:]) and out.shape[1] == L + NEW
    # both: 8 per image before the language model, half of them from layer 1 on
    vlprune.patch(model, visual_keep=8, llm_layer=1, llm_keep=0.5)
    seen, _ = _mlp_lengths(model, _batch((1,)))
    assert seen[0] == _real_text(1) + 2 * 4


def test_base_model_forward(model):
    base = model.model
    inputs = _batch((0, 1, 2, 3))
    with torch.no_grad():
        ref = base(**inputs).last_hidden_state
    vlprune.patch(base, visual_keep=1.0)
    with torch.no_grad():
        assert torch.equal(base(**inputs).last_hidden_state, ref)
    vlprune.patch(base, visual_keep=0.25, visual_score="cls_attn")
    with torch.no_grad():
        h = base(**inputs).last_hidden_state
    vlprune.unpatch(base)
    vlprune.patch(model, visual_keep=0.25, visual_score="cls_attn")
    torch.testing.assert_close(model.lm_head(h), _logits(model, inputs), rtol=0, atol=1e-6)
    vlprune.unpatch(model)
    with torch.no_grad():
        assert torch.equal(base(**inputs).last_hidden_state, ref)


def test_unpatch_exact(model):
    inputs = _batch((0, 1, 3))
    ref_logits, ref_gen = _logits(model, inputs), _generate(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cls = type(model)
    vlprune.patch(model, visual_keep=0.25, text_keep=0.5, llm_layer=1, llm_keep=1.0)
    assert _logits(model, inputs).shape[1] < ref_logits.shape[1]
    vlprune.unpatch(model)
    assert type(model) is cls is transformers.InternVLForConditionalGeneration
    assert not any(k.startswith("_vlprune") for m in model.modules() for k in m.__dict__)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, inputs), ref_logits)
    assert torch.equal(_generate(model, inputs), ref_gen)


@pytest.mark.parametrize("kw, match", [
    (dict(merge_r=2), r"merge_r \(merging or pruning inside the vision tower\) not available on "
                      r"InternVLForConditionalGeneration: each tile's pixel shuffle"),
    (dict(prune_keep=0.5), "prune_keep .*pixel shuffle"),
    (dict(visual_keep=4, visual_score="pool"), "pixel shuffle already folds 2x2"),
    (dict(visual_keep=64, visual_score="visionzip"), "exact rule of its authors for LLaVA-1.5"),
    (dict(visual_score="prumerge"), "exact rule of its authors for LLaVA-1.5"),
    (dict(temporal_keep=0.5), "takes a video as its frames, each an image of one tile"),
    (dict(text_merge_r=2), "text_merge_r not supported on InternVLForConditionalGeneration"),
    (dict(llm_layer=2, llm_keep=3), "llm_layer=2 out of range"),
])
def test_refusals(model, kw, match):
    with pytest.raises(ValueError, match=match):
        vlprune.patch(model, **kw)
    assert not vlprune.is_patched(model)


def test_bad_prompts(model):
    vlprune.patch(model, visual_keep=4)
    inputs = _batch((0,))
    inputs["input_ids"][0, -5] = PAD  # one placeholder fewer: 31 tokens for 2 tiles
    with pytest.raises(ValueError, match="multiple of 16"):
        _logits(model, inputs)
    inputs = _batch((0,))
    inputs["pixel_values"] = inputs["pixel_values"][:1]
    with pytest.raises(ValueError, match="pixel_values has 1 tiles"):
        _logits(model, inputs)


def test_models_internvl():
    torch.manual_seed(0)
    m = build_internvl("tiny", img_size=28, llm_layers=1, vision_layers=1).eval()
    assert len(m.model.language_model.layers) == 1 and len(m.model.vision_tower.encoder.layer) == 1
    x = dummy_inputs(m, 3, 6, image_size=56)  # 2x2 crops and a thumbnail of 28 px tiles
    assert x["pixel_values"].shape == (15, 3, 28, 28)
    assert ((x["input_ids"] == IMAGE).sum(dim=1) == 5 * 4).all()
    assert x["attention_mask"][:, 0].tolist() == [0, 0, 1]  # left-padded, rows differ
    with torch.no_grad():
        assert m(**x).logits.shape[:2] == x["input_ids"].shape
    vlprune.patch(m, visual_keep=0.5)
    with _LM(m) as lm:
        _logits(m, x)
    assert lm.real[0] == [6 + 2 + 10, 7 + 2 + 10, 8 + 2 + 10]
    with pytest.raises(ModelBuildError, match="known: .*internvl3-8b.*tiny"):
        build_internvl("huge")
    with pytest.raises(ModelBuildError, match="multiple of 2 x patch_size"):
        build_internvl("tiny", img_size=30)
    with pytest.raises(ValueError, match="multiple of the tile size"):
        dummy_inputs(m, 1, 4, image_size=40)


# --- the shared tester (tests/adapter_tester.py): rows of one one-tile image each, so FastV's
# equal-count rule holds; the batches left-padded with different prompt lengths ---------------

# keep 1.0 and visual_keep with FastV together: the tests above (this file's time budget)
COMMON = {
    "visual": dict(visual_keep=4, visual_score="attn"),
    "fastv": dict(llm_layer=1, llm_keep=4),
}


def _common_inputs(batch, seed):
    return _batch(tuple((2, 4)[(seed + i) % 2] for i in range(batch)))


def _common_layers(kw, inputs):
    """The visual tokens an image keeps before the language model (of its tile's T), then
    those FastV keeps from ``llm_layer`` on; ratios of 1.0 report nothing."""
    visual = kw.get("visual_keep")
    llm = kw.get("llm_keep") if kw.get("llm_layer") is not None else None
    if visual in (None, 1.0) and llm in (None, 1.0):
        return []
    n = _count(visual, T) if visual is not None else T
    out = [("visual", T, n)]
    if llm is not None:
        out.append(("llm", n, _count(llm, n)))
    return out


def _common_run(m, inputs):
    return m(**inputs).logits, m.generate(**inputs, max_new_tokens=2, do_sample=False)


class TestInternVLCommon(AdapterTester):
    families = {
        "internvl": Family(
            build=_build, inputs=_common_inputs, settings=COMMON,
            expected_layers=_common_layers,
            run=_common_run, outputs=lambda out, inputs: list(out), same_shape=(1,),
            trace_source=False, other={"visual_keep": 6}, concurrency=("visual", "fastv"),
            batches=(2,),  # batch 1: the tests above
            refusals=(("merge_r", dict(merge_r=2)), ("visual_score", dict(visual_keep=4, visual_score="pool"))),
        )
    }
