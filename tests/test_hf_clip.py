"""Hugging Face CLIP / SigLIP image towers (transformers 5.x): tiny random models (eager and
sdpa attention) registered with the shared tester (tests/adapter_tester.py), then
size-weighted pooling, outputs and errors."""

from __future__ import annotations

import pytest
import torch
from adapter_tester import AdapterTester, Family, Tower
from helpers import SETTINGS, module_calls, vlprune_attrs

import vlprune
from vlprune.adapters.base import find_adapter
from vlprune.core.state import TokenState

transformers = pytest.importorskip("transformers")

IMG = 96  # 6 x 6 = 36 patches; CLIP adds a class token
VISION = dict(image_size=IMG, patch_size=16, hidden_size=64, intermediate_size=128,
              num_hidden_layers=4, num_attention_heads=2)


def _clip(cls_name="CLIPVisionModel", attn="sdpa", **kw):
    cfg = transformers.CLIPVisionConfig(**{**VISION, **kw}, projection_dim=32, attn_implementation=attn)
    return getattr(transformers, cls_name)(cfg)


def _siglip(attn="sdpa", **kw):
    cfg = transformers.SiglipVisionConfig(**{**VISION, **kw}, attn_implementation=attn)
    return transformers.SiglipVisionModel(cfg)


MODELS = {
    "clip_sdpa": lambda: _clip(),
    "clip_eager": lambda: _clip(attn="eager"),
    "clip_proj": lambda: _clip("CLIPVisionModelWithProjection"),
    "siglip_sdpa": lambda: _siglip(),
    "siglip_eager": lambda: _siglip(attn="eager"),
}



