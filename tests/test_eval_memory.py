"""Peak tensor memory: known allocation patterns must give their known peaks."""

from __future__ import annotations

import pytest
import torch

from vlprune.eval.memory import peak_memory

torch.set_num_threads(2)

MIB = 1 << 20
FLOATS_4MIB = MIB  # float32: 4 bytes each


def test_two_alive_then_one_freed() -> None:
    def fn() -> torch.Tensor:
        a = torch.empty(FLOATS_4MIB)
        b = torch.ones(FLOATS_4MIB)
        del a
        c = torch.zeros(FLOATS_4MIB)
        return b + c[0]

    # a is gone before c exists; b, c and the 4 MiB result end up alive together.
    assert peak_memory(fn) == pytest.approx(12 * MIB, abs=4096)

    def fn2() -> None:
        a = torch.empty(FLOATS_4MIB)
        b = torch.ones(FLOATS_4MIB)
        del a, b
        torch.zeros(FLOATS_4MIB)

    assert peak_memory(fn2) == pytest.approx(8 * MIB, abs=4096)


def test_loop_of_temporaries_does_not_accumulate() -> None:
    def fn() -> None:
        for _ in range(10):
            torch.randn(FLOATS_4MIB).mul_(2)

    assert peak_memory(fn) == pytest.approx(4 * MIB, abs=4096)


def test_views_and_inplace_are_not_counted_twice() -> None:
    def fn() -> torch.Tensor:
        a = torch.empty(FLOATS_4MIB)
        v = a.view(1024, 1024).t()[1:]
        v.add_(1).clamp_(0, 1)
        return v.diagonal()

    assert peak_memory(fn) == pytest.approx(4 * MIB, abs=4096)


def test_view_keeps_storage_alive() -> None:
    def fn() -> None:
        a = torch.empty(FLOATS_4MIB)
        v = a[:10]  # a's whole storage lives on through the view
        del a
        b = torch.empty(FLOATS_4MIB)
        del v, b

    assert peak_memory(fn) == pytest.approx(8 * MIB, abs=4096)


def test_preexisting_tensors_are_not_counted() -> None:
    x = torch.randn(FLOATS_4MIB)

    def fn() -> torch.Tensor:
        x.add_(1)
        return x.view(1024, -1)[3]

    assert peak_memory(fn) == 0


def test_out_argument_resize_and_literals_are_counted() -> None:
    def fn() -> torch.Tensor:
        buf = torch.empty(0)
        parts = [torch.ones(1000), torch.ones(1000)]
        torch.cat(parts, out=buf)  # buf grows to 8000 bytes while the parts live
        return buf

    assert peak_memory(fn) == 16000

    def literal() -> torch.Tensor:
        return torch.tensor([1.0, 2.0, 3.0])

    assert peak_memory(literal) == 12


def test_meta_tensors_cost_nothing() -> None:
    assert peak_memory(lambda: torch.empty(FLOATS_4MIB, device="meta") * 2) == 0


def test_device_filter() -> None:
    def fn() -> None:
        torch.empty(FLOATS_4MIB)

    assert peak_memory(fn, device="cpu") == pytest.approx(4 * MIB, abs=4096)
    # A device type with no tensors allocated on it reads 0 via the tracker.
    assert peak_memory(fn, device="meta") == 0


def test_vit_forward_grows_with_batch() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x1 = torch.randn(1, 3, 224, 224)
    x8 = torch.randn(8, 3, 224, 224)
    with torch.inference_mode():
        p1 = peak_memory(lambda: model(x1))
        p8 = peak_memory(lambda: model(x8))
    # Activations scale with the batch; weights (not allocated inside) do not count.
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < p1 < param_bytes
    assert p8 > 4 * p1


def test_matches_profiler_memory_timeline() -> None:
    # An independent record: the profiler logs every allocator call.
    timm = pytest.importorskip("timm")
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action
    except ImportError:
        pytest.skip("this torch has no profiler memory timeline")
    model = timm.create_model("test_vit", pretrained=False).eval()
    x = torch.randn(4, 3, 160, 160)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                         with_stack=True, record_shapes=True) as prof:
        model(x)
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    with torch.inference_mode():
        ours = peak_memory(lambda: model(x))
    assert peak > 0
    assert ours == pytest.approx(peak, rel=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_allocator_peak() -> None:
    def fn() -> None:
        a = torch.empty(FLOATS_4MIB, device="cuda")
        b = torch.empty(FLOATS_4MIB, device="cuda")
        del a, b
        torch.empty(FLOATS_4MIB, device="cuda")

    assert peak_memory(fn, device="cuda") == pytest.approx(8 * MIB, abs=64 * 1024)
