"""LLaVA (LlavaForConditionalGeneration, the tiny random model of test_llava.py) registered
with the shared tester (tests/adapter_tester.py): visual tokens selected before the language
model and FastV inside it; every check runs the forward and greedy ``generate``."""

from __future__ import annotations

import math

import pytest
from adapter_tester import AdapterTester, Family

transformers = pytest.importorskip("transformers")
from test_llava import N_IMG, PROMPTS, _batch, _build  # noqa: E402

NEW_TOKENS = 4

SETTINGS = {
    "keep1": dict(visual_keep=1.0),
    "llm_keep1": dict(llm_layer=1, llm_keep=1.0),
    "visual": dict(visual_keep=4),
    "fastv": dict(llm_layer=1, llm_keep=4),
    "both": dict(visual_keep=8, visual_score="diversity", llm_layer=1, llm_keep=0.5),
}


def _inputs(batch, seed):
    """Left-padded prompts of different lengths, one image each."""
    return _batch(tuple((seed + i) % len(PROMPTS) for i in range(batch)))


def _run(model, inputs):
    """The forward's logits, then a greedy generation."""
    logits = model(**inputs).logits
    return logits, model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)


def _count(keep, n):
    """A count, or ``ceil(ratio * n)`` of the ``n`` tokens."""
    return keep if isinstance(keep, int) else math.ceil(keep * n)


def _expected_layers(kw, inputs):
    """The visual tokens each image keeps before the language model (all of them without
    ``visual_keep``), then those FastV keeps from ``llm_layer`` on. Ratios of 1.0 keep every
    token and run upstream: nothing to report."""
    visual, llm = kw.get("visual_keep"), kw.get("llm_keep") if kw.get("llm_layer") is not None else None
    if visual in (None, 1.0) and llm in (None, 1.0):
        return []
    n = _count(visual, N_IMG) if visual is not None else N_IMG
    out = [("visual", N_IMG, n)]
    if llm is not None:
        out.append(("llm", n, _count(llm, n)))
    return out


class TestLlavaCommon(AdapterTester):
    families = {
        "llava": Family(
            build=_build, inputs=_inputs, settings=SETTINGS,
            identity={"keep1": 0.0, "llm_keep1": 0.0},
            expected_layers=_expected_layers, run=_run, outputs=lambda out, inputs: list(out),
            same_shape=(1,), trace_source=False, other={"visual_keep": 6},
            concurrency=("visual", "fastv", "both"),
        )
    }
