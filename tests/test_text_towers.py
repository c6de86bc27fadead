"""Text towers and two-tower models (open_clip CLIP / CustomTextCLIP / TextTransformer,
Hugging Face CLIP / SigLIP): tiny random models registered with the shared tester
(tests/adapter_tester.py), then padded-batch independence, per-row token counts, cross-modal
guidance and the errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from adapter_tester import AdapterTester, Family, Tower

import vlprune

open_clip = pytest.importorskip("open_clip")

IMG = 64
CTX = 20
VOCAB = 100
LENGTHS = (5, 14, 9, 3)  # tokens per text, BOS and EOT included


def _vision_cfg():
    return dict(image_size=IMG, patch_size=16, width=64, layers=3, head_width=32, mlp_ratio=2.0)


def _text_cfg(**kw):
    return dict(context_length=CTX, vocab_size=VOCAB, width=48, heads=2, layers=4, **kw)


@dataclass
class TextFamily:
    """How to build a tiny model and feed it texts (rows of token ids of different lengths)."""

    build: Callable[[], torch.nn.Module]
    two_towers: bool
    pad_id: int = 0
    causal: bool = True
    hf: bool = False  # Hugging Face: padding="longest" with an attention mask
    class_token: bool = True  # the image tower has one (SigLIP: no)
    pad_mask: bool = False  # open_clip bidirectional tower masking pad_id

    def ids(self, lengths, seed=0):
        g = torch.Generator().manual_seed(seed)
        width = max(lengths) if self.hf and self.causal else CTX
        ids = torch.full((len(lengths), width), self.pad_id, dtype=torch.long)
        for i, n in enumerate(lengths):
            ids[i, 0] = VOCAB - 2  # BOS
            ids[i, 1 : n - 1] = torch.randint(3, VOCAB - 3, (n - 2,), generator=g)
            ids[i, n - 1] = VOCAB - 1  # EOT: the highest id (argmax pooling) and the eos id
        return ids

    def text_kwargs(self, ids):
        if not self.hf:
            return dict(text=ids)
        kw = dict(input_ids=ids)
        if self.causal:  # CLIP: padded with the eos id after the EOT, masked
            eot = (ids == VOCAB - 1).int().argmax(dim=-1, keepdim=True)
            kw["attention_mask"] = (torch.arange(ids.shape[1]) <= eot).long()
        return kw

    def encode_text(self, model, ids):
        if not self.hf:
            return model.encode_text(ids) if self.two_towers else model(ids)
        kw = self.text_kwargs(ids)
        if self.two_towers:
            return model.get_text_features(**kw).pooler_output
        out = model(**kw)
        return out.pooler_output if "pooler_output" in out else out.text_embeds

    def alone(self, ids, i):
        """Row ``i`` as it would be tokenised alone (HF: padded only to its own length)."""
        row = ids[i : i + 1]
        if self.hf and self.causal:
            row = row[:, : int((row[0] == VOCAB - 1).int().argmax()) + 1]
        return row

    def inputs(self, lengths, seed=0):
        ids = self.ids(lengths, seed)
        g = torch.Generator().manual_seed(seed + 1)
        image = torch.randn(len(lengths), 3, IMG, IMG, generator=g)
        if self.hf:
            kw = self.text_kwargs(ids)
            return {**kw, "pixel_values": image} if self.two_towers else kw
        if not self.two_towers:
            return ids
        return dict(image=image, text=ids)

    def outputs(self, out):
        if isinstance(out, torch.Tensor):
            return [out]
        if self.hf:
            names = ("logits_per_image", "text_embeds", "image_embeds") if self.two_towers else (
                ("pooler_output",) if "pooler_output" in out else ("text_embeds",))
            return [out[k] for k in names]
        return [o for o in out if isinstance(o, torch.Tensor) and o.dim() > 0]


def _clip():
    return open_clip.CLIP(embed_dim=32, vision_cfg=_vision_cfg(), text_cfg=_text_cfg())


def _custom_bidir():
    # SigLIP-like text tower: bidirectional, pools the last token, no padding mask
    return open_clip.CustomTextCLIP(
        embed_dim=32, vision_cfg=_vision_cfg(),
        text_cfg=_text_cfg(no_causal_mask=True, pool_type="last", pad_id=1),
    )


def _needs_text_option(name: str) -> None:
    """open_clip_torch before 3.0 has no such ``TextTransformer`` option: nothing to test."""
    import inspect

    from open_clip.transformer import TextTransformer

    if name not in inspect.signature(TextTransformer.__init__).parameters:
        pytest.skip(f"this open_clip_torch has no TextTransformer({name}=...)")


def _text_padmask():
    from open_clip.transformer import TextTransformer

    _needs_text_option("use_pad_mask")
    return TextTransformer(**_text_cfg(no_causal_mask=True, use_pad_mask=True, pool_type="first"),
                           output_dim=32)


def _text_eos():
    from open_clip.transformer import TextTransformer

    _needs_text_option("eos_id")
    return TextTransformer(**_text_cfg(pool_type="eos", eos_id=VOCAB - 1), output_dim=32)


def _hf_text_cfg(**kw):
    return dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
                max_position_embeddings=CTX, vocab_size=VOCAB, bos_token_id=VOCAB - 2,
                eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1, **kw)


def _hf_vision_cfg():
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                image_size=IMG, patch_size=16)


def _hf_clip():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(text_config=_hf_text_cfg(), vision_config=_hf_vision_cfg(),
                                  projection_dim=32)
    return transformers.CLIPModel(cfg)


def _hf_siglip():
    transformers = pytest.importorskip("transformers")
    text = {**_hf_text_cfg(), "hidden_size": 64, "intermediate_size": 128, "projection_size": 64}
    cfg = transformers.SiglipConfig(text_config=text, vision_config=_hf_vision_cfg())
    return transformers.SiglipModel(cfg)


def _hf_clip_text_argmax():
    transformers = pytest.importorskip("transformers")
    # configs from before the eos fix say eos_token_id=2 and pool at the argmax of the ids
    cfg = transformers.CLIPTextConfig(**{**_hf_text_cfg(), "eos_token_id": 2})
    return transformers.CLIPTextModelWithProjection(cfg)


FAMILIES = {
    "clip": TextFamily(_clip, True),
    "custom_bidir": TextFamily(_custom_bidir, True, pad_id=1, causal=False),
    "text_padmask": TextFamily(_text_padmask, False, causal=False, pad_mask=True),
    "text_eos": TextFamily(_text_eos, False),
    "hf_clip": TextFamily(_hf_clip, True, pad_id=VOCAB - 1, hf=True),
    "hf_siglip": TextFamily(_hf_siglip, True, pad_id=1, causal=False, hf=True, class_token=False),
    "hf_clip_text_argmax": TextFamily(_hf_clip_text_argmax, False, pad_id=0, hf=True),
}

SETTINGS = {
    "r0": dict(merge_r=0),
    "keep1": dict(merge_r=0, text_prune_keep=1.0, text_prune_layers=(1,)),
    "both_r2": dict(merge_r=2),
    "text_only_r3": dict(merge_r=0, text_merge_r=3),
    "text_ramp": dict(text_merge_r=(2, 0.5)),
    "text_prune": dict(text_prune_keep=0.5, text_prune_layers=(1, 2)),
    "text_recycle": dict(text_prune_keep=0.5, text_prune_layers=(1,), prune_recycle=True,
                         prune_keep=0.7, prune_layers=(1,)),
    "text_diverse": dict(text_prune_keep=0.6, text_prune_layers=(2,), text_prune_score="diversity"),
    "text_entropy": dict(text_prune_keep=0.6, text_prune_layers=(0,), text_prune_score="attn_entropy"),
    "hybrid": dict(merge_r=1, text_prune_keep=0.7, text_prune_layers=(1,)),
    "guide_text": dict(guide="text", prune_keep=0.5, prune_layers=(1,)),
    "guide_image": dict(guide="image", text_prune_keep=0.5, text_prune_layers=(1,)),
}
IDENTITY = ("r0", "keep1")


def _settings(family: TextFamily, name: str):
    kw = dict(SETTINGS[name])
    if not family.two_towers:
        if name.startswith("guide"):
            return None
        # a text model alone: merge_r applies to it; the image tower's pruning does not exist
        kw = {k: v for k, v in kw.items() if not k.startswith("prune_")}
        if "prune_recycle" in SETTINGS[name]:  # unprefixed options reach a text model alone
            kw = dict(prune_keep=0.5, prune_layers=(1,), prune_recycle=True)
    elif not family.class_token and "prune_keep" in kw and "guide" not in kw:
        kw["prune_score"] = "attn_entropy"  # the image tower has no class token
    return kw


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def _build(name, seed=0):
    torch.manual_seed(seed)
    return FAMILIES[name].build().eval()


def _lengths(batch, seed):
    """``batch`` text lengths from LENGTHS, starting at index ``seed`` (seed 1, batch 3: the
    longest, a middle and the shortest text)."""
    return tuple(LENGTHS[(seed + i) % len(LENGTHS)] for i in range(batch))


def _towers(fam: TextFamily, image_layers: int, text_layers: int):
    """Protected tokens: the pooled token, and BOS in causal towers; an image tower's class
    token (SigLIP: none). Real text tokens per row: ``_real_counts``."""

    def towers(model, inputs):
        ids = inputs if isinstance(inputs, torch.Tensor) else inputs.get("text", inputs.get("input_ids"))
        P = 2 if fam.causal else 1
        out = {"text": Tower(P, _real_counts(fam, ids, P).tolist(), text_layers, ids.shape[1])}
        if fam.two_towers:
            n = (IMG // 16) ** 2
            out["image"] = Tower(1 if fam.class_token else 0, [n] * ids.shape[0], image_layers)
        return out

    return towers


def _family(name: str) -> Family:
    fam = FAMILIES[name]
    return Family(
        build=lambda: _build(name),
        inputs=lambda batch, seed: fam.inputs(_lengths(batch, seed), seed=seed - 1),
        settings={s: _settings(fam, s) for s in SETTINGS},
        identity={"r0": 0.0, "keep1": 0.0},
        towers=_towers(fam, image_layers=3, text_layers=4),
        outputs=lambda out, inputs: fam.outputs(out),
        changes_atol=1e-6,
        concurrency=("hybrid", "guide_text") if fam.two_towers else ("hybrid",),
    )


class TestTextTowers(AdapterTester):
    """The shared checks (tests/adapter_tester.py) on every text family above: padded
    batches of texts of different lengths."""

    families = {name: _family(name) for name in FAMILIES}


@pytest.mark.parametrize(
    "setting", ["both_r2", "text_only_r3", "text_ramp", "text_prune", "text_recycle", "text_diverse",
                "text_entropy", "hybrid"],
)
def test_padded_text_does_not_depend_on_batch_neighbours(family, setting):
    """Each text's embedding is the same alone and next to longer and shorter texts."""
    fam = FAMILIES[family]
    model = _build(family)
    vlprune.patch(model, **_settings(fam, setting))
    ids = fam.ids(LENGTHS)
    with torch.no_grad():
        batched = fam.encode_text(model, ids)
        for i in range(len(LENGTHS)):
            alone = fam.encode_text(model, fam.alone(ids, i))
            torch.testing.assert_close(batched[i : i + 1], alone, atol=2e-5, rtol=1e-4)
            reordered = fam.encode_text(model, ids.roll(i, dims=0))
            torch.testing.assert_close(reordered.roll(-i, dims=0), batched, atol=2e-5, rtol=1e-4)


