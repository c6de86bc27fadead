"""Training a patched model: tiny random models of every image family (timm ViT, open_clip
image tower, Hugging Face CLIP / SigLIP vision towers) train with merging and pruning.

* reducing nothing, a patched model's gradients are the unpatched model's, bit for bit;
* float64 ``gradcheck`` with merging (proportional attention), EViT fusion and recycling: the
  analytical gradient is the derivative of the reduced forward (the plan is checked to stay
  the same under the finite-difference steps);
* gradient checkpointing while reducing gives the gradients of the plain run, bit for bit, in
  train mode with seeded dropout and drop path, with the ``random`` score's per-step key and
  two forwards before one backward (each recomputed block replays its own forward's run);
* ``torch.autocast`` bfloat16 on the CPU: forward and backward with reduction, finite grads;
* DDP through ``accelerate`` with two CPU processes: the averaged gradients equal one
  process's gradient of the combined batch.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import socket
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import pytest
import torch

import vlprune
from vlprune.adapters.call import current

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

IMG = 32  # patch 8: 16 patches, plus the class token where the family has one


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster, and steady on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _timm(dropout: bool = False):
    p = 0.1 if dropout else 0.0
    return timm.create_model("vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=3, embed_dim=32,
                             num_heads=2, num_classes=5, drop_path_rate=p, proj_drop_rate=p,
                             attn_drop_rate=p)


def _open_clip(dropout: bool = False):
    from open_clip.transformer import VisionTransformer

    model = VisionTransformer(image_size=IMG, patch_size=8, width=32, layers=3, heads=2,
                              mlp_ratio=2.0, output_dim=16)
    for blk in model.transformer.resblocks:
        blk.attn.dropout = 0.1 if dropout else 0.0  # nn.MultiheadAttention's attention dropout
    return model


def _hf_config(cls, dropout: bool):
    return cls(image_size=IMG, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=2, attention_dropout=0.1 if dropout else 0.0)


def _hf_clip(dropout: bool = False):
    return transformers.CLIPVisionModel(_hf_config(transformers.CLIPVisionConfig, dropout))


def _hf_siglip(dropout: bool = False):
    return transformers.SiglipVisionModel(_hf_config(transformers.SiglipVisionConfig, dropout))


def _pooled(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


FAMILIES = {"timm_vit": _timm, "open_clip_visual": _open_clip, "hf_clip_vision": _hf_clip,
            "hf_siglip_vision": _hf_siglip}
NO_CLASS_TOKEN = ("hf_siglip_vision",)

# reducing settings (class-attention scores fall back to key_norm without a class token)
SETTINGS = {
    "merge_fuse": dict(merge_r=2, prune_keep=0.5, prune_layers=(1,), prune_fuse=True),
    "random_train_key": dict(merge_r=1, prune_keep=0.5, prune_layers=(0, 2), prune_score="random"),
    "recycle": dict(merge_r=1, prune_keep=0.5, prune_layers=(1,), prune_recycle=True),
}


def _settings(family: str, setting: str) -> dict:
    kw = SETTINGS[setting]
    if family in NO_CLASS_TOKEN and "prune_score" not in kw:
        kw = {**kw, "prune_score": "key_norm"}
    return kw


def _build(family: str, dropout: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[family](dropout).train()


def _pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    return _pooled(model(x)).float().square().mean()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k in want:
        assert torch.equal(got[k], want[k]), f"{what}: grad of {k} differs by {(got[k] - want[k]).abs().max()}"


def _step(model, xs: list[torch.Tensor], seed: int = 5) -> tuple[list[torch.Tensor], dict]:
    """Losses and gradients of forwards on ``xs`` (dropout seeded), one backward of their sum."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses = [_loss(model, x) for x in xs]
    sum(losses).backward()
    return [loss.detach() for loss in losses], _grads(model)


