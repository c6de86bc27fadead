"""Prefill and decode benchmark of visual-token budgets on a LLaVA-style model.

Every setting (the unpatched model first, then e.g. ``visual_keep=64 visual_score=cls_attn``
or FastV's ``llm_layer=2 llm_keep=64``) runs on the same model instance, interleaved round by
round as in :func:`run_bench`, at one or several batch sizes. Each timed call is one greedy
``generate(max_new_tokens=N)`` (KV cache, exactly N tokens), split by a hook at the end of
its first forward:

* **prefill**: from the ``generate`` call to the end of its first forward (what a patched
  ``generate`` does before: the vision tower and the visual-token selection; then the
  forward over the whole prompt: projector, language model with ``logits_to_keep=1``), i.e.
  the time to the first token; median ms;
* **decode**: the rest of the call, the ``N - 1`` cached steps after the prefill, reported as
  generated tokens per second over the batch (``N <= 1``: prefill only, no decode timing);
* the **visual tokens reaching the language model** (the image placeholders of row 0 of the
  prompt the model core receives, after any rewrite; not from the config), the language
  model's input length (fewer text tokens too with ``text_keep``) and the visual tokens at
  its **last layer** (from its output length: fewer than reaching it with ``llm_keep``);
* **prefill FLOPs** at batch 1 and the efficiency ``prefill speedup / prefill FLOPs ratio``,
  speedups against the unpatched row of the same batch size.

Also owns the two probes :mod:`vlprune.eval.generation` reuses for its cost columns:
:func:`llm_lengths` (visual tokens and language-model lengths of one prefill) and
:class:`GenerateClock` (a ``generate`` call split into prefill and decode time).

Prompts: each row holds ``text_tokens`` random text tokens around one image placeholder span
(the full span, as the processor expands it); rows of a batch have different text lengths
(``text_tokens``, ``text_tokens - 3``, ...) and are left padded, as for generation.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .bench import BenchResult, plot_speedup, run_fields
from .flops import count_flops
from .machine import load_warning, sync
from .memory import peak_memory
from .sweep import BASELINE, Setting, apply_setting, config_dict, progress_bar, with_baseline

__all__ = ["GenerateClock", "VlmBenchResult", "VlmBenchRow", "llava_prompts", "llm_lengths",
           "run_vlm_bench"]

TEXT_BEFORE_IMAGE = 5  # text tokens before the image span ("USER: " and a system prefix)


def _image_tokens(model: nn.Module) -> int:
    from ..adapters.llava import vision_tokens

    return vision_tokens(model)


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


def _input_size(model: nn.Module, x: dict[str, Tensor]) -> tuple[int, ...]:
    """The image input of one row: ``(C, H, W)`` of LLaVA's pixels, or ``(C, H, W)`` from the
    grid ``(t, h, w)`` of a dynamic-resolution model (``image_grid_thw`` times the patch)."""
    grid = x.get("image_grid_thw")
    if grid is not None:
        patch = getattr(model.config.vision_config, "patch_size", 1)
        chans = getattr(model.config.vision_config, "in_channels", 3)
        return (chans, int(grid[0, 1]) * patch, int(grid[0, 2]) * patch)
    return tuple(x["pixel_values"].shape[1:])


def llm_lengths(model: nn.Module, run) -> tuple[int, int, int, object]:
    """While ``run()`` runs one batch-1 prefill: the image placeholders of the prompt the model
    core receives (after any ``visual_keep`` / ``text_keep`` rewrite), the sequence length the
    language model receives, the one its last layer puts out (shorter with ``llm_keep``), and
    what ``run()`` returned."""
    core, lm = model.model, model.model.language_model
    image_id = model.config.image_token_id
    seen_img: list[int] = []
    seen_in: list[int] = []
    seen_out: list[int] = []

    def core_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, Tensor):
            seen_img.append(int((ids[0] == image_id).sum()))

    def pre_hook(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        seen_in.append(int(x.shape[1]))

    def hook(module, args, kwargs, output):
        h = getattr(output, "last_hidden_state", None)
        if h is None and isinstance(output, (tuple, list)):
            h = output[0]
        if isinstance(h, Tensor):
            seen_out.append(int(h.shape[1]))

    handles = [core.register_forward_pre_hook(core_hook, with_kwargs=True),
               lm.register_forward_pre_hook(pre_hook, with_kwargs=True),
               lm.register_forward_hook(hook, with_kwargs=True)]
    try:
        out = run()
    finally:
        for handle in handles:
            handle.remove()
    if not seen_in or not seen_img:
        raise RuntimeError("the model core and its language model were not called during the prefill")
    return seen_img[0], seen_in[0], (seen_out[0] if seen_out else seen_in[0]), out


class GenerateClock:
    """Splits a ``generate`` call at the end of its first forward (the prefill)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.handle = None
        self.calls = 0
        self.t_prefill = 0.0

    def _hook(self, module, args, output) -> None:
        self.calls += 1
        if self.calls == 1:
            sync(self.device)
            self.t_prefill = time.perf_counter()

    def __enter__(self) -> GenerateClock:
        self.handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def time(self, fn) -> tuple[float, float, int]:
        """(prefill ms, rest ms, forward calls) of one ``fn()`` (a ``generate`` call)."""
        self.calls = 0
        sync(self.device)
        t0 = time.perf_counter()
        fn()
        sync(self.device)
        t1 = time.perf_counter()
        if self.calls == 0:
            raise RuntimeError("generate did not call the model's forward")
        return (self.t_prefill - t0) * 1e3, (t1 - self.t_prefill) * 1e3, self.calls