def _build(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def _x(batch=2, seed=1, size=IMG):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tower(model):
    return getattr(model, "vision_model", model)


def _num_protected(model):
    return 1 if hasattr(_tower(model).embeddings, "class_embedding") else 0


def _pooled(out):
    """The model's image feature: image_embeds (with projection) or pooler_output."""
    return out.image_embeds if getattr(out, "image_embeds", None) is not None else out.pooler_output


@pytest.fixture(params=list(MODELS))
def model_name(request):
    return request.param


def _towers(model, x):
    n = (x.shape[-2] // 16) * (x.shape[-1] // 16)
    return {"image": Tower(_num_protected(model), [n] * x.shape[0], len(_tower(model).encoder.layers))}


def _last_hidden_state_is_the_reduced_sequence(model, x, out, desc):
    assert out.last_hidden_state.shape[1] == desc.layers[-1].tokens_out


def _family(name):
    # SigLIP has no class token: class-token scores fall back to attn_entropy
    no_cls = name.startswith("siglip")
    settings = {
        s: {**kw, "prune_score": "attn_entropy"} if no_cls and "prune_keep" in kw and "prune_score" not in kw else kw
        for s, kw in SETTINGS.items()
    }
    return Family(
        build=lambda: _build(name), inputs=lambda batch, seed: _x(batch, seed), settings=settings,
        identity={"r0": 0.0, "keep1": 0.0}, towers=_towers,
        outputs=lambda out, x: [_pooled(out), out.last_hidden_state], same_shape=(0,),
        check=_last_hidden_state_is_the_reduced_sequence, concurrency=("hybrid",),
    )


class TestHFClipVision(AdapterTester):
    """The shared checks (tests/adapter_tester.py) on every model above."""

    families = {name: _family(name) for name in MODELS}


def test_merging_changes_tokens_and_outputs(model_name):
    model = _build(model_name)
    x = _x()
    with torch.no_grad():
        ref = _pooled(model(x))
        vlprune.patch(model, merge_r=4)
        out = _pooled(model(x))
    assert not torch.allclose(out, ref)
    desc = vlprune.describe(model, x, flops=False)
    assert desc.layers[-1].tokens_out == desc.layers[0].tokens_in - 16


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_eager_and_sdpa_agree(attn):
    """Both attention implementations add the size bias the same way."""
    for build in (_clip, _siglip):
        torch.manual_seed(0)
        a = build(attn="eager").eval()
        b = build(attn=attn).eval()
        b.load_state_dict(a.state_dict())
        for m in (a, b):
            vlprune.patch(m, merge_r=4, prune_keep=0.6, prune_layers=(1,), prune_score="key_norm")
        with torch.no_grad():
            torch.testing.assert_close(_pooled(a(_x())), _pooled(b(_x())), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["clip_sdpa", "clip_eager", "clip_proj"])
def test_merging_identical_tokens_is_exact_clip(name):
    """Zero position embedding and a constant image: all patch tokens are equal, so merging
    with proportional attention must reproduce the unpatched (class-token) features."""
    model = _build(name)
    with torch.no_grad():
        _tower(model).embeddings.position_embedding.weight.zero_()
        x = torch.full((2, 3, IMG, IMG), 0.3)
        x[1] = -0.7
        ref = _pooled(model(x))
        vlprune.patch(model, merge_r=8)
        out = _pooled(model(x))
        assert vlprune.describe(model, x, flops=False).layers[-1].tokens_out < 20
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        vlprune.configure(model, prop_attn=False)
        assert not torch.allclose(_pooled(model(x)), ref, atol=1e-4)  # the bias matters


@pytest.mark.parametrize("name", ["siglip_sdpa", "siglip_eager"])
def test_merging_identical_tokens_is_exact_siglip(name):
    """SigLIP has no class token and pools with an attention probe. An image of two constant
    halves (zero position embedding) gives two kinds of patch token; merges only join equal
    tokens, so the probe must weigh each merged token by its size to reproduce the output."""
    model = _build(name)
    right = torch.zeros(6, 6, dtype=torch.bool)
    right[:, 3:] = True
    right = right.flatten()
    with torch.no_grad():
        model.embeddings.position_embedding.weight.zero_()
        x = torch.full((2, 3, IMG, IMG), 0.3)
        x[1] = -0.7
        x[..., IMG // 2 :] = 1.1
        ref = model(x).pooler_output
        vlprune.patch(model, merge_r=5, trace_source=True)
        out = model(x).pooler_output
        source = vlprune.get_source(model)
        assert source.shape[1] == 16
        # the test is only meaningful if no merged token mixes the two halves
        assert not ((source[..., right].sum(-1) > 0) & (source[..., ~right].sum(-1) > 0)).any()
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        vlprune.configure(model, prop_attn=False)
        assert not torch.allclose(model(x).pooler_output, ref, atol=1e-3)


def test_siglip_head_weighs_merged_tokens_by_size():
    """The patched pooling head on tokens with sizes equals the upstream head on the tokens
    repeated that many times (and differs from ignoring the sizes)."""
    model = _build("siglip_sdpa")
    vlprune.patch(model, merge_r=2)
    head, ctx = model.head, model._vlprune
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 5, 64, generator=g)
    counts = torch.tensor([[1, 3, 2, 1, 4], [2, 1, 1, 6, 1]])
    repeated = torch.stack([t.repeat_interleave(c, dim=0) for t, c in zip(tokens, counts)])
    with torch.no_grad():
        with vlprune.disabled(model):
            expected = head(repeated)
            unweighted = head(tokens)
        ctx.call.state = TokenState(num_protected=0, size=counts.unsqueeze(-1).float())
        pooled = head(tokens)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled, unweighted, atol=1e-3)


@pytest.mark.parametrize("name", ["clip_eager", "clip_proj", "siglip_sdpa"])
def test_every_upstream_submodule_still_runs(name):
    """The patched forward calls every submodule the upstream forward calls, in order."""
    model = _build(name)
    ref = module_calls(model, _x())
    kw = dict(merge_r=3, prune_keep=0.6, prune_layers=(1,))
    vlprune.patch(model, **kw, prune_score="cls_attn" if _num_protected(model) else "key_norm")
    assert module_calls(model, _x()) == ref


@pytest.mark.parametrize(
    "build", [_clip, lambda attn: _clip("CLIPVisionModelWithProjection", attn), _siglip]
)
def test_hidden_states_and_attentions_follow_the_tokens(build):
    """output_hidden_states / output_attentions (eager) give one tensor per layer, each as long
    as that layer's sequence."""
    torch.manual_seed(0)
    model = build(attn="eager").eval()
    vlprune.patch(model, merge_r=4)
    with torch.no_grad():
        out = model(_x(), output_hidden_states=True, output_attentions=True)
    tokens = [lr.tokens_in for lr in vlprune.describe(model, _x(), flops=False).layers]
    assert [h.shape[1] for h in out.hidden_states] == [*tokens, tokens[-1] - 4]
    assert [a.shape[-1] for a in out.attentions] == tokens


def test_describe_and_example_input():
    for name in ("clip_sdpa", "clip_proj", "siglip_sdpa"):
        model = _build(name)
        vlprune.patch(model, merge_r=4)
        adapter = find_adapter(model)
        assert adapter.name == "hf_clip_vision"
        assert adapter.default_input_size(model) == (3, IMG, IMG)
        assert adapter.example_input(model, 2).shape == (2, 3, IMG, IMG)
        desc = vlprune.describe(model)
        assert desc.family == "hf_clip_vision" and desc.input_shape == (1, 3, IMG, IMG)
        assert desc.flops_ratio > 1.15
        vlprune.configure(model, merge_r=0)
        assert vlprune.describe(model).flops_ratio == 1.0


def test_interpolated_position_encoding():
    model = _build("clip_sdpa")
    vlprune.patch(model, merge_r=3)
    with torch.no_grad():
        out = model(_x(size=128), interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape[1] == 8 * 8 + 1 - 4 * 3


def test_backward_through_merging():
    model = _build("siglip_sdpa").train()
    vlprune.patch(model, merge_r=4)
    model(_x()).pooler_output.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_clip_model_image_tower():
    """A CLIPModel's vision_model is a CLIPVisionModel: patching it reduces get_image_features
    (and the full forward) while the text tower runs untouched."""
    torch.manual_seed(0)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    clip = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=32)
    ).eval()
    x, ids = _x(), torch.randint(2, 100, (2, 8))
    with torch.no_grad():
        ref = clip.get_image_features(pixel_values=x).pooler_output
        ref_logits = clip(input_ids=ids, pixel_values=x).logits_per_image
        vlprune.patch(clip.vision_model, merge_r=4)
        out = clip.get_image_features(pixel_values=x).pooler_output
        assert out.shape == ref.shape and not torch.allclose(out, ref)
        assert clip(input_ids=ids, pixel_values=x).logits_per_image.shape == ref_logits.shape
        desc = vlprune.describe(clip.vision_model, x, flops=False)
        assert desc.layers[-1].tokens_out == 37 - 16
        vlprune.unpatch(clip.vision_model)
        torch.testing.assert_close(clip.get_image_features(pixel_values=x).pooler_output, ref, atol=0, rtol=0)
    assert vlprune_attrs(clip) == []


