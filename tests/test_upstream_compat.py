"""Patched models behave exactly like upstream wherever they reduce nothing (tiny random
models of every family).

* settings that remove no token (``merge_r=0``, ``prune_keep=1.0`` at every pruning layer,
  LLaVA's ``visual_keep=1.0``) give the unpatched outputs bit for bit and refuse nothing the
  unpatched model accepts (gradient checkpointing, which settings that reduce take too,
  ``forward_intermediates`` in NCHW);
* ``torch.jit.script`` of a patched model refuses with one clear message saying how to script
  (unpatch first); the unpatched model scripts as upstream;
* the swapped classes look like upstream's from outside: names and modules (transformers'
  ``is_custom_code``, checkpoint conversion mappings, ``config.architectures``, weight
  initialisation), method signatures, class-level constructors that build upstream models;
* models a user would patch are supported: ``CLIPForImageClassification`` and
  ``SiglipForImageClassification`` (size-weighted mean of the patch tokens), the LLaVA base
  models (``LlavaModel`` and the anyres ones) without the language-model head.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import vlprune

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

IMG = 32
IDENTITY = {
    "r0": dict(merge_r=0),
    "r0_list": dict(merge_r=[0, 0, 0]),
    "keep1": dict(prune_keep=1.0, prune_layers=(0, 1)),
    "keep1_list": dict(prune_keep=[1.0, 1.0], prune_layers=(1, 2), merge_r=0),
}


def _pixels(batch=2, seed=1, size=IMG):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ids(vocab=99, lengths=(5, 9), eos=None, pad=0):
    """Token rows of different lengths, padded on the right, and their attention mask."""
    g = torch.Generator().manual_seed(0)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab - 2, (n,), generator=g)
        if eos is not None:
            ids[i, n - 1] = eos
        mask[i, :n] = 1
    return ids, mask


# --- tiny models of every family, and their inputs ------------------------------------------


def _timm_vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=3,
                             embed_dim=32, num_heads=2, num_classes=5)


def _timm_vit_no_cls():
    return timm.create_model("vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=3,
                             embed_dim=32, num_heads=2, num_classes=5, class_token=False,
                             global_pool="avg")


def _open_clip_visual():
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=IMG, patch_size=8, width=32, layers=3, heads=2,
                             mlp_ratio=2.0, output_dim=16)


def _open_clip_model():
    return open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=IMG, patch_size=8, width=32, layers=3, head_width=16),
        text_cfg=dict(context_length=12, vocab_size=99, width=32, heads=2, layers=3),
    )


def _hf_clip_vision(cls_name="CLIPVisionModel"):
    cfg = transformers.CLIPVisionConfig(image_size=IMG, patch_size=8, hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, projection_dim=16)
    return getattr(transformers, cls_name)(cfg)


def _siglip_vision():
    cfg = transformers.SiglipVisionConfig(image_size=IMG, patch_size=8, hidden_size=32,
                                          intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=2)
    return transformers.SiglipVisionModel(cfg)


def _hf_text_config(cls, **kw):
    return cls(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=2, max_position_embeddings=16, **kw)


def _hf_clip_text():
    return transformers.CLIPTextModel(_hf_text_config(transformers.CLIPTextConfig, eos_token_id=98))


def _hf_clip_model():
    cfg = transformers.CLIPConfig(
        text_config=_hf_text_config(transformers.CLIPTextConfig, eos_token_id=98).to_dict(),
        vision_config=_hf_clip_vision().config.to_dict(), projection_dim=16,
    )
    return transformers.CLIPModel(cfg)


def _siglip_model():
    cfg = transformers.SiglipConfig(
        text_config=_hf_text_config(transformers.SiglipTextConfig).to_dict(),
        vision_config=_siglip_vision().config.to_dict(),
    )
    return transformers.SiglipModel(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=3, num_attention_heads=2,
                                  max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg)


def _text_inputs(hf=True, eos=98):
    ids, mask = _ids(eos=eos)
    return dict(input_ids=ids, attention_mask=mask) if hf else ids


# name -> (build, inputs, the output tensors to compare)
FAMILIES = {
    "timm_vit": (_timm_vit, lambda: _pixels(), lambda out: [out]),
    "timm_vit_no_cls": (_timm_vit_no_cls, lambda: _pixels(), lambda out: [out]),
    "open_clip_visual": (_open_clip_visual, lambda: _pixels(), lambda out: [out]),
    "open_clip_clip": (
        _open_clip_model,
        lambda: dict(image=_pixels(), text=torch.cat([_ids(eos=98)[0], torch.zeros(2, 3, dtype=torch.long)], 1)),
        lambda out: [out[0], out[1]],
    ),
    "hf_clip_vision": (_hf_clip_vision, lambda: dict(pixel_values=_pixels()),
                       lambda out: [out.last_hidden_state, out.pooler_output]),
    "hf_siglip_vision": (_siglip_vision, lambda: dict(pixel_values=_pixels()),
                         lambda out: [out.last_hidden_state, out.pooler_output]),
    "hf_clip_text": (_hf_clip_text, _text_inputs,
                     lambda out: [out.last_hidden_state, out.pooler_output]),
    "hf_clip_model": (_hf_clip_model, lambda: dict(**_text_inputs(), pixel_values=_pixels()),
                      lambda out: [out.logits_per_image, out.text_embeds, out.image_embeds]),
    "hf_siglip_model": (_siglip_model, lambda: dict(input_ids=_ids(lengths=(7, 7))[0], pixel_values=_pixels()),
                        lambda out: [out.logits_per_image, out.text_embeds, out.image_embeds]),
    "hf_bert": (_bert, lambda: dict(zip(("input_ids", "attention_mask"), _ids())),
                lambda out: [out.last_hidden_state, out.pooler_output]),
}


def _build(name):
    torch.manual_seed(0)
    return FAMILIES[name][0]().eval()


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _settings(name, kw):
    """Two-tower models and text models take the text tower's options too."""
    if name in ("open_clip_clip", "hf_clip_model", "hf_siglip_model") and "prune_keep" in kw:
        return {**kw, "text_prune_keep": kw["prune_keep"], "text_prune_layers": kw["prune_layers"]}
    return kw


