"""A Triton implicit-GEMM 3x3 convolution (stride 1, pad 1) for NHWC tensors, with fused epilogues.

Why: our SR nets' 64-channel convs move as many bytes through a separate activation pass as through
the conv itself, and RRDB's dense blocks pay for ``torch.cat`` copies. This kernel writes the conv's
output once, with bias, activation (leaky ReLU or per-channel PReLU), scaled residuals and an
optional pixel-shuffle store already applied, and reads/writes channel slices of larger buffers, so a
dense block grows its features in one preallocated buffer with no concatenation.

Tensors are logical NCHW in channels_last memory (what ``.contiguous(memory_format=channels_last)``
gives, and what a channel slice ``buf[:, a:b]`` of such a buffer still is): the input needs channel
stride 1; outputs and residuals may have any strides. A program owns a BLOCK_H x BLOCK_W tile of
output pixels times all output channels and loops over 9 taps x C_in in BLOCK_K chunks, accumulating
in fp32 with ``tl.dot``. Runs on CUDA, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``
set before the first call), where the dot's operands go to fp32.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

try:  # optional: the CPU venv has no triton; callers get a clear error from ``require_triton``
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

ACTIVATIONS = {"none": 0, "leaky_relu": 1, "prelu": 2}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (BLOCK_H, BLOCK_W, BLOCK_K, num_warps, num_stages) tried by the autotuner on the GPU: the configs
# within 3% of the best of 37 on the SR nets' layer shapes on an H200 (bench/conv_sweep.py,
# bench/RESULTS.md; no config beat the autotuner's old pick by more than 4%), plus BLOCK_K 32 ones for
# C_in 96 and 160. Configs whose BLOCK_K does not divide C_in are pruned, and so are tiles much wider
# than the image; see _prune_configs.
TUNE_CONFIGS = (
    (1, 128, 64, 4, 3),
    (1, 128, 64, 8, 3),
    (4, 32, 64, 4, 3),
    (2, 64, 64, 4, 3),
    (2, 128, 64, 8, 3),
    (4, 64, 64, 8, 3),
    (8, 16, 64, 4, 3),
    (1, 128, 32, 4, 4),
    (2, 128, 32, 8, 4),
    (4, 64, 32, 8, 4),
)
# One fixed (BLOCK_H, BLOCK_W, BLOCK_K) under the interpreter (and for ``block=None`` there): small
# tiles keep the numpy emulation fast on test-sized tensors.
INTERPRET_BLOCK = (16, 16, 128)


def interpreter_on() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def require_triton(device: torch.device) -> None:
    """Raise a RuntimeError saying what is missing when the kernel cannot run on ``device``."""
    if triton is None:
        raise RuntimeError(
            "the Triton conv needs the `triton` package (pip install triton); it is not importable"
        )
    if not interpreter_on() and device.type != "cuda":
        raise RuntimeError(
            f"the Triton conv runs on CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing "
            "triton to run it on the CPU interpreter (tests only: it is slow)"
        )


@dataclass(frozen=True)
class PackedConv3x3:
    """A 3x3 conv + bias + activation with weights in the kernel's layout, packed once.

    ``weight`` is (9 * c_in, n_pad), K-major: row ``tap * c_in + ci`` (tap = kh * 3 + kw) holds the
    weights of input channel ``ci`` at that tap for every output channel, zero-padded to ``n_pad``
    (a power of two >= 16, as ``tl.dot`` needs). ``bias`` and ``alpha`` (PReLU slopes) are fp32.
    """

    weight: Tensor
    bias: Tensor
    alpha: Tensor | None
    c_in: int
    c_out: int
    activation: str
    negative_slope: float
    tma: bool = False  # load tiles through Hopper's tensor memory accelerator where the layout allows

    @property
    def n_pad(self) -> int:
        """Output channels as the kernel computes them (padded)."""
        return int(self.weight.shape[1])


def pack_conv3x3(
    weight: Tensor,
    bias: Tensor | None,
    *,
    activation: str = "none",
    negative_slope: float = 0.01,
    prelu_weight: Tensor | None = None,
    dtype: torch.dtype | None = None,
    tma: bool = False,
) -> PackedConv3x3:
    """Pack an ``nn.Conv2d``'s (C_out, C_in, 3, 3) weight and bias (plus its activation) for ``conv3x3``.

    ``dtype`` is the compute dtype of the inputs it will see (default: the weight's). ``tma``: load the
    input and weight tiles through tensor descriptors (TMA on Hopper; zero padding at the image edge
    comes from the descriptor, so no per-pixel address or mask arithmetic), where ``tma_ok`` allows.
    """
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"expected a (C_out, C_in, 3, 3) weight, got {tuple(weight.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if (activation == "prelu") != (prelu_weight is not None):
        raise ValueError("prelu_weight is needed with (and only with) activation='prelu'")
    c_out, c_in = int(weight.shape[0]), int(weight.shape[1])
    n_pad = max(16, 1 << (c_out - 1).bit_length())
    dtype = dtype or weight.dtype
    with torch.no_grad():
        packed = torch.zeros((9 * c_in, n_pad), dtype=dtype, device=weight.device)
        packed[:, :c_out] = weight.detach().permute(2, 3, 1, 0).reshape(9 * c_in, c_out).to(dtype)
        bias_pad = torch.zeros(n_pad, dtype=torch.float32, device=weight.device)
        if bias is not None:
            bias_pad[:c_out] = bias.detach().float()
        alpha = None
        if prelu_weight is not None:
            if prelu_weight.numel() not in (1, c_out):
                raise ValueError(f"prelu_weight has {prelu_weight.numel()} slopes for {c_out} channels")
            alpha = torch.zeros(n_pad, dtype=torch.float32, device=weight.device)
            alpha[:c_out] = prelu_weight.detach().float().reshape(-1).expand(c_out)
    return PackedConv3x3(packed, bias_pad, alpha, c_in, c_out, activation, float(negative_slope), tma)


def conv3x3(
    x: Tensor,
    layer: PackedConv3x3,
    *,
    out: Tensor | None = None,
    scale: float = 1.0,
    residual: Tensor | None = None,
    residual_scale: float = 1.0,
    residual2: Tensor | None = None,
    pixel_shuffle: int = 1,
    block: tuple[int, ...] | None = None,
) -> Tensor:
    """``out = scale * act(conv(x) + bias) + residual_scale * residual + residual2``, in one kernel.

    ``x`` is (N, C_in, H, W) with channel stride 1 (channels_last, or a channel slice of such a
    buffer). ``out`` (allocated channels_last when None) and the residuals may be any strided views.
    With ``pixel_shuffle=r`` the result is stored pixel-shuffled, as ``F.pixel_shuffle(y, r)``, into
    an (N, C_out / r^2, r*H, r*W) ``out``; the residuals are then (N, C_out / r^2, H, W) and added
    to every one of their r x r output pixels (a nearest upsample). ``block`` = (BLOCK_H, BLOCK_W,
    BLOCK_K), powers of two, optionally followed by (num_warps, num_stages), skips the autotuner. ``out`` must not overlap the input or the residuals:
    programs would race, and the autotuner reruns the kernel on the same tensors.
    """
    require_triton(x.device)
    if x.dim() != 4 or x.shape[1] != layer.c_in:
        raise ValueError(f"expected (N, {layer.c_in}, H, W) input, got {tuple(x.shape)}")
    if x.dtype not in DTYPES or x.dtype != layer.weight.dtype or x.device != layer.weight.device:
        raise ValueError(
            f"input ({x.dtype}, {x.device}) must match the packed weights' dtype and device "
            f"({layer.weight.dtype}, {layer.weight.device})"
        )
    if x.stride(1) != 1:
        raise ValueError("the input needs channel stride 1 (channels_last memory or a channel slice of it)")
    n, _, h, w = x.shape
    r = int(pixel_shuffle)
    if r < 1 or layer.c_out % (r * r):
        raise ValueError(f"pixel_shuffle={r} does not divide {layer.c_out} output channels")
    out_shape = (n, layer.c_out // (r * r), h * r, w * r)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    elif tuple(out.shape) != out_shape:
        raise ValueError(f"out must be {out_shape}, got {tuple(out.shape)}")
    res_shape = (n, layer.c_out // (r * r), h, w)
    for name, t in (("residual", residual), ("residual2", residual2)):
        if t is not None and tuple(t.shape) != res_shape:
            raise ValueError(f"{name} must be {res_shape}, got {tuple(t.shape)}")
    if n * h * w == 0:
        return out

    res = residual if residual is not None else out
    res2 = residual2 if residual2 is not None else out
    use_tma = layer.tma and tma_ok(x, layer)
    x_desc: Any = x
    w_desc: Any = layer.weight
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        nhwc = x.permute(0, 2, 3, 1)  # (N, H, W, C) view of channels_last memory, channel stride 1
        # ``_set_tma_blocks`` gives both descriptors the block shapes of the config that runs
        x_desc = TensorDescriptor(nhwc, list(nhwc.shape), list(nhwc.stride()), [1, 1, 16, 16])
        w_desc = TensorDescriptor.from_tensor(layer.weight, [16, layer.n_pad])
    args: list[Any] = [
        x, x_desc, layer.weight, w_desc, layer.bias, layer.alpha if layer.alpha is not None else layer.bias,
        res, res2, out,
        h, w,
        x.stride(0), x.stride(2), x.stride(3),
        *_strides(res), *_strides(res2), *_strides(out),
        layer.negative_slope, float(scale), float(residual_scale),
    ]  # fmt: skip
    meta: dict[str, Any] = dict(
        C_IN=layer.c_in,
        C_OUT=layer.c_out,
        N_PAD=layer.n_pad,
        ACT=ACTIVATIONS[layer.activation],
        HAS_RES=residual is not None,
        HAS_RES2=residual2 is not None,
        SHUFFLE=r,
        DOT_FP32=interpreter_on(),
        TMA=use_tma,
    )
    plain, tuned = _kernels(interpreter_on())
    if block is None and interpreter_on():
        block = INTERPRET_BLOCK

    def grid(m: dict[str, Any]) -> tuple[int]:
        return (n * triton.cdiv(h, m["BLOCK_H"]) * triton.cdiv(w, m["BLOCK_W"]),)

    if block is None:
        tuned[grid](*args, **meta)
    else:
        if len(block) not in (3, 5):
            raise ValueError(f"block is (BLOCK_H, BLOCK_W, BLOCK_K[, num_warps, num_stages]), got {block}")
        block_h, block_w, block_k = block[:3]
        num_warps, num_stages = block[3:] if len(block) == 5 else (4, 3)
        if block_k < 16 or block_h * block_w < 16:
            raise ValueError(f"tl.dot needs 16+ pixels and 16+ channels a block, got {block}")
        if use_tma and layer.c_in % block_k:  # descriptor boxes take whole channel chunks
            block_k = 16 * math.gcd(layer.c_in // 16, block_k // 16)
        meta.update(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_K=block_k)
        if use_tma:
            _set_tma_blocks({"x_desc": x_desc, "w_desc": w_desc, **meta})
        plain[grid](*args, **meta, num_warps=num_warps, num_stages=num_stages)
    return out


def tma_ok(x: Tensor, layer: PackedConv3x3) -> bool:
    """Whether ``x`` can be read through a tensor descriptor: 16-channel chunks (``tl.dot``'s K), a
    16-byte-aligned base and 16-byte pixel and row strides (TMA's rules). An RGB stem (3 channels) or an
    odd channel slice takes the pointer loads instead."""
    size = x.element_size()
    return (
        layer.c_in % 16 == 0
        and x.data_ptr() % 16 == 0
        and all((stride * size) % 16 == 0 for stride in (x.stride(0), x.stride(2), x.stride(3)))
    )


def _set_tma_blocks(nargs: dict[str, Any]) -> None:
    """Give the descriptors the block shapes of the config about to run (an autotuner pre-hook)."""
    if not nargs.get("TMA"):
        return
    nargs["x_desc"].block_shape = [1, nargs["BLOCK_H"], nargs["BLOCK_W"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_K"], nargs["w_desc"].shape[1]]


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    s = t.stride()
    return s[0], s[1], s[2], s[3]


def _conv3x3_kernel(
    x_ptr, x_desc, w_ptr, w_desc, b_ptr, a_ptr, r_ptr, r2_ptr, y_ptr,
    H, W,
    sxn, sxh, sxw,
    srn, src, srh, srw,
    sqn, sqc, sqh, sqw,
    syn, syc, syh, syw,
    slope, scale, res_scale,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, N_PAD: tl.constexpr,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_RES2: tl.constexpr, SHUFFLE: tl.constexpr,
    DOT_FP32: tl.constexpr, TMA: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Implicit GEMM: (BLOCK_H x BLOCK_W pixels, 9*C_IN) @ (9*C_IN, N_PAD), in one flat loop (pipelined).

    With TMA the tiles come through tensor descriptors: the input's (1, BLOCK_H, BLOCK_W, BLOCK_K) box at
    the tap's shifted corner (zero-filled past the image edge) and the weights' (BLOCK_K, N_PAD) rows."""
    pid = tl.program_id(0)
    tiles_w = (W + BLOCK_W - 1) // BLOCK_W
    tiles_h = (H + BLOCK_H - 1) // BLOCK_H
    tile_w = pid % tiles_w
    tile_h = (pid // tiles_w) % tiles_h
    n = pid // (tiles_w * tiles_h)
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    h = tile_h * BLOCK_H + p // BLOCK_W
    w = tile_w * BLOCK_W + p % BLOCK_W
    pix_ok = (h < H) & (w < W)
    # int64: a (4, 192, 1080, 1920) buffer is 1.6e9 elements, near int32's limit
    x_base = n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    kk = tl.arange(0, BLOCK_K)
    co = tl.arange(0, N_PAD)
    # tl.full, not tl.zeros: the interpreter runs triton's jit-library helpers (tl.zeros, tl.cdiv) only
    # when TRITON_INTERPRET was set before triton was imported; builtins work either way.
    acc = tl.full((BLOCK_H * BLOCK_W, N_PAD), 0.0, tl.float32)
    # Order (kernel row, channel chunk, kernel column): the three column taps read the same input
    # lines shifted by one pixel back to back, so they hit in L1 (".ca") instead of L2.
    for it in range(0, 9 * ((C_IN + BLOCK_K - 1) // BLOCK_K)):
        dw = it % 3 - 1
        chunk = (it // 3) % ((C_IN + BLOCK_K - 1) // BLOCK_K)
        dh = it // (3 * ((C_IN + BLOCK_K - 1) // BLOCK_K)) - 1
        tap = (dh + 1) * 3 + dw + 1
        if TMA:  # C_IN % BLOCK_K == 0 here (``conv3x3`` and the pruner see to it)
            box = x_desc.load([n, tile_h * BLOCK_H + dh, tile_w * BLOCK_W + dw, chunk * BLOCK_K])
            a = tl.reshape(box, [BLOCK_H * BLOCK_W, BLOCK_K])
            b = w_desc.load([tap * C_IN + chunk * BLOCK_K, 0])
        else:
            ci = chunk * BLOCK_K + kk
            ok = pix_ok & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
            a_ptrs = x_ptr + (x_base + (dh * sxh + dw * sxw))[:, None] + ci[None, :]
            b_ptrs = w_ptr + (tap * C_IN + ci)[:, None] * N_PAD + co[None, :]
            if C_IN % BLOCK_K == 0:
                a = tl.load(a_ptrs, mask=ok[:, None], other=0.0, cache_modifier=".ca")
                b = tl.load(b_ptrs)
            else:
                ci_ok = ci < C_IN
                a = tl.load(a_ptrs, mask=ok[:, None] & ci_ok[None, :], other=0.0, cache_modifier=".ca")
                b = tl.load(b_ptrs, mask=ci_ok[:, None], other=0.0)
        if DOT_FP32:  # the interpreter's numpy has no bf16 matmul
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)

    v = acc + tl.load(b_ptr + co)[None, :]
    if ACT == 1:
        v = tl.where(v >= 0, v, v * slope)
    if ACT == 2:
        v = tl.where(v >= 0, v, v * tl.load(a_ptr + co)[None, :])
    v = v * scale
    # SHUFFLE = r stores channel co at sub-pixel (i, j) of channel co // r^2, as F.pixel_shuffle does
    oc = co // (SHUFFLE * SHUFFLE)
    sub_i = (co // SHUFFLE) % SHUFFLE
    sub_j = co % SHUFFLE
    mask = pix_ok[:, None] & (co < C_OUT)[None, :]
    n64 = n.to(tl.int64)
    h64 = h.to(tl.int64)[:, None]
    w64 = w.to(tl.int64)[:, None]
    oc64 = oc.to(tl.int64)[None, :]
    if HAS_RES:
        res = tl.load(r_ptr + (n64 * srn + oc64 * src + h64 * srh + w64 * srw), mask=mask, other=0.0)
        v += res.to(tl.float32) * res_scale
    if HAS_RES2:
        res2 = tl.load(r2_ptr + (n64 * sqn + oc64 * sqc + h64 * sqh + w64 * sqw), mask=mask, other=0.0)
        v += res2.to(tl.float32)
    y_off = (
        n64 * syn
        + oc64 * syc
        + (h64 * SHUFFLE + sub_i[None, :]) * syh
        + (w64 * SHUFFLE + sub_j[None, :]) * syw
    )
    tl.store(y_ptr + y_off, v.to(y_ptr.dtype.element_ty), mask=mask)


def _prune_configs(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Keep configs whose BLOCK_K divides C_IN (no masked channel tail; other C_IN, such as an RGB
    stem's 3, get BLOCK_K 16) and whose tiles are not much wider than the image."""
    c_in = int(kwargs.get("C_IN", named_args.get("C_IN", 1)))
    width = int(kwargs.get("W", named_args.get("W", 1)))
    kept = [c for c in configs if c_in % c.kwargs["BLOCK_K"] == 0]
    if not kept:
        block_k = 32 if c_in % 32 == 0 else 16
        shapes = {(c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"], c.num_warps, c.num_stages) for c in configs}
        kept = [
            triton.Config(
                {"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_K": block_k},
                num_warps=nw,
                num_stages=ns,
                pre_hook=_set_tma_blocks,
            )
            for bh, bw, nw, ns in sorted(shapes)
        ]
    narrowest = min(c.kwargs["BLOCK_W"] for c in kept)
    limit = max(narrowest, 32, triton.next_power_of_2(width))
    return [c for c in kept if c.kwargs["BLOCK_W"] <= limit]


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """The jitted kernel and its autotuned twin, built on first use (``triton.jit`` reads
    TRITON_INTERPRET when it decorates, so this is keyed on it)."""
    plain = triton.jit(_conv3x3_kernel)
    configs = [
        triton.Config(
            {"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_K": bk},
            num_warps=nw,
            num_stages=ns,
            pre_hook=_set_tma_blocks,
        )
        for bh, bw, bk, nw, ns in TUNE_CONFIGS
    ]
    # cache_results: the timings go to Triton's cache folder with the compiled kernels, so only the first
    # process on a machine tunes (~20 s at its first chunk); later workers start at once
    cached = (
        {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    )
    tuned = triton.autotune(
        configs=configs,
        key=["C_IN", "C_OUT", "W", "TMA"],
        prune_configs_by={"early_config_prune": _prune_configs},
        **cached,
    )(plain)
    return plain, tuned
