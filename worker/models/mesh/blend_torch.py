"""Torch twins of the mesh swapper's cv2 image operations, so the per-face work can stay on the GPU.

Each function mirrors one cv2 call of the CPU path (same kernel sizes, border rules, colour formulas,
rounding), so both paths give the same picture within a grey level or two. Per-face scalars and small
host arrays go up through ``upload`` (pinned, non-blocking on CUDA) so issuing a face never waits on
the GPU.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

Border = Literal["replicate", "reflect101", "constant"]

# cv2's float RGB<->Lab constants (colour_lab.cpp): sRGB D65 matrices and the white point.
_D65 = np.array([0.950456, 1.0, 1.088754])
_RGB2XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_XYZ2RGB = np.array(
    [[3.240479, -1.53715, -0.498535], [-0.969256, 1.875991, 0.041556], [0.055648, -0.204043, 1.057311]]
)
_LAB_T = 0.008856
_LAB_A = 16.0 / 116.0


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without a stream sync (a pageable CUDA copy would wait for the GPU)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def gaussian_taps(sigma_px: float) -> np.ndarray:
    """cv2.GaussianBlur's float32 kernel for ``ksize=(0,0)``: 4 sigma each side, odd length."""
    ksize = int(round(sigma_px * 4 * 2 + 1)) | 1
    return cv2.getGaussianKernel(ksize, sigma_px, cv2.CV_32F).ravel()


def _border_index(n: int, radius: int, border: Border, device: torch.device) -> torch.Tensor:
    """Source index of every padded position along one axis (cv2 border rules, any radius)."""
    idx = torch.arange(-radius, n + radius, device=device)
    if border == "replicate" or n == 1:
        return idx.clamp(0, n - 1)
    period = 2 * (n - 1)
    m = torch.remainder(idx, period)
    return torch.where(m >= n, period - m, m)


def _blur_axis(x: torch.Tensor, taps: torch.Tensor, radius: int, border: Border, dim: int) -> torch.Tensor:
    """1-D convolution of (C,H,W) ``x`` along ``dim`` (1 rows, 2 columns) with padded borders."""
    n = x.shape[dim]
    if border == "constant":
        pad = (0, 0, radius, radius) if dim == 1 else (radius, radius, 0, 0)
        padded = F.pad(x, pad)
    else:
        padded = x.index_select(dim, _border_index(n, radius, border, x.device))
    weight = taps.view(1, 1, -1, 1) if dim == 1 else taps.view(1, 1, 1, -1)
    return F.conv2d(padded.unsqueeze(1), weight).squeeze(1)


def gaussian_blur(x: torch.Tensor, sigma_px: float, border: Border) -> torch.Tensor:
    """cv2.GaussianBlur(x, (0,0), sigma) of a (C,H,W) or (H,W) float32 tensor, separable."""
    flat = x.unsqueeze(0) if x.dim() == 2 else x
    taps_np = gaussian_taps(sigma_px)
    radius = len(taps_np) // 2
    if radius == 0:
        return x.clone()
    taps = upload(taps_np, x.device)
    out = _blur_axis(_blur_axis(flat, taps, radius, border, 2), taps, radius, border, 1)
    return out.squeeze(0) if x.dim() == 2 else out


def _srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055).clamp(min=0) ** 2.4)


def _linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.0031308, 12.92 * c, 1.055 * c.clamp(min=0) ** (1.0 / 2.4) - 0.055)


def _matrix(m: np.ndarray, device: torch.device) -> torch.Tensor:
    return upload(m.astype(np.float32), device)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """cv2.cvtColor(rgb, COLOR_RGB2LAB) for float32 (3,H,W) in [0,1]: L in [0,100]."""
    lin = _srgb_to_linear(rgb.clamp(0.0, 1.0))
    xyz = torch.einsum("ij,jhw->ihw", _matrix(_RGB2XYZ / _D65[:, None], rgb.device), lin)
    f = torch.where(xyz > _LAB_T, xyz.clamp(min=0) ** (1.0 / 3.0), 7.787 * xyz + _LAB_A)
    y = xyz[1]
    lum = torch.where(y > _LAB_T, 116.0 * f[1] - 16.0, 903.3 * y)
    return torch.stack([lum, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])])


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """cv2.cvtColor(lab, COLOR_LAB2RGB) for float32 (3,H,W): RGB in [0,1]."""
    lum, a, b = lab[0], lab[1], lab[2]
    low = lum <= _LAB_T * 903.3
    fy = torch.where(low, 7.787 * (lum / 903.3) + _LAB_A, (lum + 16.0) / 116.0)
    y = torch.where(low, lum / 903.3, fy**3)
    fxz = torch.stack([fy + a / 500.0, fy - b / 200.0])
    xz = torch.where(fxz <= 7.787 * _LAB_T + _LAB_A, (fxz - _LAB_A) / 7.787, fxz**3)
    xyz = torch.stack([xz[0], y, xz[1]])
    lin = torch.einsum("ij,jhw->ihw", _matrix(_XYZ2RGB * _D65[None, :], lab.device), xyz)
    return _linear_to_srgb(lin.clamp(0.0, 1.0))


