"""Speed levers for our networks on CUDA: channels_last, dtype, torch.compile, CUDA graphs, batch buckets.

Every lever keeps the function the same (fp16/bf16 within rounding), so a wrapped model is a drop-in
for the eager one. On the CPU only channels_last and compile apply; CUDA graphs fall back to eager.
Why these: cuDNN's fp16 tensor-core convolutions want NHWC (NCHW inputs cost a layout transform per
conv); Inductor fuses the RRDB's leaky-ReLU + concat + residual passes, which dominate the bytes
moved; CUDA graphs remove launch gaps for small inputs (face crops, the compact SR net at batch 1).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.models.sr_nets import UPSAMPLE_HALO_ROWS, RRDBNet, run_in_row_bands
from worker.models.super_res import SrModel

MAX_CUDA_GRAPHS = 8  # captured input shapes per wrapped module (each keeps its own memory pool)


@dataclass(frozen=True)
class SpeedOptions:
    """Which levers to apply; the defaults are the ones safe everywhere."""

    channels_last: bool = True
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode (None = Inductor's default)
    cuda_graphs: bool = False
    bucket_batches: bool = True  # pad batches to a few sizes so compiled/graphed shapes repeat
    dtype: torch.dtype | None = None  # None keeps the model's dtype
    # "triton": the SR nets' 3x3 convs as fused Triton kernels (``fast_sr``) instead of cuDNN + torch;
    # "triton-tma": the same kernels loading their tiles through tensor descriptors (Hopper's TMA)
    kernels: Literal["cudnn", "triton", "triton-tma"] = "cudnn"


def enable_fast_kernels() -> None:
    """Let cuDNN time every algorithm per new conv shape and keep the fastest (process-global).

    Only for processes whose shapes repeat (the SR benchmarks). The render worker leaves it off: the
    face stage's shapes (MTCNN crop batches, the batched mesh compositor's face stacks) change with
    every batch, and autotuning each new one made a 1080p chunk 3-5x slower (bench/RESULTS.md).
    """
    torch.backends.cudnn.benchmark = True


def sr_kernels(choice: str) -> Literal["cudnn", "triton", "triton-tma"]:
    """Resolve the ``sr_kernels`` setting: "auto" is Triton (pointer loads) wherever the package imports
    (it ships with PyTorch's CUDA builds), else cuDNN; asking for "triton" or "triton-tma" without it is
    a clear error. "triton-tma" stays opt-in: 1.14x faster alone on an H200 at the same PSNR, but inside
    the render worker its output bytes changed between runs of the same settings (bench/RESULTS.md)."""
    if choice == "cudnn":
        return "cudnn"
    if choice not in ("auto", "triton", "triton-tma"):
        raise ValueError(f"sr_kernels must be auto, cudnn, triton or triton-tma, got {choice!r}")
    available = importlib.util.find_spec("triton") is not None
    if choice != "auto" and not available:
        raise RuntimeError(f"FACEFARM_SR_KERNELS={choice}, but the triton package is not installed")
    if choice == "triton-tma":
        return "triton-tma"
    return "triton" if available else "cudnn"


def configure_compile_cache(cache_dir: Path) -> Path:
    """Keep Inductor's FX-graph and kernel caches in ``cache_dir`` so a second process compiles fast.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it compiles, so it is set here, explicitly,
    by the caller that owns the process (the worker session or the benchmark), never at import.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return cache_dir


def bucket_size(n: int) -> int:
    """Powers of two up to 8, then multiples of 8: few compiled shapes, under 8 items of padding."""
    if n < 1:
        raise ValueError(f"batch must be positive, got {n}")
    if n <= 8:
        return 1 << (n - 1).bit_length()
    return -(-n // 8) * 8


class ChannelsLast(nn.Module):
    """Feeds ``net`` NHWC-strided input (4-D tensors only); outputs stay in whatever layout it makes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


def _map_outputs(out: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to a tensor output or to each tensor of a tuple/list output."""
    if isinstance(out, Tensor):
        return fn(out)
    return type(out)(fn(t) for t in out)


class BatchBuckets(nn.Module):
    """Pads the batch to ``bucket_size`` and trims the result, so only a few shapes ever run."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Any:
        n = x.shape[0]
        padded_n = bucket_size(n)
        if padded_n == n:
            return self.net(x)
        pad = x[:1].expand(padded_n - n, *x.shape[1:])
        return _map_outputs(self.net(torch.cat([x, pad])), lambda t: t[:n])


class CudaGraphed(nn.Module):
    """Replays a captured CUDA graph of ``net`` per input shape; eager on the CPU.

    The graph reads a static input buffer and writes a static output, so the input is copied in and
    the output cloned out. A graph bakes in the weights' addresses: when the model cache moves the
    weights (eviction and page-in), the graphs are dropped and captured again.
    """

    def __init__(self, net: nn.Module, *, max_graphs: int = MAX_CUDA_GRAPHS, warmup_calls: int = 2) -> None:
        super().__init__()
        self.net = net
        self.max_graphs = max_graphs
        self.warmup_calls = warmup_calls
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Any]] = {}
        self._weights_key: tuple[int, ...] = ()

    def forward(self, x: Tensor) -> Any:
        if x.device.type != "cuda":
            return self.net(x)
        weights_key = tuple(t.data_ptr() for t in (*self.net.parameters(), *self.net.buffers()))
        if weights_key != self._weights_key:
            self._graphs.clear()
            self._weights_key = weights_key
        key = (tuple(x.shape), x.stride(), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return self.net(x)
            entry = self._capture(x)
            self._graphs[key] = entry
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return _map_outputs(static_out, torch.clone)

    def _capture(self, x: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Any]:
        static_in = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static_in.copy_(x)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_calls):  # cuDNN autotuning and lazy compilation, outside the graph
                self.net(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.net(static_in)
        return graph, static_in, static_out


def _rrdb_forward(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> Tensor:
    """One RRDB (three dense blocks + scaled residuals) as a pure function of its 15 convs."""
    out = x
    for r in range(3):
        feats = [out]
        for c in range(4):
            y = F.conv2d(torch.cat(feats, 1), weights[5 * r + c], biases[5 * r + c], padding=1)
            feats.append(F.leaky_relu(y, 0.2))
        x5 = F.conv2d(torch.cat(feats, 1), weights[5 * r + 4], biases[5 * r + 4], padding=1)
        out = x5 * 0.2 + out
    return out * 0.2 + x


def _rrdb_join(feat: Tensor, body: Tensor, net: RRDBNet) -> Tensor:
    """The conv_body residual (as ``RRDBNet.forward``)."""
    return feat + net.conv_body(body)


def _rrdb_upsample(feat: Tensor, net: RRDBNet) -> Tensor:
    """Two nearest x2 upsamples and the output convs (as ``RRDBNet.upsample``), on one row band."""
    feat = F.leaky_relu(net.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
    feat = F.leaky_relu(net.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
    return net.conv_last(F.leaky_relu(net.conv_hr(feat), 0.2))


class CompiledRRDBNet(nn.Module):
    """RRDBNet with one compiled graph shared by all 23 blocks (compile time of one block, not 23).

    The blocks' weights are passed as graph inputs, so Dynamo guards only on shapes and dtypes and
    every block reuses the same kernels; weights moved by the model cache are picked up per call.
    """

    def __init__(self, net: RRDBNet, *, mode: str | None = None, compiled: bool = True) -> None:
        super().__init__()
        self.net = net
        # ``compiled=False`` runs the same functional forward eagerly (tests compare it with RRDBNet).
        self._block = torch.compile(_rrdb_forward, dynamic=False, mode=mode) if compiled else _rrdb_forward
        self._join = torch.compile(_rrdb_join, dynamic=False, mode=mode) if compiled else _rrdb_join
        self._up = torch.compile(_rrdb_upsample, dynamic=False, mode=mode) if compiled else _rrdb_upsample

    def forward(self, x: Tensor) -> Tensor:
        net = self.net
        if net.scale == 2:
            feat = F.pixel_unshuffle(x, 2)
        elif net.scale == 1:
            feat = F.pixel_unshuffle(x, 4)
        else:
            feat = x
        feat = net.conv_first(feat)
        body = feat
        for rrdb in net.body:
            convs = [c for rdb in (rrdb.rdb1, rrdb.rdb2, rrdb.rdb3) for c in _rdb_convs(rdb)]  # type: ignore[arg-type]
            body = self._block(body, [c.weight for c in convs], [c.bias for c in convs])  # type: ignore[misc]
        feat = self._join(feat, body, net)
        return run_in_row_bands(
            lambda band: self._up(band, net),
            feat,
            scale=4,
            band_rows=net.upsample_band_rows,
            halo_rows=UPSAMPLE_HALO_ROWS,
        )


def _rdb_convs(rdb: nn.Module) -> list[nn.Conv2d]:
    return [rdb.conv1, rdb.conv2, rdb.conv3, rdb.conv4, rdb.conv5]  # type: ignore[list-item]


def compile_module(net: nn.Module, *, mode: str | None = None) -> nn.Module:
    """``torch.compile`` for a whole network, with RRDBNet's shared-block special case."""
    if isinstance(net, RRDBNet):
        return CompiledRRDBNet(net, mode=mode)
    return torch.compile(net, dynamic=False, mode=mode)  # type: ignore[return-value]


def accelerate_module(net: nn.Module, options: SpeedOptions) -> nn.Module:
    """Wrap ``net`` (already on its device, eval, no grad) with the levers in ``options``.

    Converts the weights to channels_last and ``options.dtype`` in place, as the wrapped net needs.
    Order, innermost first: compile (or the Triton kernels), channels_last input, CUDA graph, batch buckets.
    """
    if options.dtype is not None:
        net.to(dtype=options.dtype)
    if options.channels_last:
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if options.kernels in ("triton", "triton-tma"):
        if options.compile:
            raise ValueError(f"kernels={options.kernels!r} replaces torch.compile for the SR nets; pick one")
        from worker.models.fast_sr import create_triton_sr  # imports triton: only when asked for

        wrapped: nn.Module = create_triton_sr(net, tma=options.kernels == "triton-tma")
    else:
        wrapped = compile_module(net, mode=options.compile_mode) if options.compile else net
    if options.channels_last:
        wrapped = ChannelsLast(wrapped)
    if options.cuda_graphs:
        wrapped = CudaGraphed(wrapped)
    if options.bucket_batches and (options.compile or options.cuda_graphs):
        wrapped = BatchBuckets(wrapped)
    return wrapped


def accelerate_sr(model: SrModel, options: SpeedOptions | None = None) -> SrModel:
    """The same SR model with faster kernels; ``model.run`` and ``upscale_frames`` work unchanged.

    The returned model shares (and converts in place) ``model``'s weights.
    """
    options = options or SpeedOptions()
    if model.device.type != "cuda":
        options = replace(options, cuda_graphs=False)
    net = accelerate_module(model.net, options)
    return SrModel(
        name=model.name,
        net=net,
        scale=model.scale,
        device=model.device,
        dtype=options.dtype if options.dtype is not None else model.dtype,
    )


def run_in_batches(fn: Callable[[Tensor], Tensor], x: Tensor, batch: int) -> Tensor:
    """``fn`` over ``x`` in slices of ``batch`` items (the last one padded by BatchBuckets if wrapped)."""
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    return torch.cat([fn(x[i : i + batch]) for i in range(0, x.shape[0], batch)])
