"""CUDA checks of every family (marker ``gpu``, skipped without CUDA; run them with
``pytest -m gpu`` or ``bash benchmarks/gpu_check.sh``):

- float16 and bfloat16: a patched tiny random model of each family (timm ViT, open_clip
  image + text, HF CLIP and SigLIP image + text, BERT, LLaVA, Qwen2.5-VL, Qwen3-VL, InternVL)
  gives the tokens per layer of the same model in float32 and outputs pointing the same way
  (low precision may flip a near-tie of a matching or a ranking, so outputs are compared by
  cosine similarity, not element by element);
- SDPA backends: the size-biased attention of merged tokens (a float mask; the ``sdpa``
  attention backend) gives the same outputs under the math and the memory-efficient kernels,
  and the efficient kernel really runs;
- ``torch.compile(mode="reduce-overhead")`` (inductor and CUDA graphs) of a patched timm ViT
  and HF CLIP image tower equals eager, also on a second input replayed through the graph;
- building ``llava:1.5-7b`` with its 32 language-model layers on CUDA in bfloat16 is quick
  and never holds float32 weights.

The CPU tests at the end check the same on-device building without a GPU (on the ``meta``
device) and that CPU builds do not depend on the dtype asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import vlprune
from vlprune.models import build_model, vlm_module

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
gpu = [pytest.mark.gpu, needs_cuda]

IMG = 96  # 6 x 6 patches of 16
CTX, VOCAB = 20, 100
LENGTHS = (5, 14, 9)  # text tokens per row, BOS and EOT included


# --- tiny random models of every family, their inputs and outputs -----------------------------


@dataclass(frozen=True)
class Case:
    """build(): a seeded float32 CPU model in eval mode. inputs(model): its input on the
    model's device, floating tensors in its dtype (same values for every dtype). outputs:
    (output, inputs) -> the tensors compared, one row per sample. run: the forward."""

    build: Callable[[], nn.Module]
    inputs: Callable[[nn.Module], Any]
    setting: dict
    outputs: Callable[[Any, Any], list[Tensor]]
    run: Callable[[nn.Module, Any], Any] = lambda m, x: m(**x) if isinstance(x, dict) else m(x)
    min_cos: float = 0.995  # the lowest cosine similarity of a low-precision output row


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _images(model: nn.Module, batch: int = 3, size: int = IMG) -> Tensor:
    device, dtype = _device_dtype(model)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    return x.to(device, dtype)


def _text_ids(lengths=LENGTHS, pad: int = 0, width: int = CTX) -> Tensor:
    """Rows of BOS (VOCAB - 2), random ids, EOT (VOCAB - 1, the highest id), then ``pad``."""
    g = torch.Generator().manual_seed(2)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = VOCAB - 2, VOCAB - 1
        ids[i, 1 : n - 1] = torch.randint(3, VOCAB - 3, (n - 2,), generator=g)
    return ids


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def seeded() -> nn.Module:
        torch.manual_seed(0)
        return build().eval()

    return seeded


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [o for o in out if isinstance(o, Tensor) and o.dim() > 0]


def _open_clip() -> nn.Module:
    vision = dict(image_size=IMG, patch_size=16, width=64, layers=3, head_width=32, mlp_ratio=2.0)
    text = dict(context_length=CTX, vocab_size=VOCAB, width=48, heads=2, layers=4)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)


def _hf_text_cfg(**kw) -> dict:
    return dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
                max_position_embeddings=CTX, vocab_size=VOCAB, bos_token_id=VOCAB - 2,
                eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1, **kw)


_HF_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=2, image_size=IMG, patch_size=16)


def _hf_clip() -> nn.Module:
    cfg = transformers.CLIPConfig(text_config=_hf_text_cfg(), vision_config=_HF_VISION,
                                  projection_dim=32)
    return transformers.CLIPModel(cfg)


def _hf_siglip() -> nn.Module:
    text = {**_hf_text_cfg(), "hidden_size": 64, "intermediate_size": 128, "projection_size": 64}
    return transformers.SiglipModel(transformers.SiglipConfig(text_config=text,
                                                              vision_config=_HF_VISION))


def _hf_clip_inputs(model: nn.Module) -> dict:
    ids = _text_ids(pad=VOCAB - 1)[:, : max(LENGTHS)]  # padded to the longest, masked
    mask = (torch.arange(ids.shape[1]) < torch.tensor(LENGTHS)[:, None]).long()
    device, _ = _device_dtype(model)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device),
                pixel_values=_images(model))


def _hf_siglip_inputs(model: nn.Module) -> dict:
    device, _ = _device_dtype(model)  # SigLIP: padded to the full length, no mask
    return dict(input_ids=_text_ids(pad=1).to(device), pixel_values=_images(model))


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=32, attn_implementation="sdpa")
    return transformers.BertModel(cfg)


def _bert_inputs(model: nn.Module) -> dict:
    ids = _text_ids()[:, : max(LENGTHS)]
    mask = (torch.arange(ids.shape[1]) < torch.tensor(LENGTHS)[:, None]).long()
    device, _ = _device_dtype(model)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device))


def _bert_outputs(out, inputs) -> list[Tensor]:
    """The size-weighted mean of the real positions (padding is zero), and the pooler."""
    mask = inputs["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    return [(out.last_hidden_state * mask).sum(1), out.pooler_output]


def _vlm(name: str) -> Callable[[], nn.Module]:
    return lambda: build_model(name, None, "cpu", torch.float32)


def _vlm_inputs(name: str, image_size: int | None = None) -> Callable[[nn.Module], dict]:
    def inputs(model: nn.Module) -> dict:
        if name.startswith("llava"):
            from vlprune.eval.vlm_bench import llava_prompts

            return llava_prompts(model, 2, text_tokens=20)
        return vlm_module(name).dummy_inputs(model, 2, 12, image_size=image_size)

    return inputs


def _logits(out, inputs) -> list[Tensor]:
    return [out.logits[:, -1]]  # the next-token logits of each prompt


CASES = {
    "timm_vit": Case(
        _seeded(lambda: timm.create_model("test_vit", img_size=IMG)), _images,
        dict(merge_r=4, prune_keep=0.6, prune_layers=(1,), prune_recycle=True),
        lambda out, x: [out],
    ),
    "open_clip": Case(  # image and text towers of one CLIP
        _seeded(_open_clip),
        lambda m: dict(image=_images(m), text=_text_ids().to(_device_dtype(m)[0])),
        dict(merge_r=2, prune_keep=0.6, prune_layers=(1,), text_merge_r=2,
             text_prune_keep=0.6, text_prune_layers=(2,)),
        lambda out, x: [o for o in _tensors(out) if o.dim() == 2],
    ),
    "hf_clip": Case(
        _seeded(_hf_clip), _hf_clip_inputs,
        dict(merge_r=3, prune_keep=0.6, prune_layers=(1,), text_merge_r=2),
        lambda out, x: [out.image_embeds, out.text_embeds],
    ),
    "hf_siglip": Case(  # no class token: attn_entropy
        _seeded(_hf_siglip), _hf_siglip_inputs,
        dict(merge_r=3, prune_keep=0.6, prune_layers=(1,), prune_score="attn_entropy",
             text_merge_r=2),
        lambda out, x: [out.image_embeds, out.text_embeds],
    ),
    "bert": Case(
        _seeded(_bert), _bert_inputs,
        dict(merge_r=2, prune_keep=0.6, prune_layers=(1,)),
        _bert_outputs,
    ),
    "llava": Case(  # 576 visual tokens -> 128, then FastV to 64
        _seeded(_vlm("llava:tiny")), _vlm_inputs("llava:tiny"),
        dict(visual_keep=128, visual_score="cls_attn", llm_layer=1, llm_keep=64), _logits,
    ),
    "qwen2.5_vl": Case(  # 64 visual tokens per image -> 16
        _seeded(_vlm("qwen2.5-vl:tiny")), _vlm_inputs("qwen2.5-vl:tiny", 64),
        dict(visual_keep=0.25, visual_score="attn"), _logits,
    ),
    "qwen3_vl": Case(
        _seeded(_vlm("qwen3-vl:tiny")), _vlm_inputs("qwen3-vl:tiny", 64),
        dict(visual_keep=0.25, visual_score="attn"), _logits,
    ),
    "internvl": Case(  # 4 tiles + thumbnail of 16 tokens -> half
        _seeded(_vlm("internvl:tiny")), _vlm_inputs("internvl:tiny", 112),
        dict(visual_keep=0.5, visual_score="cls_attn"), _logits,
    ),
}


# --- helpers ----------------------------------------------------------------------------------


def patched(case: Case, device: str | torch.device, dtype: torch.dtype, **extra) -> nn.Module:
    model = case.build().to(device=device, dtype=dtype)
    return vlprune.patch(model, **case.setting, **extra)


def sdpa_only() -> dict:
    """The setting that keeps a patched block on ``scaled_dot_product_attention`` with a float
    mask (where the library also has a FlexAttention path, which its default picks on CUDA)."""
    from vlprune.config import ReductionConfig

    return {"attn_backend": "sdpa"} if "attn_backend" in ReductionConfig.field_names() else {}


def tokens_per_layer(model: nn.Module, inputs: Any) -> list[tuple]:
    d = vlprune.describe(model, inputs, flops=False)
    return [(lr.tower, lr.index, lr.tokens_in, lr.tokens_out) for lr in d.layers]


def outputs(case: Case, model: nn.Module, inputs: Any) -> list[Tensor]:
    with torch.no_grad():
        return [o.float() for o in case.outputs(case.run(model, inputs), inputs)]


def row_cosines(got: list[Tensor], want: list[Tensor]) -> list[float]:
    """The lowest cosine similarity over rows, per output."""
    assert [g.shape for g in got] == [w.shape for w in want]
    return [nn.functional.cosine_similarity(g.flatten(1), w.flatten(1), dim=1).min().item()
            for g, w in zip(got, want)]


def compare_low_precision(case: Case, dtype: torch.dtype, device: str = "cuda") -> list[float]:
    """The patched model in ``dtype`` against the same patched model in float32, both on
    ``device``: equal tokens per layer, finite outputs; returns each output's lowest row
    cosine similarity."""
    ref, low = patched(case, device, torch.float32), patched(case, device, dtype)
    x_ref, x_low = case.inputs(ref), case.inputs(low)
    layers = tokens_per_layer(ref, x_ref)
    assert layers, "the setting reduced nothing"
    assert tokens_per_layer(low, x_low) == layers
    want, got = outputs(case, ref, x_ref), outputs(case, low, x_low)
    assert all(torch.isfinite(g).all() for g in got)
    return row_cosines(got, want)


# --- float16 / bfloat16 -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.gpu
@needs_cuda
def test_low_precision_tracks_float32(name, dtype):
    case = CASES[name]
    cos = compare_low_precision(case, dtype)
    assert min(cos) > case.min_cos, f"{name} {dtype}: lowest row cosine per output {cos}"


# --- SDPA backends with the size bias ---------------------------------------------------------

SIZE_BIASED = ("timm_vit", "open_clip", "hf_clip", "hf_siglip", "bert")  # merging: size bias


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops a block of code dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def backends_agree(case: Case, device: str, dtype: torch.dtype, backend, kernel: str,
                   tol: float) -> None:
    """The patched model's outputs under the math backend and under ``backend`` agree within
    ``tol``, and ``backend`` runs its aten op ``kernel``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = patched(case, device, dtype, **sdpa_only())
    x = case.inputs(model)
    with sdpa_kernel(SDPBackend.MATH):
        expected = outputs(case, model, x)
    ops = _Ops()
    with sdpa_kernel(backend):
        got = outputs(case, model, x)
        with ops, torch.no_grad():
            case.run(model, x)
    assert kernel in ops.names, f"{kernel} did not run; ran {sorted(ops.names)}"
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("name", SIZE_BIASED)
@pytest.mark.gpu
@needs_cuda
def test_sdpa_math_and_efficient_backends_agree(name, dtype):
    from torch.nn.attention import SDPBackend

    backends_agree(CASES[name], "cuda", dtype, SDPBackend.EFFICIENT_ATTENTION,
                   "_scaled_dot_product_efficient_attention",
                   tol=2e-2 if dtype == torch.float16 else 1e-4)