def _real_counts(fam: TextFamily, ids: torch.Tensor, P: int) -> torch.Tensor:
    """Real tokens per row that are not protected, as the text path defines them."""
    if fam.causal:  # up to the EOT
        return (ids == VOCAB - 1).int().argmax(dim=-1) + 1 - P
    if fam.pad_mask:
        return (ids != fam.pad_id).sum(dim=1) - P
    return torch.full((ids.shape[0],), CTX - P)


def test_causal_positions_hold_after_merging():
    """A merged text token is as late as its latest source: the EOT (pooled) token keeps
    seeing every real token and no token sees a later one."""
    fam = FAMILIES["clip"]
    model = _build("clip")
    vlprune.patch(model, merge_r=0, text_merge_r=3)
    ids = fam.ids(LENGTHS)
    with torch.no_grad():
        model.encode_text(ids)
    state = model._vlprune.children["text"].state
    eot = ids.argmax(dim=-1)
    assert torch.equal(state.pos[:, 1], eot)  # the pooled token sits in slot 1
    assert bool((state.pos[state.valid] <= eot.repeat_interleave(state.valid.sum(1))).all())
    mask = state.attn_bias(torch.float32, prop_attn=False)[:, 0]
    assert bool(torch.isfinite(mask[:, 1][state.valid]).all())  # EOT sees all real tokens