def _assert_equal(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and torch.equal(a, b), (
            f"{what}: output {i} differs from the unpatched model by "
            f"{(a.float() - b.float()).abs().max() if a.shape == b.shape else (a.shape, b.shape)}")


# --- item 2: reducing nothing is upstream --------------------------------------------------


@pytest.mark.parametrize("setting", list(IDENTITY))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_reducing_nothing_is_upstream_bit_for_bit(name, setting):
    build, inputs, outputs = FAMILIES[name]
    model, x = _build(name), inputs()
    ref = outputs(_run(model, x))
    # the default score of the unpruned layers (class attention) needs no class token either
    vlprune.patch(model, **_settings(name, IDENTITY[setting]))
    _assert_equal(outputs(_run(model, x)), ref, f"{name} patched with {setting}")
    desc = vlprune.describe(model, x)
    assert all(lr.tokens_out == lr.tokens_in for lr in desc.layers)
    vlprune.unpatch(model)
    _assert_equal(outputs(_run(model, x)), ref, f"{name} unpatched")


def _train_step(model, x, outputs):
    """Loss and gradients of one training forward (no dropout in these models)."""
    model.zero_grad(set_to_none=True)
    out = outputs(model(**x) if isinstance(x, dict) else model(x))
    loss = sum(o.float().square().mean() for o in out)
    loss.backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None}


def _checkpointing_on(model, enable=True):
    if hasattr(model, "activation_checkpointing_enable"):  # transformers (was gradient_checkpointing_enable)
        model.activation_checkpointing_enable() if enable else model.activation_checkpointing_disable()
    elif hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(enable)
    else:
        model.visual.set_grad_checkpointing(enable)


def _checkpointing_off(model):
    _checkpointing_on(model, enable=False)


@pytest.mark.parametrize("setting", ["r0", "keep1"])
@pytest.mark.parametrize("name", ["timm_vit", "open_clip_visual", "hf_clip_vision", "hf_clip_text",
                                  "hf_bert", "open_clip_clip"])