@contextlib.contextmanager
def _checkpointing(model, family: str, reentrant: bool = False):
    """Gradient checkpointing the way each library turns it on."""
    if family == "timm_vit":
        from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

        before = use_reentrant_ckpt()
        set_reentrant_ckpt(reentrant)
        model.set_grad_checkpointing(True)
        try:
            yield
        finally:
            set_reentrant_ckpt(before)
            model.set_grad_checkpointing(False)
    elif family == "open_clip_visual":
        assert not reentrant  # open_clip checkpoints with use_reentrant=False
        model.set_grad_checkpointing(True)
        try:
            yield
        finally:
            model.set_grad_checkpointing(False)
    else:  # transformers: activation_checkpointing_enable (5.25), gradient_checkpointing_enable
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        enable({"use_reentrant": reentrant})
        try:
            yield
        finally:
            disable()


# --- reducing nothing: the unpatched gradients ----------------------------------------------


@pytest.mark.parametrize("setting", [dict(merge_r=0), dict(prune_keep=1.0, prune_layers=(0, 1))],
                         ids=["r0", "keep1"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_reducing_nothing_gives_the_unpatched_gradients(family, setting):
    model = _build(family, dropout=True)
    xs = [_pixels()]
    ref_losses, ref = _step(model, xs)
    vlprune.patch(model, **setting)
    losses, grads = _step(model, xs)
    assert torch.equal(losses[0], ref_losses[0])
    _assert_same_grads(grads, ref, f"{family} patched with {setting}")


def _clip_models():
    torch.manual_seed(0)
    oc = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=IMG, patch_size=8, width=32, layers=2, head_width=16),
                        text_cfg=dict(context_length=12, vocab_size=99, width=32, heads=2, layers=2))
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, eos_token_id=98)
    hf = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=text, vision_config=_hf_config(transformers.CLIPVisionConfig, False).to_dict(),
        projection_dim=16))
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(2))
    ids[:, 8] = 98  # EOT (the highest id: open_clip pools the argmax)
    ids[:, 9:] = 0
    return [
        (oc, lambda m: sum(t.square().mean() for t in m(_pixels(), ids)[:2])),
        (hf, lambda m: m(input_ids=ids, pixel_values=_pixels(), attention_mask=(ids > 0).long()).logits_per_image.square().mean()),
    ]


def test_two_tower_models_reducing_nothing_give_the_unpatched_gradients():
    for model, loss_fn in _clip_models():
        model.train()
        loss_fn(model).backward()
        ref = _grads(model)
        vlprune.patch(model, merge_r=0, prune_keep=1.0, prune_layers=(0,))
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        _assert_same_grads(_grads(model), ref, type(model).__name__)
        # and a reducing setting trains both towers (every parameter gets a finite grad)
        vlprune.configure(model, merge_r=2, text_merge_r=1)
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        grads = _grads(model)
        assert grads.keys() == ref.keys()
        assert all(torch.isfinite(g).all() for g in grads.values())


# --- gradcheck: the gradient of the reduced forward -----------------------------------------