def test_siglip_model_image_tower():
    torch.manual_seed(0)
    text = dict(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16)
    sig = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=VISION)).eval()
    x, ids = _x(), torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        ref = sig.get_image_features(pixel_values=x).pooler_output
        vlprune.patch(sig.vision_model, merge_r=4)
        out = sig.get_image_features(pixel_values=x).pooler_output
        assert out.shape == ref.shape and not torch.allclose(out, ref)
        assert sig(input_ids=ids, pixel_values=x).logits_per_image.shape == (2, 2)
        vlprune.unpatch(sig.vision_model)
        torch.testing.assert_close(sig.get_image_features(pixel_values=x).pooler_output, ref, atol=0, rtol=0)


def test_with_projection_root_holds_the_context():
    model = _build("clip_proj")
    vlprune.patch(model, merge_r=2)
    assert vlprune.is_patched(model) and not vlprune.is_patched(model.vision_model)
    assert model.vision_model._vlprune_ctx is model._vlprune
    with pytest.raises(ValueError, match="already patched"):
        vlprune.patch(model.vision_model, merge_r=3)
    assert model.vision_model._vlprune_ctx is model._vlprune


def test_pickling_a_patched_model_explains_itself(tmp_path):
    model = _build("clip_proj")
    vlprune.patch(model, merge_r=2)
    with pytest.raises(TypeError, match="state_dict"):
        torch.save(model, tmp_path / "m.pt")
    vlprune.unpatch(model)
    torch.save(model, tmp_path / "m.pt")