# --- torch.compile(mode="reduce-overhead") ----------------------------------------------------

COMPILED = {
    "timm_vit": CASES["timm_vit"],
    "hf_clip_image": Case(
        _seeded(lambda: transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(**_HF_VISION, attn_implementation="sdpa"))),
        _images, dict(merge_r=4, prune_keep=0.6, prune_layers=(1,)),
        lambda out, x: [out.pooler_output],
    ),
}


def compiled_matches_eager(case: Case, device: str, mode: str, atol: float = 1e-3) -> None:
    """``torch.compile(model, mode=mode)`` of the patched model (float32) equals eager on two
    inputs of one shape, three times each (warm-up, CUDA-graph recording, replays), and
    compiles without skipping CUDA graphs."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    try:
        model = patched(case, device, torch.float32)
        compiled = torch.compile(model, mode=mode)
        x1 = case.inputs(model)
        x2 = x1.flip(0) + 0.5  # new values, same shape: a replay of the recorded graph
        with torch.no_grad():
            eager = [outputs(case, model, x) for x in (x1, x2)]
            for _ in range(3):
                for x, want in zip((x1, x2), eager):
                    torch.compiler.cudagraph_mark_step_begin()
                    got = [o.float().clone() for o in case.outputs(compiled(x), x)]
                    for g, w in zip(got, want):
                        torch.testing.assert_close(g, w, atol=atol, rtol=atol)
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    finally:
        dynamo.reset()


@pytest.mark.parametrize("name", list(COMPILED))
@pytest.mark.gpu
@needs_cuda
def test_compile_reduce_overhead_matches_eager(name):
    compiled_matches_eager(COMPILED[name], "cuda", "reduce-overhead")


# --- a 7B LLaVA built on the GPU --------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_llava_7b_builds_on_cuda_in_bfloat16_quickly():
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_model("llava:1.5-7b", None, "cuda", torch.bfloat16, llm_layers=32)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    params: list = []
    try:
        params = list(model.parameters())
        assert {p.device.type for p in params} == {"cuda"}
        assert {p.dtype for p in params} == {torch.bfloat16}
        n = sum(p.numel() for p in params)
        assert 7.0e9 < n < 7.1e9
        # bfloat16 all along: the peak is the weights (2 bytes each), never float32's 4
        peak = torch.cuda.max_memory_allocated() - before
        assert peak < 2.5 * n, f"peak {peak / 2**30:.1f} GiB for {n / 1e9:.2f}B parameters"
        assert seconds < 60, f"building took {seconds:.0f} s"
    finally:
        del model, params
        torch.cuda.empty_cache()


# --- without a GPU: where and in which dtype models are created -------------------------------


def test_vlm_created_on_the_target_device_and_dtype():
    """On a device other than the CPU, a VLM's weights are created there in the dtype asked
    for (``meta`` here: no memory, as ``cuda`` would be); the default dtype is restored."""
    model = build_model("llava:1.5-7b", None, "meta", torch.bfloat16, llm_layers=32)
    tensors = list(model.parameters()) + list(model.buffers())
    assert {t.device.type for t in tensors} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert 7.0e9 < sum(p.numel() for p in model.parameters()) < 7.1e9
    assert len(model.model.language_model.layers) == 32
    assert torch.get_default_dtype() == torch.float32


def test_cpu_builds_do_not_depend_on_the_dtype():
    """On the CPU a model is built in float32 and cast: the same seed gives the same weights
    in every dtype."""
    for name in ("llava:tiny", "qwen2.5-vl:tiny"):
        torch.manual_seed(0)
        ref = build_model(name, None, "cpu", torch.float32).to(torch.bfloat16)
        torch.manual_seed(0)
        low = build_model(name, None, "cpu", torch.bfloat16)
        want = ref.state_dict()
        for k, v in low.state_dict().items():
            assert v.dtype == want[k].dtype and torch.equal(v, want[k]), k