def test_reducing_nothing_allows_gradient_checkpointing(name, setting):
    build, inputs, outputs = FAMILIES[name]
    model, x = _build(name), inputs()
    _checkpointing_on(model)
    model.train()
    ref, ref_grads = _train_step(model, x, outputs)
    vlprune.patch(model, **_settings(name, IDENTITY[setting]))
    out, grads = _train_step(model, x, outputs)
    _assert_equal(out, ref, f"{name} {setting} with gradient checkpointing")
    assert grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    # a setting that reduces trains with checkpointing too: each recomputed block replays
    # its first run (tests/test_training.py has the families' own checks)
    vlprune.configure(model, merge_r=1)
    out, grads = _train_step(model, x, outputs)
    _checkpointing_off(model)
    ref, ref_grads = _train_step(model, x, outputs)
    _assert_equal(out, ref, f"{name} merge_r=1 with gradient checkpointing")
    assert grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)


def _flat(out) -> list[torch.Tensor]:
    """The tensors of a ``forward_intermediates`` result (timm: a tuple, open_clip: a dict)."""
    if isinstance(out, tuple):
        return [out[0], *out[1]]
    return [t for v in out.values() for t in (v if isinstance(v, list) else [v])]


@pytest.mark.parametrize("name", ["timm_vit", "open_clip_visual"])
def test_reducing_nothing_allows_nchw_intermediates(name):
    model, x = _build(name), _pixels()
    with torch.no_grad():
        ref = model.forward_intermediates(x, output_fmt="NCHW")
        vlprune.patch(model, prune_keep=1.0, prune_layers=(0, 1))
        got = model.forward_intermediates(x, output_fmt="NCHW")
    _assert_equal(_flat(got), _flat(ref), f"{name} forward_intermediates NCHW")
    vlprune.configure(model, prune_keep=0.5)
    with pytest.raises(ValueError, match="output_fmt='NLC'"):
        model.forward_intermediates(x, output_fmt="NCHW")


# --- LLaVA ------------------------------------------------------------------------------------

LLAVA_IMAGE_ID = 199


def _llava(cls_name="LlavaForConditionalGeneration"):
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=32, patch_size=8),
        text_config=transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=200, pad_token_id=0, max_position_embeddings=128),
        image_token_index=LLAVA_IMAGE_ID, image_seq_length=16,
    )
    return getattr(transformers, cls_name)(cfg).eval()


def _llava_inputs(batch=2):
    g = torch.Generator().manual_seed(3)
    text = torch.randint(1, LLAVA_IMAGE_ID, (batch, 7), generator=g)
    ids = torch.cat([text[:, :3], torch.full((batch, 16), LLAVA_IMAGE_ID), text[:, 3:]], dim=1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=_pixels(batch))


LLAVA_IDENTITY = {
    "visual_keep1": dict(visual_keep=1.0),
    "tower_keep1": dict(prune_keep=1.0, prune_layers=(0,)),
    "tower_r0_list": dict(merge_r=[0]),
    "all_keep1": dict(visual_keep=1.0, prune_keep=1.0, prune_layers=(0,), llm_layer=1, llm_keep=1.0),
}


@pytest.mark.parametrize("setting", list(LLAVA_IDENTITY))
def test_llava_reducing_nothing_is_upstream_bit_for_bit(setting):
    model, x = _llava(), _llava_inputs()
    with torch.no_grad():
        ref = model(**x).logits
        ref_gen = model.generate(**x, max_new_tokens=3, do_sample=False)
        vlprune.patch(model, **LLAVA_IDENTITY[setting])
        assert torch.equal(model(**x).logits, ref)
        assert torch.equal(model.generate(**x, max_new_tokens=3, do_sample=False), ref_gen)
        vlprune.unpatch(model)
        assert torch.equal(model(**x).logits, ref)