def round_u8(x: torch.Tensor) -> torch.Tensor:
    """``np.clip(x + 0.5, 0, 255).astype(uint8)`` kept as float: the CPU path's rounding to grey levels."""
    return torch.floor((x + 0.5).clamp(0.0, 255.0))


def _masked_blur(values: torch.Tensor, weight_blur: torch.Tensor, weight: torch.Tensor, sigma_px: float):
    v = gaussian_blur(values * weight, sigma_px, "replicate")
    return v / weight_blur.clamp(min=1e-4)


def match_colour(
    warped: torch.Tensor, target: torch.Tensor, region: torch.Tensor, sigma_px: float
) -> torch.Tensor:
    """Torch twin of ``swapper.match_colour`` on (3,H,W) grey-level tensors; no host sync."""
    w = (region > 0.5).to(torch.float32)
    count = w.sum()
    n = count.clamp(min=1.0)
    src = rgb_to_lab(warped / 255.0)
    tgt = rgb_to_lab(target / 255.0)
    src_mean = (src[0] * w).sum() / n
    tgt_mean = (tgt[0] * w).sum() / n
    src_std = torch.sqrt((((src[0] - src_mean) ** 2) * w).sum() / n)
    tgt_std = torch.sqrt((((tgt[0] - tgt_mean) ** 2) * w).sum() / n)
    ratio = (tgt_std / src_std.clamp(min=1e-3)).clamp(0.5, 2.0)
    lum = ((src[0] - src_mean) * ratio + tgt_mean).clamp(0.0, 100.0)
    w_blur = gaussian_blur(w, sigma_px, "replicate")
    src_low = _masked_blur(src[1:], w_blur, w, sigma_px)
    tgt_low = _masked_blur(tgt[1:], w_blur, w, sigma_px)
    chroma = tgt_low + (src[1:] - src_low)
    rgb = round_u8(lab_to_rgb(torch.cat([lum[None], chroma])) * 255.0)
    return torch.where(count >= 16, rgb, warped)


def feather_inside(mask: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Torch twin of ``swapper.feather_inside``: 0 on the edge, smooth ramp to 1 inside."""
    blurred = gaussian_blur(mask, max(sigma_px, 0.5), "constant")
    ramp = ((blurred - 0.5) * 2.0).clamp(0.0, 1.0)
    return ramp * ramp * (3.0 - 2.0 * ramp)


@lru_cache(maxsize=256)
def ellipse_half_widths(radius: int) -> tuple[int, ...]:
    """Per row of cv2's MORPH_ELLIPSE (2r+1)^2 kernel, the half width of its (centred) run; -1 empty."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    widths = []
    for row in kernel:
        cols = np.nonzero(row)[0]
        widths.append(-1 if len(cols) == 0 else int(radius - cols[0]))
    return tuple(widths)


def dilate_ellipse(x: torch.Tensor, radius: int) -> torch.Tensor:
    """cv2.dilate of a non-negative (H,W) map with cv2's elliptic kernel of ``radius``.

    Each kernel row is a centred run, so the dilation is a max over rows of horizontal max-pools.
    """
    widths = ellipse_half_widths(radius)
    h = x.shape[0]
    pooled: dict[int, torch.Tensor] = {}
    for width in sorted(set(widths) - {-1}):
        p = F.max_pool2d(x[None, None], (1, 2 * width + 1), stride=1, padding=(0, width))[0, 0]
        pooled[width] = F.pad(p, (0, 0, radius, radius))
    rows = [pooled[width][dy : dy + h] for dy, width in enumerate(widths) if width >= 0]
    return torch.stack(rows).amax(dim=0)