def test_text_merging_changes_the_embedding_only_a_little_for_repeated_words():
    """Merging identical consecutive tokens must cost little: a text of one repeated word."""
    model = _build("clip")
    ids = torch.zeros(1, CTX, dtype=torch.long)
    ids[0, 0], ids[0, 1:15], ids[0, 15] = VOCAB - 2, 7, VOCAB - 1
    with torch.no_grad():
        model.positional_embedding.zero_()
        ref = model.encode_text(ids, normalize=True)
        vlprune.patch(model, merge_r=0, text_merge_r=3)
        out = model.encode_text(ids, normalize=True)
    assert vlprune.describe(model, dict(image=torch.randn(1, 3, IMG, IMG), text=ids),
                            flops=False).layers[-1].tokens_out < 16
    # with a causal mask, merged repeated tokens are not exact (earlier tokens lose a
    # neighbour), but the pooled embedding must stay close
    assert torch.nn.functional.cosine_similarity(out, ref).item() > 0.99


def test_guide_text_keeps_the_patches_aligned_with_the_text():
    model = _build("clip")
    vlprune.patch(model, guide="text", prune_keep=0.25, prune_layers=(1,), trace_source=True)
    img = torch.randn(2, 3, IMG, IMG)
    image_ctx = model._vlprune.children["image"]
    with torch.no_grad():
        # target: the embedding of patch 5 of image 0 after layer 1 -> that patch must survive
        captured = {}
        blk = model.visual.transformer.resblocks[1]
        h = blk.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
        with vlprune.disabled(model):
            model.encode_image(img)
        h.remove()
        target = model._vlprune_project_image(captured["x"])[0, 1 + 5]
        vlprune.set_guide(model, target.unsqueeze(0))
        model.encode_image(img)
        src = vlprune.get_source(model, "image")
    n = (IMG // 16) ** 2
    assert src.shape == (2, 1 + math.ceil(0.25 * n), 1 + n)  # class token + kept patches
    assert src[0, :, 1 + 5].sum() == 1  # patch 5 of image 0 is held by a kept token
    from vlprune.adapters.step import guided_scores

    scores = guided_scores(image_ctx, captured["x"])
    assert scores[0, 1 + 5] == scores[0, 1:].max()
    state = image_ctx.state
    assert state.size is None  # pure dropping
    # the kept patches of image 0 include patch 5
    desc = vlprune.describe(model, img, flops=False)
    assert desc.layers[1].tokens_out == 1 + 4


def test_guide_needs_the_other_modality():
    model = _build("clip")
    vlprune.patch(model, guide="text", prune_keep=0.5, prune_layers=(1,))
    with torch.no_grad(), pytest.raises(RuntimeError, match="set_guide"):
        model.encode_image(torch.randn(1, 3, IMG, IMG))
    fam = FAMILIES["clip"]
    inputs = fam.inputs(LENGTHS[:2])
    with torch.no_grad():
        img_f, txt_f, _ = model(**inputs)  # both modalities: the texts guide the images
        # the forward's own texts guided it, and did not stay set afterwards
        assert model._vlprune.children["image"].guide_embeds is None
        vlprune.set_guide(model, txt_f)
        torch.testing.assert_close(model.encode_image(inputs["image"], normalize=True), img_f)
        with vlprune.disabled(model):
            ref = model(**inputs)
        torch.testing.assert_close(txt_f, ref[1])  # the text tower was not reduced
    with pytest.raises(ValueError, match="shape"):
        vlprune.set_guide(model, torch.randn(32))
    vlprune.set_guide(model, torch.randn(3, 7))
    with torch.no_grad(), pytest.raises(ValueError, match="size 7"):
        model.encode_image(inputs["image"])


def test_guide_image_drops_text_tokens():
    model = _build("clip")
    vlprune.patch(model, guide="image", text_prune_keep=0.5, text_prune_layers=(1,))
    fam = FAMILIES["clip"]
    inputs = fam.inputs(LENGTHS[:2])
    with torch.no_grad():
        img_f, txt_f, _ = model(**inputs)
        with vlprune.disabled(model):
            ref = model(**inputs)
    torch.testing.assert_close(img_f, ref[0])
    assert not torch.allclose(txt_f, ref[1])
    desc = vlprune.describe(model, inputs, flops=False)
    text = [lr for lr in desc.layers if lr.tower == "text"]
    assert text[1].tokens_out < text[1].tokens_in


def test_output_dict_and_custom_text_clip_guided():
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(
        embed_dim=32, vision_cfg=_vision_cfg(), text_cfg=_text_cfg(), output_dict=True
    ).eval()
    vlprune.patch(model, guide="text", prune_keep=0.5, prune_layers=(1,), text_merge_r=2)
    inputs = FAMILIES["clip"].inputs(LENGTHS[:3])
    with torch.no_grad():
        out = model(**inputs)
    assert set(out) >= {"image_features", "text_features", "logit_scale"}
    assert out["image_features"].shape == out["text_features"].shape == (3, 32)


def test_zero_shot_loop():
    """encode_text once for the class prompts, encode_image per batch, argmax: batch sizes 1..N."""
    model = _build("clip")
    fam = FAMILIES["clip"]
    prompts = fam.ids((6, 7, 8, 9, 10), seed=3)
    images = torch.randn(5, 3, IMG, IMG)
    vlprune.patch(model, merge_r=2, text_merge_r=1)
    with torch.no_grad():
        classes = model.encode_text(prompts, normalize=True)
        whole = (model.encode_image(images, normalize=True) @ classes.T).argmax(-1)
        one_by_one = torch.cat([
            (model.encode_image(images[i : i + 1], normalize=True) @ classes.T).argmax(-1)
            for i in range(5)
        ])
    assert torch.equal(whole, one_by_one)


def test_text_settings_on_an_image_model_are_refused():
    from open_clip.transformer import VisionTransformer

    visual = VisionTransformer(image_size=IMG, patch_size=16, width=64, layers=2, heads=2,
                               mlp_ratio=2.0, output_dim=32)
    with pytest.raises(ValueError, match="no text tower"):
        vlprune.patch(visual, text_merge_r=2)
    with pytest.raises(ValueError, match="image and a text tower"):
        vlprune.patch(visual, guide="text", prune_keep=0.5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(guide="text"), "prune_keep"),
        (dict(guide="image", prune_keep=0.5), "text_prune_keep"),
        (dict(guide="audio"), "allowed"),
        (dict(text_prune_layers=(1,)), "text_prune_keep"),
        (dict(text_prune_score="cls_attn"), "text_prune_keep"),
        (dict(text_prune_keep=1.5), r"\(0, 1\]"),
        (dict(text_merge_r=-1), ">= 0"),
        (dict(guide="text", prune_keep=0.5, prune_score="random"), "prune_score"),
    ],
)
def test_bad_text_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        vlprune.ReductionConfig(**kw)


