"""The Triton 3x3 conv (under Triton's CPU interpreter) equals F.conv2d + its epilogue, and the fast
SR forwards built on it equal the eager nets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

pytest.importorskip(
    "triton", reason="triton is not installed (pip install triton) - the Triton conv is untestable"
)

from worker.models.fast_sr import TritonRRDB, TritonSRVGG, create_triton_sr  # noqa: E402
from worker.models.sr_nets import RRDBNet, SRVGGNetCompact  # noqa: E402
from worker.models.triton_conv import conv3x3, pack_conv3x3, require_triton, tma_ok  # noqa: E402

CL = torch.channels_last
# Both sides see the same rounded inputs and accumulate in fp32: what differs is the output rounding.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's CPU interpreter (read when the kernel is first decorated and at every launch)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_conv(c_in: int, c_out: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in**0.5)
    return weight, torch.randn(c_out, generator=g) * 0.1


def rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def reference(
    x: Tensor, weight: Tensor, bias: Tensor, activation: str, alpha: Tensor | None = None
) -> Tensor:
    """F.conv2d + activation in fp32 on the same rounded inputs and weights the kernel sees."""
    y = F.conv2d(x.float(), weight.to(x.dtype).float(), bias, padding=1)
    if activation == "leaky_relu":
        return F.leaky_relu(y, 0.2)
    if activation == "prelu":
        assert alpha is not None
        return F.prelu(y, alpha)
    return y


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize(
    ("c_in", "c_out", "activation", "dtype", "block"),
    [
        (64, 64, "prelu", torch.float16, (2, 16, 32)),
        (96, 32, "leaky_relu", torch.float16, (4, 16, 64)),  # 96 % 64: a masked channel tail
        (192, 64, "none", torch.bfloat16, (2, 16, 64)),
        (48, 48, "none", torch.float32, (1, 16, 16)),  # C_out 48: padded to 64 columns
        (3, 64, "prelu", torch.float32, None),  # an RGB stem (C_in < BLOCK_K)
        (160, 32, "leaky_relu", torch.bfloat16, (2, 32, 32)),
    ],
)
@pytest.mark.parametrize("tma", [False, True], ids=["pointer-loads", "tma-loads"])
def test_conv_matches_f_conv2d_with_its_activation(
    c_in: int, c_out: int, activation: str, dtype: torch.dtype, block: tuple[int, int, int] | None, tma: bool
) -> None:
    """Both load paths; with ``tma`` the 96- and 48-channel rows take 32/16-channel boxes and the RGB
    stem falls back to pointer loads (``tma_ok``)."""
    n, h, w = 2, 7, 13  # odd sizes: partial tiles and every border
    weight, bias = make_conv(c_in, c_out, seed=c_in + c_out)
    alpha = torch.rand(c_out) * 0.5 if activation == "prelu" else None
    layer = pack_conv3x3(
        weight, bias, activation=activation, negative_slope=0.2, prelu_weight=alpha, dtype=dtype, tma=tma
    )
    x = rand((n, c_in, h, w), dtype, seed=1).contiguous(memory_format=CL)
    out = conv3x3(x, layer, block=block)
    assert out.shape == (n, c_out, h, w) and out.dtype == dtype and out.is_contiguous(memory_format=CL)
    assert_close(out, reference(x, weight, bias, activation, alpha), dtype)


@pytest.mark.parametrize("tma", [False, True], ids=["pointer-loads", "tma-loads"])
def test_conv_reads_and_writes_channel_slices_of_one_buffer(tma: bool) -> None:
    """A dense block's step: read channels 0:96 of a 192-channel buffer, write 96:128, touch nothing else."""
    dtype = torch.float16
    buf = rand((2, 192, 9, 7), dtype, seed=2).contiguous(memory_format=CL)
    before = buf.clone()
    weight, bias = make_conv(96, 32, seed=3)
    layer = pack_conv3x3(weight, bias, activation="leaky_relu", negative_slope=0.2, dtype=dtype, tma=tma)
    assert tma_ok(buf[:, :96], layer)
    conv3x3(buf[:, :96], layer, out=buf[:, 96:128], block=(2, 16, 32))
    assert_close(buf[:, 96:128], reference(before[:, :96], weight, bias, "leaky_relu"), dtype)
    assert torch.equal(buf[:, :96], before[:, :96]) and torch.equal(buf[:, 128:], before[:, 128:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_conv_epilogue_adds_scaled_residuals_from_any_layout(dtype: torch.dtype) -> None:
    """out = scale * conv + residual_scale * residual + residual2 (RRDB's folded rdb3 + outer residual)."""
    n, h, w = 2, 6, 11
    buf = rand((n, 192, h, w), dtype, seed=4).contiguous(memory_format=CL)
    residual2 = rand((n, 64, h, w), dtype, seed=5)  # plain NCHW strides
    out_buf = torch.zeros((n, 192, h, w), dtype=dtype).contiguous(memory_format=CL)
    weight, bias = make_conv(192, 64, seed=6)
    layer = pack_conv3x3(weight, bias, dtype=dtype)
    conv3x3(
        buf,
        layer,
        out=out_buf[:, :64],
        scale=0.04,
        residual=buf[:, :64],
        residual_scale=0.2,
        residual2=residual2,
        block=(2, 16, 64),
    )
    expected = 0.04 * reference(buf, weight, bias, "none") + 0.2 * buf[:, :64].float() + residual2.float()
    assert_close(out_buf[:, :64], expected, dtype)
    assert not out_buf[:, 64:].any()


@pytest.mark.parametrize("out_format", [torch.contiguous_format, CL])
def test_conv_stores_pixel_shuffled_with_the_upsampled_input_added(out_format: torch.memory_format) -> None:
    """SRVGGNetCompact's tail: pixel_shuffle(conv(feat), 4) + nearest-upsampled RGB input, in one store."""
    dtype = torch.float16
    n, h, w = 2, 5, 9
    feat = rand((n, 64, h, w), dtype, seed=7).contiguous(memory_format=CL)
    rgb = rand((n, 3, h, w), dtype, seed=8).contiguous(memory_format=CL)
    weight, bias = make_conv(64, 48, seed=9)
    out = torch.empty((n, 3, 4 * h, 4 * w), dtype=dtype, memory_format=out_format)
    conv3x3(
        feat,
        pack_conv3x3(weight, bias, dtype=dtype),
        out=out,
        residual=rgb,
        pixel_shuffle=4,
        block=(4, 16, 32),
    )
    expected = F.pixel_shuffle(reference(feat, weight, bias, "none"), 4) + F.interpolate(
        rgb.float(), scale_factor=4, mode="nearest"
    )
    assert_close(out, expected, dtype)


def test_conv_rejects_what_it_cannot_read() -> None:
    weight, bias = make_conv(64, 32, seed=10)
    layer = pack_conv3x3(weight, bias, dtype=torch.float16)
    x = rand((1, 64, 5, 5), torch.float16, seed=11)
    with pytest.raises(ValueError, match="channel stride 1"):
        conv3x3(x, layer)  # NCHW-contiguous
    with pytest.raises(ValueError, match="dtype"):
        conv3x3(x.float().contiguous(memory_format=CL), layer)
    with pytest.raises(ValueError, match="out must be"):
        conv3x3(x.contiguous(memory_format=CL), layer, out=torch.empty(1, 64, 5, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match="3, 3"):
        pack_conv3x3(torch.zeros(32, 64, 1, 1), None)
    with pytest.raises(ValueError, match="no Triton forward"):
        create_triton_sr(nn.Conv2d(3, 3, 3))


def test_kernel_refuses_cpu_tensors_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        require_triton(torch.device("cpu"))


def same_layout(a: Tensor, b: Tensor) -> bool:
    return all(
        a.is_contiguous(memory_format=f) == b.is_contiguous(memory_format=f)
        for f in (CL, torch.contiguous_format)
    )


@pytest.mark.parametrize("residual_mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
@pytest.mark.parametrize("tma", [False, True], ids=["pointer-loads", "tma-loads"])
def test_fast_srvgg_equals_the_eager_net(
    residual_mode: str, memory_format: torch.memory_format, tma: bool
) -> None:
    torch.manual_seed(0)
    net = SRVGGNetCompact(num_conv=3, residual_mode=residual_mode).eval()  # type: ignore[arg-type]
    for prelu in net.body:
        if isinstance(prelu, nn.PReLU):  # distinct slopes per channel, some negative values
            nn.init.uniform_(prelu.weight, -0.3, 0.5)
    fast = create_triton_sr(net, tma=tma)
    assert isinstance(fast, TritonSRVGG)
    x = torch.rand(2, 3, 7, 10).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        expected, out = net(x), fast(x)
    assert out.shape == expected.shape == (2, 3, 28, 40) and same_layout(out, expected)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_srvgg_in_half_precision_stays_near_the_fp32_net(dtype: torch.dtype) -> None:
    """The production dtypes: fp16/bf16 weights and activations, fp32 accumulation."""
    torch.manual_seed(0)
    net = SRVGGNetCompact(num_conv=3).eval()
    x = torch.rand(2, 3, 6, 9).contiguous(memory_format=CL)
    with torch.inference_mode():
        expected = net(x)
        out = TritonSRVGG(net.to(dtype))(x.to(dtype))
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out.float(), expected, atol=4 * TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize(
    ("scale", "num_block", "batch", "memory_format", "tma"),
    [(4, 2, 1, torch.contiguous_format, False), (2, 1, 2, CL, False), (4, 1, 1, CL, True)],
)
def test_fast_rrdb_equals_the_eager_net(
    scale: int, num_block: int, batch: int, memory_format: torch.memory_format, tma: bool
) -> None:
    """With ``tma`` every conv but the RGB stem reads through descriptors, the dense blocks' channel
    slices of the shared buffers included."""
    torch.manual_seed(0)
    net = RRDBNet(scale=scale, num_block=num_block).eval()
    net.upsample_band_rows = 4  # the tail (the net's own) in row bands, as in production
    fast = create_triton_sr(net, tma=tma)
    assert isinstance(fast, TritonRRDB)
    x = torch.rand(batch, 3, 8, 12).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        expected, out = net(x), fast(x)
    assert out.shape == expected.shape == (batch, 3, 8 * scale, 12 * scale) and same_layout(out, expected)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_fast_forward_follows_replaced_weights() -> None:
    """Weights swapped after wrapping (a reload, the model cache) are repacked, not served stale."""
    torch.manual_seed(0)
    net = SRVGGNetCompact(num_conv=1).eval()
    fast = TritonSRVGG(net)
    x = torch.rand(1, 3, 5, 6)
    with torch.inference_mode():
        fast(x)
        stem = net.body[0]
        assert isinstance(stem, nn.Conv2d)
        stem.weight = nn.Parameter(stem.weight * 2)
        torch.testing.assert_close(fast(x), net(x), atol=2e-5, rtol=1e-5)