def test_llava_tower_reducing_nothing_allows_gradient_checkpointing():
    model, x = _llava(), _llava_inputs()
    _checkpointing_on(model)
    model.train()
    logits = lambda out: [out.logits]  # noqa: E731
    ref, ref_grads = _train_step(model, x, logits)
    vlprune.patch(model, prune_keep=1.0, prune_layers=(0,))
    out, grads = _train_step(model, x, logits)
    _assert_equal(out, ref, "LLaVA tower keep 1.0 with gradient checkpointing")
    assert grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    vlprune.configure(model, prune_keep=0.5)
    out, grads = _train_step(model, x, logits)
    _checkpointing_off(model)
    ref, ref_grads = _train_step(model, x, logits)
    _assert_equal(out, ref, "LLaVA tower keep 0.5 with gradient checkpointing")
    assert grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)


# --- item 1: TorchScript -------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["timm_vit", "open_clip_visual"])
def test_scripting_a_patched_model_says_how(name):
    model, x = _build(name), _pixels()
    with torch.no_grad():
        ref = model(x)
        # upstream scripts this model
        assert torch.allclose(torch.jit.script(model)(x), ref, atol=1e-5)
        for kw in (dict(merge_r=2), dict(prune_keep=1.0, prune_layers=(1,))):
            vlprune.patch(model, **kw)
            with pytest.raises(RuntimeError, match=r"vlprune\.unpatch\(model\) first") as err:
                torch.jit.script(model)
            assert "torch.jit.script" in str(err.value)
            blocks = model.blocks if hasattr(model, "blocks") else model.transformer.resblocks
            with pytest.raises(RuntimeError, match=r"vlprune\.unpatch"):  # a patched part alone
                torch.jit.script(blocks[0])
            assert vlprune.is_patched(model)  # the refusal changed nothing
            vlprune.unpatch(model)
            scripted = torch.jit.script(model)
            assert torch.allclose(scripted(x), ref, atol=1e-5)
            assert torch.equal(model(x), ref)


# --- item 3: the swapped classes look like upstream's -----------------------------------------

HF_FAMILIES = ["hf_clip_vision", "hf_siglip_vision", "hf_clip_text", "hf_clip_model",
               "hf_siglip_model", "hf_bert"]
PATCHES = {"hf_bert": dict(merge_r=1), "hf_siglip_vision": dict(merge_r=1)}


def _patched_modules(model, before):
    """``(name, module, upstream class)`` of every module whose class the patch swapped."""
    return [(n, m, before[n]) for n, m in model.named_modules() if type(m) is not before[n]]


def _upstream_methods(module, upstream):
    """The public methods a patched module overrides, with their upstream versions."""
    return [(name, getattr(module, name), getattr(upstream, name).__get__(module))
            for name in dir(type(module)) if not name.startswith("_")
            and inspect.isfunction(vars(type(module)).get(name))
            and inspect.isfunction(getattr(upstream, name, None))]


FAMILY_NAMES = [*FAMILIES, "llava"]


def _build_any(name):
    return _llava() if name == "llava" else _build(name)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_patched_classes_keep_upstream_names_and_signatures(name):
    model = _build_any(name)
    before = {n: type(m) for n, m in model.named_modules()}
    vlprune.patch(model, **(dict(visual_keep=4) if name == "llava" else dict(merge_r=1)))
    patched = _patched_modules(model, before)
    assert patched and any(n == "" for n, _, _ in patched)  # the root is swapped too
    checked = 0
    for where, module, upstream in patched:
        cls = type(module)
        assert issubclass(cls, upstream) and isinstance(module, upstream)
        assert (cls.__name__, cls.__qualname__, cls.__module__) == (
            upstream.__name__, upstream.__qualname__, upstream.__module__), where
        for method, got, want in _upstream_methods(module, upstream):
            assert inspect.signature(got) == inspect.signature(want), f"{where}.{method}"
            checked += 1
    assert checked >= 2
    vlprune.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == before


@pytest.mark.parametrize("name", [*HF_FAMILIES, "llava"])
def test_transformers_sees_upstream_classes(name):
    from transformers.conversion_mapping import extract_weight_conversions_for_model

    model = _build_any(name)
    ref_custom = model.is_custom_code()
    ref_conv = repr(extract_weight_conversions_for_model(model))
    vlprune.patch(model, **(dict(visual_keep=4) if name == "llava" else PATCHES.get(name, dict(merge_r=1))))
    assert model.is_custom_code() is ref_custom is False
    assert type(model).is_custom_code() is False
    assert repr(extract_weight_conversions_for_model(model)) == ref_conv
    # the patched classes' parts (towers, layers) answer as upstream's do
    for module in model.modules():
        if hasattr(module, "is_custom_code"):
            assert module.is_custom_code() is False