@dataclass
class VlmBenchRow:
    setting: str
    batch_size: int
    config: dict | None
    visual_tokens: int
    visual_tokens_last: int
    llm_tokens: int
    llm_tokens_last: int
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
    times_decode_ms: list[float] = field(default_factory=list)


@dataclass
class VlmBenchResult(BenchResult):
    """A :class:`BenchResult` whose rows are :class:`VlmBenchRow` (speedup: prefill), one row
    per setting and batch size. ``batch_size`` is the first of ``batch_sizes``; each row
    carries its own."""

    batch_sizes: list[int] = field(default_factory=list)
    text_tokens: int = 0
    image_tokens: int = 0
    new_tokens: int = 0

    speedup_axis = "prefill speedup"

    def row(self, label: str, batch_size: int | None = None) -> VlmBenchRow:
        """The row of setting ``label`` at ``batch_size`` (needed when several were run)."""
        sizes = self.batch_sizes or [self.batch_size]
        if batch_size is None:
            if len(sizes) > 1:
                raise KeyError(f"several batch sizes {sizes}: give batch_size")
            batch_size = sizes[0]
        for r in self.rows:
            if r.setting == label and r.batch_size == batch_size:
                return r
        raise KeyError(f"no setting {label!r} at batch {batch_size}; have "
                       f"{sorted({r.setting for r in self.rows})} at batch {sizes}")

    def table(self) -> str:
        w = max([14] + [len(r.setting) for r in self.rows])
        head = (
            f"{'batch':>5} {'setting':<{w}} {'visual':>6} {'last':>5} {'LLM len':>7} "
            f"{'GFLOPs':>8} {'FLOPs x':>7} {'prefill ms':>10} {'speedup':>7} {'effic.':>6} "
            f"{'decode tok/s':>12} {'dec. x':>6} {'peak MB':>8}"
        )
        sizes = ",".join(map(str, self.batch_sizes or [self.batch_size]))
        lines = [
            f"{self.model}  batch {sizes}  image {self.input_size}  "
            f"{self.image_tokens} image tokens + {self.text_tokens} text tokens (row 0)  "
            f"{self.new_tokens} new tokens  {self.device} {self.dtype}  threads {self.threads}",
            "visual: visual tokens per image reaching the LLM; last: at its last layer (fewer "
            "with llm_keep); LLM len: prompt length the LLM receives (row 0)",
            "GFLOPs: prefill at batch 1; speedup, effic. (speedup / FLOPs x): prefill, against "
            "unpatched at the same batch; decode tok/s: over the batch",
            head,
            "-" * len(head),
        ]
        for r in self.rows:
            mem = f"{r.peak_mem_mb:8.1f}" if r.peak_mem_mb is not None else f"{'-':>8}"
            dec = f"{r.decode_tok_s:12.2f}" if r.decode_tok_s is not None else f"{'-':>12}"
            dsp = f"{r.decode_speedup:6.2f}" if r.decode_speedup is not None else f"{'-':>6}"
            lines.append(
                f"{r.batch_size:>5} {r.setting:<{w}} {r.visual_tokens:>6} "
                f"{r.visual_tokens_last:>5} {r.llm_tokens:>7} "
                f"{r.gflops_prefill:8.1f} {r.flops_ratio:7.2f} {r.prefill_ms:10.1f} "
                f"{r.speedup:7.2f} {r.efficiency:6.2f} {dec} {dsp} {mem}"
            )
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> None:
        """Prefill speedup against prefill FLOPs ratio, one series per batch size, with the
        ideal line (efficiency 1)."""
        sizes = self.batch_sizes or [self.batch_size]
        series = {
            (f"batch {b}" if len(sizes) > 1 else ""): [
                (r.setting, r.flops_ratio, r.speedup, r.efficiency)
                for r in self.rows if r.batch_size == b
            ]
            for b in sizes
        }
        ylabel = "prefill speedup (x)" + ("" if len(sizes) > 1 else f", batch {sizes[0]}")
        plot_speedup(
            path, series, xlabel="prefill FLOPs reduction (x)", ylabel=ylabel,
            title=f"{self.model}: {self.image_tokens} image tokens + {self.text_tokens} text "
            f"tokens, on {self.device} {self.dtype}, {self.threads} threads",
        )

    def write_csv(self, path: str | os.PathLike) -> None:
        names = [
            f.name for f in dataclasses.fields(VlmBenchRow)
            if f.name != "config" and not f.name.startswith("times_")
        ]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "device", "dtype", "threads", *names])
            for r in self.rows:
                w.writerow([self.model, self.device, self.dtype, self.threads]
                           + [getattr(r, n) for n in names])


