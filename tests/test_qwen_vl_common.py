"""Qwen2.5-VL and Qwen3-VL through the shared adapter tester (tests/adapter_tester.py):
identity settings, disabled, tokens per layer, configure round trips, refusals, concurrency.
A module of its own: test_qwen_vl's autouse model fixture would run these once per family."""

from __future__ import annotations

import pytest
import torch
from adapter_tester import AdapterTester, Family

pytest.importorskip("transformers")
from test_qwen_vl import FAMILIES, _build, batch  # noqa: E402

# rows of one 4-token image each (FastV's equal-count rule), left-padded with different prompt
# lengths

COMMON = {
    "visual": dict(visual_keep=2, visual_score="attn"),
    "fastv": dict(llm_layer=1, llm_keep=2),
}
_CONFIG_MODELS: dict[str, torch.nn.Module] = {}


def _common_inputs(family: str):
    def inputs(batch_size, seed):
        model = _CONFIG_MODELS.setdefault(family, _build(family))
        specs = tuple((("t", 4 + (seed + i) % 3), ("img", 4, 4), ("t", 2)) for i in range(batch_size))
        return batch(model, specs, seeds=[seed * 10 + i for i in range(batch_size)])
    return inputs


def _common_layers(kw, inputs):
    """Each image's 4 merged tokens, then the visual_keep count before the language model,
    then FastV's count from ``llm_layer`` on."""
    visual = kw.get("visual_keep")
    llm = kw.get("llm_keep") if kw.get("llm_layer") is not None else None
    if visual in (None, 1.0) and llm in (None, 1.0):
        return []
    n = visual if isinstance(visual, int) else 4
    out = [] if visual in (None, 1.0) else [("visual", 4, n)]
    if llm is not None:
        out.append(("llm", n, llm))
    return out


def _common_run(m, inputs):
    return m(**inputs).logits, m.generate(**inputs, max_new_tokens=2, do_sample=False)


class TestQwenVLCommon(AdapterTester):
    families = {
        family: Family(
            build=lambda family=family: _build(family), inputs=_common_inputs(family),
            settings=COMMON, expected_layers=_common_layers, run=_common_run,
            outputs=lambda out, inputs: list(out), same_shape=(1,), trace_source=False,
            other={"visual_keep": 3, "visual_score": "attn"}, concurrency=("visual",),
            batches=(2,),
            refusals=(("merge_r", dict(merge_r=2)), ("visual_score", dict(visual_keep=2, visual_score="pool"))),
        )
        for family in FAMILIES
    }