def _all_missing_init(model) -> dict[str, torch.Tensor]:
    """The weights transformers gives a model none of whose weights a checkpoint holds: every
    module and weight marked uninitialised, then ``initialize_weights`` (seeded)."""
    for m in model.modules():
        m.__dict__.pop("_is_hf_initialized", None)
    for t in [*model.parameters(), *model.buffers()]:
        if hasattr(t, "_is_hf_initialized"):
            del t._is_hf_initialized
    torch.manual_seed(0)
    model.initialize_weights()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["hf_clip_model", "hf_siglip_model", "llava"])
def test_missing_weights_are_initialised_as_upstream(name):
    ref = _all_missing_init(_build_any(name))
    model = _build_any(name)
    vlprune.patch(model, **(dict(visual_keep=4) if name == "llava" else dict(merge_r=1)))
    got = _all_missing_init(model)
    assert got.keys() == ref.keys()
    assert [k for k in ref if not torch.equal(got[k], ref[k])] == []


@pytest.mark.parametrize("name", ["hf_clip_vision", "hf_clip_model", "hf_bert", "llava"])
def test_class_constructors_of_a_patched_class_build_upstream_models(name, tmp_path):
    import json

    model = _build_any(name)
    upstream = type(model)
    vlprune.patch(model, **(dict(visual_keep=4) if name == "llava" else dict(merge_r=1)))
    patched_cls = type(model)
    assert patched_cls is not upstream
    # save_pretrained of a patched model: upstream's architecture name, loadable weights
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [upstream.__name__]
    for built in (patched_cls.from_pretrained(tmp_path), patched_cls._from_config(model.config)):
        assert type(built) is upstream
        assert not vlprune.is_patched(built)
    loaded = patched_cls.from_pretrained(tmp_path)
    sd, ref_sd = loaded.state_dict(), model.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    # and patching what they built works like patching any upstream model
    vlprune.patch(loaded, **(dict(visual_keep=4) if name == "llava" else dict(merge_r=1)))
    assert type(loaded) is patched_cls
    vlprune.unpatch(loaded)
    assert type(loaded) is upstream


def test_an_unpatched_instance_of_a_patched_class_can_be_patched():
    """``type(patched)(config)`` builds an instance of the patched class without a patch; a
    patch of it works (no MRO error) and unpatching leaves the upstream class."""
    model = _build("hf_clip_vision")
    vlprune.patch(model, merge_r=1)
    stray = type(model)(model.config).eval()
    vlprune.patch(stray, merge_r=1)
    assert type(stray) is type(model)
    vlprune.unpatch(stray)
    assert type(stray) is transformers.CLIPVisionModel


# --- item 4: models a user would patch -------------------------------------------------------


