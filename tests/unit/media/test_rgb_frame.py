"""The encoder's GIL-free RGB frame fill gives the same frame as PyAV's own ``from_ndarray``."""

from __future__ import annotations

import av
import numpy as np
import pytest

from worker.frames.encode import rgb_frame


@pytest.mark.parametrize("shape", [(24, 38), (64, 64), (2, 2), (10, 1002)])
def test_rgb_frame_matches_from_ndarray_whatever_the_line_padding(shape: tuple[int, int]) -> None:
    rgb = np.random.default_rng(7).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = rgb_frame(rgb)
    theirs = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    assert (ours.width, ours.height, ours.format.name) == (shape[1], shape[0], "rgb24")
    assert np.array_equal(ours.to_ndarray(), rgb)
    assert np.array_equal(
        ours.reformat(format="yuv420p").to_ndarray(), theirs.reformat(format="yuv420p").to_ndarray()
    )


def test_rgb_frame_copies_a_strided_view() -> None:
    rgb = np.random.default_rng(8).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    view = rgb[::2, 5:55]
    assert np.array_equal(rgb_frame(view).to_ndarray(), view)


@pytest.mark.parametrize("shape", [(23, 37), (1, 1), (9, 1001)])
def test_rgb_frame_keeps_odd_sizes(shape: tuple[int, int]) -> None:
    rgb = np.random.default_rng(9).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert np.array_equal(rgb_frame(rgb).to_ndarray(), rgb)
