"""Upstream drift: fingerprints of the overridden upstream code, the self-check, and what
``patch`` does when an overridden function is not a tested version's."""

from __future__ import annotations

import warnings

import pytest
import torch

import vlprune
from vlprune import upstream

timm = pytest.importorskip("timm")


def _vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()


def _f(x):
    """a docstring"""
    return x + 1  # a comment


def _g(x):
    # another comment, no docstring
    return x + 1


def _h(x):
    return x + 2


def test_fingerprint_sees_code_not_comments_or_docstrings():
    assert upstream.fingerprint(_f) == upstream.fingerprint(_g)
    assert upstream.fingerprint(_f) != upstream.fingerprint(_h)


def test_overridden_lists_the_upstream_functions_a_patch_replaces():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    model = vlprune.patch(_vit(), merge_r=2)
    found = upstream.overridden(model)
    assert found[upstream.key_of(Block.forward)] is Block.forward
    assert found[upstream.key_of(Attention.forward)] is Attention.forward
    vlprune.unpatch(model)
    assert upstream.overridden(model) == {}


def test_installed_versions_are_recorded():
    """The table ships the fingerprints of the versions the suite runs with (``vlprune check
    --record`` after a green run); a new upstream release fails here until recorded."""
    model = vlprune.patch(_vit(), merge_r=2)
    assert upstream.unknown(model) == {}, (
        "run `vlprune check --record` once the suite passes with these versions: "
        f"{upstream.versions()}")


def test_check_passes_on_a_supported_model():
    model = vlprune.patch(_vit(), merge_r=2)
    before = vlprune.get_config(model)
    result = vlprune.check(model)
    assert result.ok, str(result)
    assert result.max_diff_unreduced == 0.0 and result.reduced_finite
    assert vlprune.get_config(model) is before and vlprune.is_patched(model)


def test_check_fails_on_wrong_token_sizes(monkeypatch):
    """A reduction step that leaves fractional sizes (here: halved after each step) fails
    the self-check, though the output stays finite."""
    from vlprune.adapters import step

    original = step.reduce_step

    def halving(ctx, *args, **kwargs):
        x = original(ctx, *args, **kwargs)
        state = ctx.state
        if state.size is not None:
            state.size = state.size / 2
        return x

    monkeypatch.setattr(step, "reduce_step", halving)
    monkeypatch.setattr("vlprune.adapters.timm_vit.reduce_step", halving, raising=False)
    model = vlprune.patch(_vit(), merge_r=2)
    result = vlprune.check(model)
    assert not result.ok and result.reduced_finite
    assert any("sizes that are not whole" in p for p in result.problems), str(result)


def _drifted_attention(monkeypatch, scale: float):
    """timm's Attention.forward replaced by a changed version (its output scaled): a new
    fingerprint, as an upstream edit gives."""
    from timm.layers import Attention

    original = Attention.forward

    def forward(self, x, attn_mask=None, is_causal=False):
        return original(self, x, attn_mask=attn_mask, is_causal=is_causal) * scale

    forward.__module__, forward.__qualname__ = original.__module__, original.__qualname__
    monkeypatch.setattr(Attention, "forward", forward)
    return upstream.key_of(forward)


def test_changed_upstream_function_warns_once_after_a_passing_self_check(monkeypatch):
    key = _drifted_attention(monkeypatch, 1.5)
    monkeypatch.setattr("vlprune.api._WARNED", set())
    model = _vit()
    with pytest.warns(UserWarning, match="differs from the tested versions") as record:
        vlprune.patch(model, merge_r=2)
    assert key in str(record[0].message)
    assert vlprune.is_patched(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same function warns only once per process
        vlprune.patch(_vit(), merge_r=2)


def test_upstream_change_the_patch_no_longer_fits_refuses_the_patch(monkeypatch):
    """timm 1.0.16's Block.forward had no ``is_causal``: the patched block passes it, the
    self-check's forward raises, and the patch is refused, the model left as it was."""
    from timm.models.vision_transformer import Block

    original = Block.forward

    def forward(self, x, attn_mask=None):
        return original(self, x, attn_mask=attn_mask)

    forward.__module__, forward.__qualname__ = original.__module__, original.__qualname__
    monkeypatch.setattr(Block, "forward", forward)
    model = _vit()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = model(x)
    with pytest.raises(vlprune.UnsupportedModelError, match=r"(?s)self-check FAILED.*is_causal"):
        vlprune.patch(model, merge_r=2)
    assert not vlprune.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("name", ["qwen2.5-vl:tiny", "internvl:tiny"])
def test_check_cli_on_vlms_without_tower_reduction(name, capsys):
    """`vlprune check --model` on a VLM whose tower is not reduced checks a visual_keep
    setting (merge_r would be refused) and passes on the installed, tested versions."""
    transformers = pytest.importorskip("transformers")
    from vlprune.cli import main

    if name.startswith("qwen") and tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (5, 25):
        pytest.skip("the Qwen-VL adapter needs transformers >= 5.25 (refused below: test_qwen_vl)")

    assert main(["check", "--model", name]) == 0
    out = capsys.readouterr().out
    assert "vlprune self-check passed: unreduced max |diff| = 0" in out
