"""The SR step's uint8 conversion works in NHWC order (for channels_last nets) with the values the
NCHW-order version gave: the old code is kept here as the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.models.super_res import UINT8_BAND_OUT_ROWS, _to_uint8_nhwc


def nchw_reference(y: torch.Tensor, down: int) -> torch.Tensor:
    """The conversion as it was before it worked in NHWC order."""
    n, c, height, width = y.shape
    out = torch.empty(n, height // down, width // down, c, dtype=torch.uint8)
    band = max(down, UINT8_BAND_OUT_ROWS // down * down)
    for top in range(0, height, band):
        part = y[:, :, top : top + band].float()
        if down > 1:
            part = F.avg_pool2d(part, kernel_size=down)
        row = top // down
        out[:, row : row + part.shape[2]] = part.mul_(255.0).round_().clamp_(0, 255).permute(0, 2, 3, 1)
    return out


@pytest.mark.parametrize("down", [1, 2, 4])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nhwc_conversion_gives_the_nchw_values(
    down: int, layout: torch.memory_format, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(down)
    # 600 rows: two full 256-row bands and a partial one; a little outside [0, 1] to exercise the clamp
    y = (torch.rand(2, 3, 600, 44, generator=gen) * 1.04 - 0.02).to(dtype).contiguous(memory_format=layout)
    ours = _to_uint8_nhwc(y.clone(), down)  # fp32 at down 1 is converted in place
    assert ours.shape == (2, 600 // down, 44 // down, 3) and ours.is_contiguous()
    assert torch.equal(ours, nchw_reference(y.clone(), down))
