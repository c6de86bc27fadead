"""The lmms-eval model ``vlprune``: a LLaVA-family model patched by :func:`vlprune.patch`.

``lmms-eval --model vlprune --model_args pretrained=<hub name or local folder>,visual_keep=64,
visual_score=cls_attn`` loads the model and its processor (:func:`vlprune.eval.vlm.load_vlm`),
patches it with the :class:`~vlprune.config.ReductionConfig` fields given in ``model_args``
(none: the unpatched model) and answers ``generate_until`` requests by greedy ``generate`` in
left-padded batches of ``--batch_size``. Each request must carry exactly one image; the
prompt is the task's text (image placeholders in it removed) in the family's template (:class:`vlprune.eval.vlm.Prompter`, no
answer suffix added: the task's prompt holds it).

What a run measures goes to the ``throughput`` section of lmms-eval's results JSON
(averaged over batches by lmms-eval): ``avg_visual_tokens`` (the image placeholders of the
prompt the model core receives, after any reduction: measured, not read from the settings),
``avg_gflops_prefill`` (FLOPs of a batch-1 prefill of the first request, per sample),
``avg_prefill_ms`` / ``avg_decode_ms`` (per batch: the ``generate`` call up to the end of its
first forward, and the rest). Per sample, ``token_counts`` holds the prompt length the
language model receives (``input_tokens``) and the generated tokens (``output_tokens``).
The settings are the run's ``model_args`` (``config.model_args`` of the results JSON).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics

from ..api import patch
from ..config import ReductionConfig
from ..eval.flops import count_flops
from ..eval.vlm import Prompter, load_vlm
from ..eval.vlm_bench import GenerateClock, llm_lengths

__all__ = ["LOADER_ARGS", "VLPruneLMM"]

#: the ``model_args`` that say what to load and how (the rest are reduction settings)
LOADER_ARGS = ("pretrained", "device", "dtype", "batch_size", "max_batch_size", "seed",
               "prompt_template")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _stop_at(text: str, until: Sequence[str]) -> str:
    """``text`` cut at the first of the stop strings ``until``."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class VLPruneLMM(lmms):
    """A LLaVA-family model, reduced by vlprune, as an lmms-eval simple model.

    ``pretrained``: a Hugging Face hub name, a local folder (``save_pretrained`` of the model
    and of its processor) or ``llava:<shape>`` (random weights); ``device`` (default: CUDA
    when available, else CPU); ``dtype`` (``float32``, ``float16``, ``bfloat16``; default
    bfloat16 on CUDA, float32 elsewhere); ``batch_size``; ``prompt_template`` (a
    :class:`~vlprune.eval.vlm.Prompter` template with ``<image>`` and ``{question}``); every
    other keyword is a :class:`~vlprune.config.ReductionConfig` field passed to
    :func:`vlprune.patch` (unknown names are refused with the list of allowed ones).
    """

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str | None = 1, max_batch_size: int | None = None,
                 seed: int = 0, prompt_template: str | None = None, **settings: Any) -> None:
        super().__init__()
        unknown = sorted(set(settings) - set(ReductionConfig.field_names()))
        if unknown:
            raise ValueError(
                f"unknown model_args {unknown} for --model vlprune; allowed: "
                f"{', '.join(LOADER_ARGS)} and the reduction settings "
                f"{', '.join(ReductionConfig.field_names())}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise NotImplementedError("--model vlprune runs in one process; launch lmms-eval "
                                      "without accelerate / torchrun")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        if dtype in (None, "auto"):
            torch_dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        elif dtype in _DTYPES:
            torch_dtype = _DTYPES[dtype]
        else:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or auto, got {dtype!r}")
        try:
            self.batch_size_per_gpu = int(batch_size if batch_size is not None else 1)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--batch_size must be an integer for --model vlprune, got "
                             f"{batch_size!r}") from e
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"--batch_size must be >= 1, got {batch_size!r}")
        vlm = load_vlm(str(pretrained), device=self._device, dtype=torch_dtype, seed=int(seed))
        self.vlm = vlm
        self.model = vlm.model
        self.processor = vlm.processor
        self.settings = dict(settings)
        if self.settings:
            patch(self.model, **self.settings)
        self.prompter = Prompter(self.processor, vlm.family, prompt_template, suffix="")
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = self.model.config.get_text_config().pad_token_id
        self.pad_id = 0 if pad is None else int(pad)
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = sorted(set(eos))
        self.image_id = int(self.model.config.image_token_id)
        self.chat_template = None
        self.gflops_prefill: float | None = None

    # -- what lmms-eval reads ----------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # -- requests ----------------------------------------------------------------------------

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "--model vlprune answers generation tasks only (output_type: generate_until); "
            "loglikelihood (multiple-choice scoring) is not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(
            "--model vlprune answers single-turn generation tasks only; multi-round "
            "generation is not supported")

    def _greedy_kwargs(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """``generate`` keywords (greedy) and the stop strings of a request's ``gen_kwargs``."""
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        if kw.get("do_sample") or float(kw.get("temperature") or 0) > 0:
            raise ValueError(f"--model vlprune generates greedily; the task asks for sampling "
                             f"({gen_kwargs})")
        if int(kw.get("num_beams") or 1) != 1:
            raise ValueError(f"--model vlprune generates greedily; the task asks for beam "
                             f"search ({gen_kwargs})")
        out = dict(max_new_tokens=int(kw.get("max_new_tokens") or 16), do_sample=False,
                   num_beams=1, pad_token_id=self.pad_id)
        return out, list(until)

    def _inputs(self, prompts: list[str], images: list[Any]) -> dict[str, Any]:
        param = next(self.model.parameters())
        enc = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        return {k: v.to(param.device, param.dtype if v.is_floating_point() else None)
                if isinstance(v, torch.Tensor) else v for k, v in enc.items()}

    def _question(self, context: str) -> str:
        """The task's text without image placeholders (the prompt template places the
        image)."""
        for placeholder in {"<image>", self.prompter.image_token}:
            context = context.replace(placeholder, " ")
        return context.strip()

    def _visual(self, request) -> Any:
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) != 1 or isinstance(visuals[0], str):
            raise ValueError(f"--model vlprune answers requests with exactly one image; "
                             f"{task} document {doc_id} has {len(visuals)} visual(s)")
        return visuals[0].convert("RGB")

    def generate_until(self, requests) -> list:
        """Greedy answers to ``requests``, batched by identical ``gen_kwargs``, in order."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        results: list[Any] = [None] * len(requests)
        with torch.inference_mode(), GenerateClock(self.model, self._device) as clock:
            for idx in groups.values():
                gen, until = self._greedy_kwargs(requests[idx[0]].args[1])
                for j in range(0, len(idx), self.batch_size):
                    chunk = idx[j:j + self.batch_size]
                    prompts = [self.prompter(self._question(requests[i].args[0]))
                               for i in chunk]
                    images = [self._visual(requests[i]) for i in chunk]
                    for i, res in zip(chunk, self._batch(prompts, images, gen, until, clock)):
                        results[i] = res
        return results

    def _batch(self, prompts: list[str], images: list[Any], gen: dict[str, Any],
               until: list[str], clock: GenerateClock) -> list[GenerationResult]:
        x = self._inputs(prompts, images)
        if self.gflops_prefill is None:  # per sample: a batch-1 prefill of the first request
            x1 = self._inputs(prompts[:1], images[:1])
            flops = count_flops(lambda: self.model.generate(**x1, **dict(gen, max_new_tokens=1)))
            self.gflops_prefill = flops / 1e9
        got: list[torch.Tensor] = []
        visual, _, _, (pre_ms, rest_ms, calls) = llm_lengths(
            self.model, lambda: clock.time(lambda: got.append(self.model.generate(**x, **gen))))
        seq = got[0] if isinstance(got[0], torch.Tensor) else got[0].sequences
        new = seq[:, x["input_ids"].shape[1]:].cpu()
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        ids, mask = x["input_ids"].cpu(), x["attention_mask"].cpu()
        out, generated = [], 0
        for row, text in enumerate(texts):
            tokens = new[row].tolist()
            ends = [k for k, t in enumerate(tokens) if t in self.eos_ids]
            n_out = ends[0] + 1 if ends else len(tokens)
            generated += n_out
            # the prompt the language model receives: image placeholders cut to what is kept
            n_in = int(mask[row].sum()) - int((ids[row] == self.image_id).sum()) + visual
            out.append(GenerationResult(_stop_at(text, until).strip(),
                                        TokenCounts(input_tokens=n_in, output_tokens=n_out)))
        seconds = (pre_ms + rest_ms) / 1e3
        log_metrics(total_elapsed_time=seconds, total_gen_tokens=generated,
                    avg_speed=generated / seconds if seconds > 0 else 0.0,
                    additional_metrics={
                        "visual_tokens": visual, "gflops_prefill": self.gflops_prefill,
                        "prefill_ms": pre_ms, "decode_ms": rest_ms if calls > 1 else 0.0,
                        "batch": len(prompts)})
        return out
