"""vlprune.testing.pytest_plugin: models a test session builds come out patched (reducing
nothing) with ``-p vlprune.testing.pytest_plugin``, unpatched without it; the summary line."""

from __future__ import annotations

import json

import pytest

import vlprune
from vlprune.testing.pytest_plugin import parse_setting

pytest_plugins = ["pytester"]
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
# imported here, before pytester's in-process runs: modules first imported inside one are
# dropped from sys.modules after it, and the next run would then hook a fresh PreTrainedModel
# while the cached CLIP classes still derive from the old one
from transformers import CLIPModel, CLIPVisionModel, LlamaModel  # noqa: E402, F401

PLUGIN = "vlprune.testing.pytest_plugin"

# the generated test: a timm test_vit, a tiny CLIPVisionModel, a CLIPModel (its towers are
# patched as part of it, not alone) and a Llama model (no adapter: left alone)
GENERATED = '''
import timm, torch, vlprune
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaModel)

EXPECT = {expect}
RAND = {rand!r}  # torch.rand(1) after seed 0 and an unpatched test_vit: patching draws nothing
TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def test_build():
    torch.manual_seed(0)
    vit = timm.create_model("test_vit").eval()
    assert torch.rand(1).item() == RAND
    x = torch.randn(2, 3, 160, 160)
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=30, patch_size=2, **TOWER)).eval()
    both = CLIPModel(CLIPConfig(text_config=dict(vocab_size=99, **TOWER),
                                vision_config=dict(image_size=30, patch_size=2, **TOWER)))
    llama = LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
    assert vlprune.is_patched(vit) is EXPECT
    assert vlprune.is_patched(clip) is EXPECT
    assert vlprune.is_patched(both) is EXPECT
    assert not vlprune.is_patched(both.vision_model)
    assert not vlprune.is_patched(llama)
    with torch.no_grad():
        assert vit(x).shape == (2, 1000)
        assert clip(torch.randn(2, 3, 30, 30)).last_hidden_state.shape == (2, 226, 32)
'''


@pytest.fixture(autouse=True, scope="module")
def _imported_here() -> None:
    """Build, patch and run the generated test's models once in this process: what that
    imports lazily stays imported (pytester drops the modules an in-process run imported
    first, and later tests would get fresh copies of them)."""
    import torch
    from transformers import CLIPConfig, CLIPVisionConfig

    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    vit = vlprune.patch(timm.create_model("test_vit", depth=1), merge_r=0)
    clip = vlprune.patch(CLIPVisionModel(CLIPVisionConfig(image_size=30, patch_size=2, **tower)),
                         merge_r=0)
    both = vlprune.patch(CLIPModel(CLIPConfig(text_config=dict(vocab_size=99, **tower),
                                              vision_config=dict(image_size=30, patch_size=2,
                                                                 **tower))), merge_r=0)
    with torch.no_grad():
        vit(torch.randn(1, 3, 160, 160))
        clip(torch.randn(1, 3, 30, 30))
        both(input_ids=torch.ones(1, 4, dtype=torch.long), pixel_values=torch.randn(1, 3, 30, 30))


def _rand_after_vit() -> float:
    import torch

    torch.manual_seed(0)
    timm.create_model("test_vit")
    return torch.rand(1).item()


def _run(pytester: pytest.Pytester, expect: bool | None, *args: str) -> pytest.RunResult:
    if expect is not None:  # None: a run that stops before collecting
        pytester.makepyfile(test_generated=GENERATED.format(expect=expect,
                                                            rand=_rand_after_vit()))
    # hypothesis' plugin would re-import hypothesis in every in-process run (pytester drops the
    # modules a run imported): seconds each
    return pytester.runpytest("-p", "no:cacheprovider", "-p", "no:hypothesispytest", *args)


def test_plugin_patches_every_model_built(pytester: pytest.Pytester) -> None:
    report = pytester.path / "report.json"
    result = _run(pytester, True, "-p", PLUGIN, "--vlprune-setting", "merge_r=0",
                  f"--vlprune-report={report}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "vlprune: patching models at merge_r=0; hooked: timm*transformers*",
        "vlprune: patched 3 models (hf_clip: 1, hf_clip_vision: 1, timm_vit: 1) at merge_r=0; "
        "left alone 1",
        "*left alone*transformers*LlamaModel*1*no adapter*",
    ])
    data = json.loads(report.read_text())
    assert sum(r["count"] for r in data["patched"]) == 3
    assert data["tests"]["test_generated.py::test_build"] == {"patched": 3, "left_alone": 1}
    # the hooks are gone once the inner session ended
    assert not hasattr(timm.models.vision_transformer.VisionTransformer.__init__, "__wrapped__")
    assert not hasattr(transformers.PreTrainedModel.post_init, "__wrapped__")
    assert not vlprune.is_patched(timm.create_model("test_vit", depth=1))


def test_without_the_plugin_nothing_is_patched(pytester: pytest.Pytester) -> None:
    result = _run(pytester, False)
    result.assert_outcomes(passed=1)
    assert "vlprune: patched" not in result.stdout.str()


def test_family_settings_and_refusals(pytester: pytest.Pytester) -> None:
    # a family of its own gets its settings; the others the unprefixed ones
    result = _run(pytester, True, "-p", PLUGIN, "--vlprune-setting", "prune_keep=1.0",
                  "--vlprune-setting", "timm_vit: merge_r=0")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["vlprune: patched 3 models*at prune_keep=1.0 "
                                 "[[]timm_vit: merge_r=0[]]; left alone 1"])
    # a setting that reduces is refused unless asked for; an unknown field or family too
    for setting, message in (("merge_r=4", "*reduces tokens*--vlprune-allow-reducing*"),
                             ("merge=0", "*unknown setting*"),
                             ("nofamily: merge_r=0", "*unknown family*")):
        result = _run(pytester, None, "-p", PLUGIN, "--vlprune-setting", setting)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([message])


def test_parse_setting() -> None:
    assert parse_setting("merge_r=0") == (None, {"merge_r": 0})
    assert parse_setting(" hf_llava: visual_keep=1.0 merge_r=0") == (
        "hf_llava", {"visual_keep": 1.0, "merge_r": 0})
    assert parse_setting("prune_keep=1.0 prune_layers=3,6,9 prune_score=random") == (
        None, {"prune_keep": 1.0, "prune_layers": (3, 6, 9), "prune_score": "random"})
    assert parse_setting("prune_layers=2 merge_r=(0,0.5)") == (
        None, {"prune_layers": (2,), "merge_r": (0, 0.5)})
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_setting("merge_r")