def test_text_fuse_and_coca_are_refused():
    model = _build("text_eos")
    with pytest.raises(ValueError, match="prune_fuse"):
        vlprune.patch(model, prune_fuse=True, prune_keep=0.5)
    from open_clip.transformer import TextTransformer

    coca = TextTransformer(**_text_cfg(embed_cls=True), output_dim=32)
    with pytest.raises(vlprune.UnsupportedModelError, match="CoCa"):
        vlprune.patch(coca, merge_r=2)


def test_configure_reaches_both_towers():
    model = _build("clip")
    vlprune.patch(model, merge_r=2)
    assert model._vlprune.children["text"].schedule[0] == 2
    vlprune.configure(model, text_merge_r=0)
    assert model._vlprune.children["text"].schedule == [0] * 4
    assert model._vlprune.children["image"].schedule == [2] * 3
    assert vlprune.get_config(model).text_merge_r == 0


@pytest.mark.parametrize("name", ["hf_clip", "hf_siglip"])
def test_hf_retrieval_loop_batch_sizes(name):
    """get_text_features once, get_image_features in batches of 1..N: the same ranking."""
    fam = FAMILIES[name]
    model = _build(name)
    vlprune.patch(model, merge_r=2, text_merge_r=1)
    lengths = (6, 9, 4, 12, 7)
    texts = fam.text_kwargs(fam.ids(lengths, seed=5))
    images = torch.randn(5, 3, IMG, IMG)
    with torch.no_grad():
        t = model.get_text_features(**texts).pooler_output
        t = t / t.norm(dim=-1, keepdim=True)
        scores = []
        for bs in (1, 2, 5):
            feats = torch.cat([
                model.get_image_features(pixel_values=images[i : i + bs]).pooler_output
                for i in range(0, 5, bs)
            ])
            scores.append(feats / feats.norm(dim=-1, keepdim=True) @ t.T)
    for s in scores[1:]:
        torch.testing.assert_close(s, scores[0], atol=1e-5, rtol=1e-4)