@pytest.mark.parametrize("setting", [
    dict(merge_r=2, prop_attn=True, prune_keep=0.5, prune_layers=(1,), prune_fuse=True),
    dict(merge_r=1, prop_attn=True, prune_keep=0.5, prune_layers=(1,), prune_recycle=True),
], ids=["merge_fuse", "merge_recycle"])
def test_gradcheck_float64(setting):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=12, patch_size=4, depth=3, embed_dim=16,
                              num_heads=2, num_classes=3).double().eval()
    vlprune.patch(model, trace_source=True, **setting)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 3, 12, 12, dtype=torch.float64, generator=g)
    # the image moves in 8 random directions (a full-rank check of J @ A, not 432 columns)
    directions = torch.randn(3 * 12 * 12, 8, dtype=torch.float64, generator=g)
    z = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    # parameters of the pruning layer: its norm and qkv bias feed the scores, EViT's fusion
    # weights and the merge metric
    names = ["blocks.1.norm1.weight", "blocks.1.attn.qkv.bias"]
    params = dict(model.named_parameters())
    ws = [params[n].detach().clone().requires_grad_() for n in names]
    sources = []

    def f(z, *ws):
        x = x0 + (directions @ z).view_as(x0)
        out = torch.func.functional_call(model, dict(zip(names, ws)), (x,))
        sources.append(vlprune.get_source(model).clone())
        return out

    assert torch.autograd.gradcheck(f, (z, *ws), eps=1e-6, atol=1e-6, rtol=1e-4)
    # every forward gradcheck ran (each finite-difference step) took the same plan
    assert len(sources) > 100
    assert all(torch.equal(s, sources[0]) for s in sources)
    # and the plan reduced: 10 tokens in, each layer merging or pruning
    desc = vlprune.describe(model, x0)
    assert desc.layers[-1].tokens_out <= 4 and all(lr.tokens_out < lr.tokens_in for lr in desc.layers)


# --- gradient checkpointing ------------------------------------------------------------------


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpointed_gradients_equal_plain(family, setting):
    """Train mode with seeded dropout (and timm's drop path); two forwards, then one backward
    (gradient accumulation: the recompute of the first forward runs after the second began,
    with another token state and, for ``random``, another training key)."""
    plain = _build(family, dropout=True)
    vlprune.patch(plain, trace_source=True, **_settings(family, setting))
    ckpt = copy.deepcopy(plain)  # the same weights, and the same count of training steps
    xs = [_pixels(seed=1), _pixels(seed=2)]
    ref_losses, ref = _step(plain, xs)
    with _checkpointing(ckpt, family):
        ckpt.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        losses = [_loss(ckpt, x) for x in xs]
        source = vlprune.get_source(ckpt).clone()  # the latest forward's
        sum(losses).backward()
    assert [loss.detach() for loss in losses] == ref_losses
    _assert_same_grads(_grads(ckpt), ref, f"{family} {setting} with gradient checkpointing")
    # the recomputes ran in call states of their own: the forward's result is still there
    assert torch.equal(vlprune.get_source(ckpt), source)


@pytest.mark.parametrize("family", ["timm_vit", "hf_clip_vision"])
def test_reentrant_checkpointing(family):
    plain = _build(family, dropout=True)
    vlprune.patch(plain, **_settings(family, "merge_fuse"))
    ckpt = copy.deepcopy(plain)
    xs = [_pixels(seed=1), _pixels(seed=2)]
    _, ref = _step(plain, xs)
    with _checkpointing(ckpt, family, reentrant=True):
        _, grads = _step(ckpt, xs)
    _assert_same_grads(grads, ref, f"{family} with reentrant checkpointing")


def test_checkpointed_segments_of_several_blocks():
    """timm's checkpoint_seq with every=2: a recompute runs two blocks, the second on the
    first's recomputed output."""
    from timm.models._manipulate import checkpoint_seq

    plain = _build("timm_vit", dropout=True)
    vlprune.patch(plain, **_settings("timm_vit", "random_train_key"))
    ckpt = copy.deepcopy(plain)

    def features(model, x, every):
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        model._vlprune_start(model.num_prefix_tokens)  # what the patched forward_features does
        x = checkpoint_seq(model.blocks, x, every=every, use_reentrant=False) if every else model.blocks(x)
        return model.forward_head(model.norm(x)).square().mean()

    grads = []
    for model, every in ((plain, 0), (ckpt, 2)):
        torch.manual_seed(5)
        features(model, _pixels(), every).backward()
        grads.append(_grads(model))
    _assert_same_grads(grads[1], grads[0], "checkpoint_seq every=2")