def _batch_sizes(batch_size: int | Sequence[int]) -> list[int]:
    sizes = [batch_size] if isinstance(batch_size, int) else list(batch_size)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f"batch sizes must be ints >= 1, got {batch_size!r}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"duplicate batch sizes: {sizes}")
    return sizes


def _check_settings(model: nn.Module, settings: Sequence[Setting]) -> None:
    """Patch with every setting once (no forward): a bad one fails before anything runs."""
    try:
        for s in settings:
            try:
                apply_setting(model, s)
            except (ValueError, TypeError) as e:
                raise type(e)(f"setting {s.label!r}: {e}") from e
    finally:
        apply_setting(model, Setting(BASELINE, None))


def run_vlm_bench(
    model: nn.Module,
    settings: Sequence[Setting],
    *,
    model_name: str = "",
    batch_size: int | Sequence[int] = 1,
    text_tokens: int = 40,
    new_tokens: int = 8,
    rounds: int = 3,
    iters: int = 1,
    warmup: int = 1,
    measure_memory: bool = True,
    progress: bool = True,
    inputs: Callable[[int], dict[str, Tensor]] | None = None,
) -> VlmBenchResult:
    """Benchmark visual-token ``settings`` on a LLaVA ``model`` (on its device and dtype,
    unpatched) at one batch size or several (``batch_size=[1, 8]``: one row per setting and
    batch size; the prompts of a smaller batch are the first rows of the largest one). An
    unpatched row comes first at every batch size. Each of ``warmup + rounds`` rounds runs,
    per batch size, every setting in turn: ``iters`` timed ``generate`` calls of
    ``max(new_tokens, 1)`` tokens, each giving one prefill and (``new_tokens > 1``) one decode
    time; warmup rounds are not timed. Every setting is patched once before anything runs, so
    a bad one fails at once.

    ``inputs(b)`` builds the prompts of batch size ``b`` (row 0 the longest, no padding); the
    default is :func:`llava_prompts` (LLaVA models). Other families pass their own builder
    (e.g. ``vlprune.models_qwen.dummy_inputs``), whose batches need not slice by rows (Qwen's
    flattened patches).
    """
    sizes = _batch_sizes(batch_size)
    if rounds < 1 or iters < 1 or warmup < 0 or new_tokens < 0:
        raise ValueError("rounds and iters must be >= 1; warmup, new_tokens >= 0")
    settings = with_baseline(settings)
    if getattr(model, "_vlprune", None) is not None:
        raise ValueError("run_vlm_bench needs an unpatched model")
    from ..adapters.base import device_dtype

    model.eval()
    device, dtype = device_dtype(model)
    _check_settings(model, settings)
    warning = load_warning()
    if warning:
        warnings.warn(warning, stacklevel=2)

    if inputs is None:
        x_all = llava_prompts(model, max(sizes), text_tokens)
        xs = {b: {k: v[:b] for k, v in x_all.items()} for b in sizes}
        x1 = {k: v[:1] for k, v in x_all.items()}
    else:
        xs = {b: inputs(b) for b in sizes}
        x1 = xs[1] if 1 in xs else inputs(1)
    image_id = model.config.image_token_id
    n_image = int((x1["input_ids"][0] == image_id).sum())
    n_text = int(x1["attention_mask"][0].sum()) - n_image
    pad = model.config.text_config.pad_token_id
    decode = new_tokens > 1
    n_gen = max(new_tokens, 1)
    gen_kw = dict(max_new_tokens=n_gen, min_new_tokens=n_gen, do_sample=False,
                  pad_token_id=0 if pad is None else pad)
    prefill_kw = dict(gen_kw, max_new_tokens=1, min_new_tokens=1)

    def prefill(inputs: dict) -> None:
        model(**inputs, logits_to_keep=1)

    flops, visual, llm_in, llm_out, mem = {}, {}, {}, {}, {}
    with torch.inference_mode():
        for s in settings:
            apply_setting(model, s)
            # what a timed prefill runs (and a first, untimed generate call)
            visual[s.label], llm_in[s.label], llm_out[s.label], flops[s.label] = llm_lengths(
                model, lambda: count_flops(lambda: model.generate(**x1, **prefill_kw))
            )
            if measure_memory:
                for b in sizes:
                    mem[b, s.label] = peak_memory(lambda x=xs[b]: prefill(x), device=device) / 2**20

    t_pre = {(b, s.label): [] for b in sizes for s in settings}
    t_dec = {(b, s.label): [] for b in sizes for s in settings}

    bar = progress_bar((warmup + rounds) * len(settings) * len(sizes), progress,
                       f"bench {model_name or type(model).__name__}", "run")
    try:
        with torch.inference_mode(), GenerateClock(model, device) as clock:
            for rnd in range(warmup + rounds):
                for b in sizes:
                    for s in settings:
                        apply_setting(model, s)
                        for _ in range(iters):
                            try:
                                pre, dec, calls = clock.time(lambda x=xs[b]: model.generate(**x, **gen_kw))
                            except RuntimeError as e:
                                raise RuntimeError(
                                    f"generate failed for setting {s.label!r} at batch {b}: {e}"
                                ) from e
                            if calls != n_gen:
                                raise RuntimeError(
                                    f"generate ran {calls} forwards for {n_gen} new tokens "
                                    f"(setting {s.label!r}, batch {b})"
                                )
                            if rnd >= warmup:
                                t_pre[b, s.label].append(pre)
                                t_dec[b, s.label].append(dec)
                        bar.update(1)
    finally:
        bar.close()
        apply_setting(model, Setting(BASELINE, None))

    rows = []
    for b in sizes:
        base_pre = statistics.median(t_pre[b, BASELINE])
        base_dec = statistics.median(t_dec[b, BASELINE]) if decode else None
        for s in settings:
            pre = statistics.median(t_pre[b, s.label])
            ratio = flops[BASELINE] / flops[s.label]
            speedup = base_pre / pre
            dec = statistics.median(t_dec[b, s.label]) if decode else None
            ok = dec is not None and dec > 0 and base_dec is not None and base_dec > 0
            rows.append(VlmBenchRow(
                setting=s.label,
                batch_size=b,
                config=config_dict(s),
                visual_tokens=visual[s.label],
                # llm_keep drops visual tokens only
                visual_tokens_last=visual[s.label] - (llm_in[s.label] - llm_out[s.label]),
                llm_tokens=llm_in[s.label],
                llm_tokens_last=llm_out[s.label],
                gflops_prefill=flops[s.label] / 1e9,
                flops_ratio=ratio,
                prefill_ms=pre,
                speedup=speedup,
                efficiency=speedup / ratio,
                decode_ms=dec,
                decode_tok_s=b * (new_tokens - 1) / dec * 1e3 if ok else None,
                decode_speedup=base_dec / dec if ok else None,
                peak_mem_mb=mem.get((b, s.label)),
                times_prefill_ms=t_pre[b, s.label],
                times_decode_ms=t_dec[b, s.label] if decode else [],
            ))
    return VlmBenchResult(
        **run_fields(model, model_name, sizes[0], _input_size(model, x1), device, dtype, warning),
        rows=rows,
        batch_sizes=sizes,
        text_tokens=n_text,
        image_tokens=n_image,
        new_tokens=new_tokens if decode else 0,
    )
