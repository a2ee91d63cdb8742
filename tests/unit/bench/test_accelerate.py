"""The speed levers compute the same function as the eager networks (CPU, tiny random nets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.models.accelerate import (
    BatchBuckets,
    CompiledRRDBNet,
    CudaGraphed,
    SpeedOptions,
    accelerate_module,
    accelerate_sr,
    bucket_size,
    run_in_batches,
)
from worker.models.sr_nets import RRDBNet, SRVGGNetCompact
from worker.models.super_res import SrModel, upscale_frames


def _sr(net: torch.nn.Module) -> SrModel:
    net.eval().requires_grad_(False)
    return SrModel(name="tiny", net=net, scale=4, device=torch.device("cpu"), dtype=torch.float32)


def _eager(model: SrModel, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.run(x.clone()).clone()


@pytest.mark.parametrize("scale", [4, 2])
def test_functional_rrdb_forward_equals_rrdbnet(seeded: None, scale: int) -> None:
    net = RRDBNet(num_block=2, num_feat=8, num_grow_ch=4, scale=scale).eval()
    x = torch.rand(2, 3, 12, 16)
    with torch.inference_mode():
        want = net(x)
        got = CompiledRRDBNet(net, compiled=False)(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RRDBNet(num_block=1, num_feat=8, num_grow_ch=4),
        lambda: SRVGGNetCompact(num_feat=8, num_conv=2),
    ],
)
def test_channels_last_sr_gives_eager_output(seeded: None, make) -> None:
    model = _sr(make())
    x = torch.rand(3, 3, 10, 14)
    want = _eager(model, x)
    fast = accelerate_sr(model, SpeedOptions(channels_last=True))
    got = _eager(fast, x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own import of torch.jit inside Inductor
def test_compiled_compact_sr_gives_eager_output_for_odd_batches(seeded: None, tmp_path) -> None:
    from worker.models.accelerate import configure_compile_cache

    configure_compile_cache(tmp_path / "inductor")
    model = _sr(SRVGGNetCompact(num_feat=4, num_conv=1))
    x = torch.rand(3, 3, 8, 8)
    want = _eager(model, x)
    fast = accelerate_sr(model, SpeedOptions(compile=True))
    torch.testing.assert_close(_eager(fast, x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_eager(fast, x[:1]), want[:1], rtol=1e-4, atol=1e-5)


def test_upscale_frames_with_accelerated_model_matches_eager(seeded: None) -> None:
    model = _sr(SRVGGNetCompact(num_feat=8, num_conv=2))
    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 20, 3), dtype=np.uint8)
    want = upscale_frames(model, frames, upscale=2, batch=2)
    got = upscale_frames(accelerate_sr(model, SpeedOptions()), frames, upscale=2, batch=2)
    assert got.shape == (3, 32, 40, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_bucket_sizes_are_powers_of_two_then_multiples_of_eight() -> None:
    assert [bucket_size(n) for n in (1, 2, 3, 4, 5, 8, 9, 17, 48)] == [1, 2, 4, 4, 8, 8, 16, 24, 48]
    with pytest.raises(ValueError):
        bucket_size(0)


def test_batch_buckets_pad_and_trim_without_changing_rows(seeded: None) -> None:
    net = torch.nn.Conv2d(3, 5, 3, padding=1).eval()
    seen: list[int] = []

    class Spy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return net(x)

    x = torch.rand(3, 3, 6, 6)
    with torch.inference_mode():
        got = BatchBuckets(Spy())(x)
        want = net(x)
    assert seen == [4]
    torch.testing.assert_close(got, want)


def test_tuple_outputs_are_trimmed_per_tensor() -> None:
    class Two(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x.sum(dim=(1, 2, 3))

    x = torch.rand(3, 2, 4, 4)
    a, b = BatchBuckets(Two())(x)
    assert a.shape == (3, 2, 4, 4) and b.shape == (3,)


def test_cuda_graph_wrapper_is_plain_eager_on_the_cpu(seeded: None) -> None:
    net = torch.nn.Conv2d(3, 4, 3, padding=1).eval()
    wrapped = accelerate_module(net, SpeedOptions(cuda_graphs=True))
    x = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(wrapped(x), net(x))
    assert isinstance(wrapped, BatchBuckets) and isinstance(wrapped.net, CudaGraphed)


def test_run_in_batches_concatenates_in_order() -> None:
    x = torch.arange(7.0).reshape(7, 1)
    assert torch.equal(run_in_batches(lambda t: t * 10, x, 3), x * 10)
    with pytest.raises(ValueError):
        run_in_batches(lambda t: t, x, 0)


def test_sr_kernels_setting_resolves_to_what_is_installed(monkeypatch) -> None:
    import importlib.util

    from worker.models import accelerate

    assert accelerate.sr_kernels("cudnn") == "cudnn"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert accelerate.sr_kernels("auto") == "cudnn"
    for choice in ("triton", "triton-tma"):
        with pytest.raises(RuntimeError, match="triton package is not installed"):
            accelerate.sr_kernels(choice)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert accelerate.sr_kernels("auto") == "triton" and accelerate.sr_kernels("triton") == "triton"
    assert accelerate.sr_kernels("triton-tma") == "triton-tma"
    with pytest.raises(ValueError, match="auto, cudnn, triton or triton-tma"):
        accelerate.sr_kernels("fast")


def test_triton_kernels_and_compile_are_exclusive() -> None:
    with pytest.raises(ValueError, match="pick one"):
        accelerate_module(torch.nn.Conv2d(3, 3, 3), SpeedOptions(kernels="triton", compile=True))