# --- errors -----------------------------------------------------------------------------


def test_flash_attention_with_prop_attn_is_refused():
    model = _build("clip_sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(vlprune.UnsupportedModelError, match="flash_attention_2.*prop_attn=False"):
        vlprune.patch(model, merge_r=2)
    assert not vlprune.is_patched(model)
    vlprune.patch(model, merge_r=2, prop_attn=False)  # no bias: any implementation will do
    vlprune.patch(model, merge_r=0)  # reduces nothing: nothing to refuse


def test_bias_for_an_implementation_without_masks_is_refused_by_configure():
    """configure() refuses proportional attention as patch() does (settings unchanged)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def no_mask(module, q, k, v, attention_mask, **kw):
        return sdpa_attention_forward(module, q, k, v, None, **kw)

    AttentionInterface.register("vlprune_test_no_mask", no_mask)
    torch.manual_seed(0)
    model = _clip(attn="vlprune_test_no_mask").eval()
    with pytest.raises(vlprune.UnsupportedModelError, match="vlprune_test_no_mask"):
        vlprune.patch(model, merge_r=2)
    vlprune.patch(model, merge_r=2, prop_attn=False)
    with torch.no_grad():
        assert model(_x()).pooler_output.shape == (2, 64)
        with pytest.raises(vlprune.UnsupportedModelError, match="vlprune_test_no_mask"):
            vlprune.configure(model, prop_attn=True)
        assert vlprune.get_config(model).prop_attn is False
        assert model(_x()).pooler_output.shape == (2, 64)


def test_attention_mask_with_reduction_is_refused():
    model = _build("clip_sdpa")
    vlprune.patch(model, merge_r=3)
    with pytest.raises(ValueError, match="attention_mask"):
        model(_x(), attention_mask=torch.zeros(1, 1, 37, 37))


def test_unknown_encoder_layer_is_refused():
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    class ParallelLayer(CLIPEncoderLayer):
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            h = self.layer_norm1(hidden_states)
            return hidden_states + self.self_attn(h)[0] + self.mlp(h)

    model = _build("clip_sdpa")
    model.encoder.layers[1].__class__ = ParallelLayer
    with pytest.raises(vlprune.UnsupportedModelError, match=r"layers\[1\] is .*ParallelLayer"):
        vlprune.patch(model, merge_r=2)
    assert not vlprune.is_patched(model) and vlprune_attrs(model) == []


def test_whole_two_tower_models_are_not_matched_by_this_adapter():
    from vlprune.adapters.hf_clip import HFClipVisionAdapter

    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=VISION))
    adapter = HFClipVisionAdapter()
    assert not adapter.matches(clip) and not adapter.matches(clip.text_model)
    assert adapter.matches(clip.vision_model)


def test_class_token_scores_need_a_class_token():
    model = _build("siglip_sdpa")
    with pytest.raises(ValueError, match="no class token.*key_norm"):
        vlprune.patch(model, prune_keep=0.5)
    vlprune.patch(model, prune_keep=0.5, prune_score="key_norm")
    assert model(_x()).pooler_output.shape == (2, 64)
