"""Prefill and decode benchmark of visual-token budgets on a LLaVA-style model.

Every setting (the unpatched model first, then e.g. ``visual_keep=64 visual_score=cls_attn``)
runs on the same model instance, interleaved round by round as in :func:`run_bench`. Per
setting and batch this measures:

* **prefill**: one forward over the whole prompt with its images (vision tower, projector,
  language model; ``logits_to_keep=1``, as ``generate`` does at prefill), median ms;
* **decode**: ``generate(max_new_tokens=N)`` (greedy, KV cache, exactly N tokens) minus the
  prefill median; the first new token comes from the prefill, so this covers ``N - 1`` cached
  steps, reported as generated tokens per second over the batch;
* the **visual tokens reaching the language model** per image (read from the language
  model's input length, not from the config);
* **prefill FLOPs** at batch 1 and the efficiency ``prefill speedup / prefill FLOPs ratio``.

Prompts: each row holds ``text_tokens`` random text tokens around one image placeholder span
(the full span, as the processor expands it); rows of a batch have different text lengths
(``text_tokens``, ``text_tokens - 3``, ...) and are left padded, as for generation.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .bench import (
    BASELINE,
    BenchResult,
    Setting,
    _apply,
    _progress,
    _sync,
    load_warning,
    run_fields,
)
from .flops import count_flops
from .memory import peak_memory

__all__ = ["VlmBenchResult", "VlmBenchRow", "llava_prompts", "run_vlm_bench"]

TEXT_BEFORE_IMAGE = 5  # text tokens before the image span ("USER: " and a system prefix)


def _image_tokens(model: nn.Module) -> int:
    from ..adapters.llava import _vision_tokens

    return _vision_tokens(model)


def llava_prompts(model: nn.Module, batch_size: int, text_tokens: int = 40,
                  seed: int = 0) -> dict[str, Tensor]:
    """Left-padded prompts with one image each: ``input_ids``, ``attention_mask``,
    ``pixel_values``. Row ``b`` has ``max(TEXT_BEFORE_IMAGE + 1, text_tokens - 3 * b)`` text
    tokens, ``TEXT_BEFORE_IMAGE`` of them before the image span; row 0 is the longest (no
    padding), so ``{k: v[:1]}`` is a batch-1 prompt."""
    from ..adapters.base import device_dtype

    if text_tokens <= TEXT_BEFORE_IMAGE:
        raise ValueError(f"text_tokens must be > {TEXT_BEFORE_IMAGE}, got {text_tokens}")
    device, dtype = device_dtype(model)
    cfg = model.config
    image_id, vocab = cfg.image_token_id, cfg.text_config.vocab_size
    pad = cfg.text_config.pad_token_id
    pad = 0 if pad is None else pad
    n_img = _image_tokens(model)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch_size):
        n_text = max(TEXT_BEFORE_IMAGE + 1, text_tokens - 3 * b)
        text = torch.randint(1, vocab, (n_text,), generator=gen)
        text = torch.where((text == image_id) | (text == pad), (text + 2) % vocab, text)
        rows.append(torch.cat([
            text[:TEXT_BEFORE_IMAGE], torch.full((n_img,), image_id), text[TEXT_BEFORE_IMAGE:],
        ]))
    L = max(len(r) for r in rows)
    ids = torch.full((batch_size, L), pad, dtype=torch.long)
    mask = torch.zeros(batch_size, L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = r
        mask[b, L - len(r):] = 1
    vcfg = cfg.vision_config
    size = vcfg.image_size if isinstance(vcfg.image_size, (tuple, list)) else (vcfg.image_size,) * 2
    pixels = torch.randn(batch_size, vcfg.num_channels, *size, generator=gen)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
    }


def _llm_input_length(model: nn.Module, run) -> tuple[int, object]:
    """The sequence length the language model receives while ``run()`` runs one prefill, and
    what ``run()`` returned."""
    lm = model.model.language_model
    seen: list[int] = []

    def hook(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        seen.append(int(x.shape[1]))

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("the language model was not called during the prefill")
    return seen[0], out


@dataclass
class VlmBenchRow:
    setting: str
    config: dict | None
    visual_tokens: int
    llm_tokens: int
    gflops_prefill: float
    flops_ratio: float
    prefill_ms: float
    speedup: float
    efficiency: float
    decode_ms: float | None
    decode_tok_s: float | None
    decode_speedup: float | None
    peak_mem_mb: float | None
    times_prefill_ms: list[float] = field(default_factory=list)
    times_generate_ms: list[float] = field(default_factory=list)


@dataclass
class VlmBenchResult(BenchResult):
    """A :class:`BenchResult` whose rows are :class:`VlmBenchRow` (speedup: prefill)."""

    text_tokens: int = 0
    image_tokens: int = 0
    new_tokens: int = 0

    speedup_axis = "prefill speedup"

    def table(self) -> str:
        w = max([14] + [len(r.setting) for r in self.rows])
        head = (
            f"{'setting':<{w}} {'visual':>6} {'LLM len':>7} {'GFLOPs':>8} {'FLOPs x':>7} "
            f"{'prefill ms':>10} {'speedup':>7} {'effic.':>6} {'decode tok/s':>12} "
            f"{'dec. x':>6} {'peak MB':>8}"
        )
        lines = [
            f"{self.model}  batch {self.batch_size}  image {self.input_size}  "
            f"{self.image_tokens} image tokens + {self.text_tokens} text tokens (row 0)  "
            f"{self.new_tokens} new tokens  {self.device} {self.dtype}  threads {self.threads}",
            "GFLOPs: prefill at batch 1; speedup, effic. (speedup / FLOPs x): prefill at the batch",
            head,
            "-" * len(head),
        ]
        for r in self.rows:
            mem = f"{r.peak_mem_mb:8.1f}" if r.peak_mem_mb is not None else f"{'-':>8}"
            dec = f"{r.decode_tok_s:12.2f}" if r.decode_tok_s is not None else f"{'-':>12}"
            dsp = f"{r.decode_speedup:6.2f}" if r.decode_speedup is not None else f"{'-':>6}"
            lines.append(
                f"{r.setting:<{w}} {r.visual_tokens:>6} {r.llm_tokens:>7} "
                f"{r.gflops_prefill:8.1f} {r.flops_ratio:7.2f} {r.prefill_ms:10.1f} "
                f"{r.speedup:7.2f} {r.efficiency:6.2f} {dec} {dsp} {mem}"
            )
        return "\n".join(lines)


def run_vlm_bench(
    model: nn.Module,
    settings: Sequence[Setting],
    *,
    model_name: str = "",
    batch_size: int = 1,
    text_tokens: int = 40,
    new_tokens: int = 8,
    rounds: int = 3,
    iters: int = 1,
    warmup: int = 1,
    measure_memory: bool = True,
    progress: bool = True,
) -> VlmBenchResult:
    """Benchmark visual-token ``settings`` on a LLaVA ``model`` (on its device and dtype,
    unpatched). An unpatched row comes first. Each of ``warmup + rounds`` rounds runs every
    setting in turn: ``iters`` timed prefills, then (when ``new_tokens > 1``) ``iters`` timed
    ``generate`` calls; warmup rounds are not timed. ``new_tokens <= 1`` skips decoding.
    """
    if batch_size < 1 or rounds < 1 or iters < 1 or warmup < 0 or new_tokens < 0:
        raise ValueError("batch_size, rounds and iters must be >= 1; warmup, new_tokens >= 0")
    settings = [Setting(BASELINE, None)] + [s for s in settings if s.config is not None]
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate settings: {labels}")
    if getattr(model, "_vlprune", None) is not None:
        raise ValueError("run_vlm_bench needs an unpatched model")
    from ..adapters.base import device_dtype

    model.eval()
    device, dtype = device_dtype(model)
    warning = load_warning()
    if warning:
        warnings.warn(warning, stacklevel=2)

    x = llava_prompts(model, batch_size, text_tokens)
    x1 = {k: v[:1] for k, v in x.items()}
    image_id = model.config.image_token_id
    n_text = int((x1["input_ids"] != image_id).sum())
    pad = model.config.text_config.pad_token_id
    gen_kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0 if pad is None else pad)
    decode = new_tokens > 1

    def prefill(inputs: dict) -> None:
        model(**inputs, logits_to_keep=1)

    flops, llm_len, mem = {}, {}, {}
    with torch.inference_mode():
        for s in settings:
            _apply(model, s)
            llm_len[s.label], flops[s.label] = _llm_input_length(
                model, lambda: count_flops(lambda: prefill(x1))
            )
            if measure_memory:
                mem[s.label] = peak_memory(lambda: prefill(x), device=device) / 2**20

    t_pre: dict[str, list[float]] = {s.label: [] for s in settings}
    t_gen: dict[str, list[float]] = {s.label: [] for s in settings}

    def timed(fn) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return (time.perf_counter() - t0) * 1e3

    bar = _progress((warmup + rounds) * len(settings), progress,
                    f"bench {model_name or type(model).__name__}")
    try:
        with torch.inference_mode():
            for rnd in range(warmup + rounds):
                for s in settings:
                    _apply(model, s)
                    for _ in range(iters):
                        ms = timed(lambda: prefill(x))
                        if rnd >= warmup:
                            t_pre[s.label].append(ms)
                    if decode:
                        for _ in range(iters):
                            ms = timed(lambda: model.generate(**x, **gen_kw))
                            if rnd >= warmup:
                                t_gen[s.label].append(ms)
                    bar.update(1)
    finally:
        bar.close()
        _apply(model, Setting(BASELINE, None))

    def decode_ms(label: str) -> float | None:
        if not decode:
            return None
        return statistics.median(t_gen[label]) - statistics.median(t_pre[label])

    base_pre = statistics.median(t_pre[BASELINE])
    base_dec = decode_ms(BASELINE)
    rows = []
    for s in settings:
        pre = statistics.median(t_pre[s.label])
        ratio = flops[BASELINE] / flops[s.label]
        speedup = base_pre / pre
        dec = decode_ms(s.label)
        ok = dec is not None and dec > 0 and base_dec is not None and base_dec > 0
        rows.append(VlmBenchRow(
            setting=s.label,
            config=None if s.config is None else {
                k: v for k, v in dataclasses.asdict(s.config).items() if k != "version"
            },
            visual_tokens=llm_len[s.label] - n_text,
            llm_tokens=llm_len[s.label],
            gflops_prefill=flops[s.label] / 1e9,
            flops_ratio=ratio,
            prefill_ms=pre,
            speedup=speedup,
            efficiency=speedup / ratio,
            decode_ms=dec,
            decode_tok_s=batch_size * (new_tokens - 1) / dec * 1e3 if ok else None,
            decode_speedup=base_dec / dec if ok else None,
            peak_mem_mb=mem.get(s.label),
            times_prefill_ms=t_pre[s.label],
            times_generate_ms=t_gen[s.label],
        ))
    return VlmBenchResult(
        **run_fields(model, model_name, batch_size, tuple(x["pixel_values"].shape[1:]), device,
                     dtype, warning),
        rows=rows,
        text_tokens=n_text,
        image_tokens=_image_tokens(model),
        new_tokens=new_tokens if decode else 0,
    )