def _classifier(kind):
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16)
    if kind == "clip":
        cfg = transformers.CLIPConfig(vision_config=_hf_clip_vision().config.to_dict(),
                                      text_config=text, num_labels=5)
        return transformers.CLIPForImageClassification(cfg)
    cfg = transformers.SiglipConfig(vision_config=_siglip_vision().config.to_dict(),
                                    text_config=text, num_labels=5)
    return transformers.SiglipForImageClassification(cfg)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_image_classifiers(kind):
    torch.manual_seed(0)
    model, x = _classifier(kind).eval(), _pixels()
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        ref = model(pixel_values=x, labels=labels)
        for kw in IDENTITY.values():
            vlprune.patch(model, **kw)
            out = model(pixel_values=x, labels=labels)
            assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
        # merging: fewer tokens, and the classifier's mean weighs each token by its size
        vlprune.patch(model, merge_r=3, trace_source=True)
        out = model(pixel_values=x, labels=labels)
        desc = vlprune.describe(model, x, flops=False)
        n = 1 + (IMG // 8) ** 2 if kind == "clip" else (IMG // 8) ** 2
        assert [(lr.tokens_in, lr.tokens_out) for lr in desc.layers] == [
            (n, n - 3), (n - 3, n - 6), (n - 6, n - 9)]
        model(pixel_values=x)
        source = vlprune.get_source(model)  # (B, N, N0): input tokens each output token holds
        hidden = model.vision_model(pixel_values=x).last_hidden_state
        start = 1 if kind == "clip" else 0  # CLIP's classifier leaves out the class token
        size = source.sum(-1, keepdim=True)[:, start:]
        pooled = (hidden[:, start:] * size).sum(1) / size.sum(1)
        torch.testing.assert_close(out.logits, model.classifier(pooled), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out.logits, ref.logits)
        assert torch.isfinite(out.loss)
        # positional arguments and tuples, as upstream
        assert torch.equal(model(x, labels, return_dict=False)[1], out.logits)
        # pruning
        vlprune.patch(model, prune_keep=0.5, prune_layers=(1,), prune_score="key_norm")
        desc = vlprune.describe(model, x, flops=False)
        assert desc.layers[1].tokens_out < desc.layers[1].tokens_in
        assert model(pixel_values=x).logits.shape == ref.logits.shape
        vlprune.unpatch(model)
        assert torch.equal(model(pixel_values=x, labels=labels).logits, ref.logits)
        assert type(model) in (transformers.CLIPForImageClassification,
                               transformers.SiglipForImageClassification)


LLAVA_BASE_REDUCING = {
    "visual_keep": dict(visual_keep=4),
    "tower_merge": dict(merge_r=2),
    "fastv": dict(llm_layer=1, llm_keep=4),
    "text_keep": dict(visual_keep=8, text_keep=0.5),
}


def _lm_input(model, inputs):
    """The hidden states a LLaVA's language-model head reads (its last_hidden_state)."""
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen[0]


def test_llava_base_model():
    base, x = _llava("LlavaModel"), _llava_inputs()
    full = _llava()  # the same weights with a head: its patched LM reads what the base returns
    with torch.no_grad():
        ref = base(**x).last_hidden_state
        for kw in LLAVA_IDENTITY.values():
            vlprune.patch(base, **kw)
            assert torch.equal(base(**x).last_hidden_state, ref), kw
        for name, kw in LLAVA_BASE_REDUCING.items():
            vlprune.patch(base, **kw)
            out = base(**x).last_hidden_state
            assert out.shape[1] < ref.shape[1] or name == "fastv", name
            desc = vlprune.describe(base, x, flops=False)
            assert any(lr.tokens_out < lr.tokens_in for lr in desc.layers), name
            vlprune.patch(full, **kw)
            want = _lm_input(full, x)
            assert out.shape == want.shape and torch.equal(out, want), name
        assert not hasattr(base, "generate")  # a base model has none, patched or not
        vlprune.unpatch(base)
        assert type(base) is transformers.LlavaModel
        assert torch.equal(base(**x).last_hidden_state, ref)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "llava_next_video"])
def test_llava_anyres_base_models(family):
    """A base anyres model patched alone reduces as the inner model of the full one: the
    hidden states equal what the full patched model's head reads."""
    from llava_family_models import batch, build

    full = build(family)
    base = build(family).model  # the same weights; patched as the root
    x = batch(full, [dict(seed=0, before=3, after=2, images=[(64, 32, 0)]),
                     dict(seed=1, before=5, after=1, images=[(32, 32, 1)])])
    with torch.no_grad():
        ref = base(**x).last_hidden_state
        vlprune.patch(base, visual_keep=1.0)
        assert torch.equal(base(**x).last_hidden_state, ref)
        for kw in (dict(visual_keep=0.5), dict(visual_keep=0.5, visual_score="random")):
            vlprune.patch(base, **kw)
            out = base(**x).last_hidden_state
            vlprune.patch(full, **kw)
            want = _lm_input(full, x)
            assert out.shape[1] < ref.shape[1]
            assert out.shape == want.shape and torch.equal(out, want), kw
        vlprune.unpatch(base)
        assert torch.equal(base(**x).last_hidden_state, ref)