def test_backward_in_another_thread_after_the_next_forward():
    """The recompute finds its forward's record wherever the backward runs; the tape holds no
    autograd graph, so a step's records go with its graph (no reference cycle)."""
    plain = _build("timm_vit")
    vlprune.patch(plain, **_settings("timm_vit", "merge_fuse"))
    ckpt = copy.deepcopy(plain)
    loss_a = _loss(plain, _pixels())
    loss_a.backward()
    with _checkpointing(ckpt, "timm_vit"):
        pending = [_loss(ckpt, _pixels())]
        tape = weakref.ref(current(ckpt._vlprune.key).tape)
        _loss(ckpt, _pixels(seed=7))  # the next forward replaces this thread's call state
        errors = []

        def backward():
            try:
                pending[0].backward()
            except Exception as e:  # noqa: BLE001  (reported below)
                errors.append(e)

        worker = threading.Thread(target=backward)
        worker.start()
        worker.join(60)
    assert not errors, errors
    _assert_same_grads(_grads(ckpt), _grads(plain), "backward in another thread")
    gc.disable()
    try:
        pending.clear()
        assert tape() is None  # freed with its graph, no garbage collection needed
    finally:
        gc.enable()


def test_bert_full_output_under_checkpointing():
    """Pruned tokens reach the full-length output through the token state: non-reentrant
    checkpointing gives their gradients, reentrant (no gradients in the first run) is refused."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, max_position_embeddings=32)
    model = transformers.BertModel(cfg).train()
    vlprune.patch(model, prune_keep=0.5, prune_layers=(0,), prune_score="key_norm")
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(1))
    with _checkpointing(model, "bert", reentrant=True), pytest.raises(RuntimeError, match="use_reentrant"):
        model(input_ids=ids).last_hidden_state.sum().backward()
    plain = copy.deepcopy(model)
    plain.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    loss = lambda m: m(input_ids=ids).last_hidden_state.square().mean()  # noqa: E731
    torch.manual_seed(5)  # the same dropout masks
    loss(plain).backward()
    with _checkpointing(model, "bert", reentrant=False):  # non-reentrant: the pruned tokens too
        torch.manual_seed(5)
        loss(model).backward()
    _assert_same_grads(_grads(model), _grads(plain), "BERT full-length output, checkpointed")


# --- autocast --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_autocast_bfloat16_forward_backward(family):
    model = _build(family, dropout=True)
    vlprune.patch(model, **_settings(family, "merge_fuse"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _pooled(model(_pixels()))
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    grads = _grads(model)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(g).all() for g in grads.values())
    desc = vlprune.describe(model, _pixels())
    assert desc.layers[-1].tokens_out < desc.layers[0].tokens_in


# --- DDP through accelerate --------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import copy, sys, torch, timm, vlprune
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=32,
                              num_heads=2, num_classes=5)
    vlprune.patch(model, merge_r=2, prune_keep=0.5, prune_layers=(1,), prune_fuse=True)
    model.train()
    reference = copy.deepcopy(model)  # one process, the combined batch
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 1, 4])
    loss_fn = torch.nn.CrossEntropyLoss()
    model.set_grad_checkpointing(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ddp, optimizer = acc.prepare(model, optimizer)
    part = slice(2 * acc.process_index, 2 * acc.process_index + 2)
    acc.backward(loss_fn(ddp(x[part]), y[part]))  # DDP averages the gradients over the ranks
    if acc.is_main_process:
        loss_fn(reference(x), y).backward()
        ref = dict(reference.named_parameters())
        diff = max((p.grad - ref[n].grad).abs().max().item() for n, p in model.named_parameters())
        scale = max(p.grad.abs().max().item() for p in reference.parameters())
        print(f"MAXDIFF {diff:.3e} SCALE {scale:.3e}", flush=True)
    acc.wait_for_everyone()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process_on_the_combined_batch(tmp_path: Path):
    pytest.importorskip("accelerate")
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("MAXDIFF"))
    diff, scale = float(line.split()[1]), float(line.split()[3])
    assert scale > 0 and diff <= 1e-6 * max(1.0, scale), line
