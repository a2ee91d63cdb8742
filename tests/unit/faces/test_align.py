"""Alignment maths and the paste-back guarantee (untouched pixels stay bit-identical)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.transform import SimilarityTransform

from worker.models.align import (
    ARCFACE_112,
    arcface_template,
    estimate_similarity,
    face_mask,
    paste_back,
    square_mask,
    transfer_colour_lab,
    warp_face,
)


@settings(max_examples=30, deadline=None)
@given(
    scale=st.floats(0.3, 5.0),
    angle=st.floats(-3.0, 3.0),
    tx=st.floats(-500, 500),
    ty=st.floats(-500, 500),
    seed=st.integers(0, 1000),
)
def test_similarity_matches_skimage(scale: float, angle: float, tx: float, ty: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_112 @ (scale * rot).T + [tx, ty] + rng.normal(0, 2, (5, 2))
    ref = SimilarityTransform.from_estimate(src, ARCFACE_112)
    np.testing.assert_allclose(estimate_similarity(src, ARCFACE_112), ref.params[:2], atol=1e-8)


def test_templates_follow_insightface_for_112_and_128() -> None:
    np.testing.assert_allclose(arcface_template(112), ARCFACE_112)
    expected_128 = ARCFACE_112 + [8.0, 0.0]
    np.testing.assert_allclose(arcface_template(128), expected_128)
    np.testing.assert_allclose(arcface_template(256), expected_128 * 2.0)


def test_warp_puts_landmarks_on_the_template() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    lms = ARCFACE_112 * 1.7 + [120.0, 60.0]
    crop, m = warp_face(image, lms, 112)
    assert crop.shape == (112, 112, 3)
    mapped = np.c_[lms, np.ones(5)] @ m.T
    np.testing.assert_allclose(mapped, ARCFACE_112, atol=1e-6)


def test_masks_are_zero_on_the_crop_border_and_one_in_the_middle() -> None:
    for mask in (face_mask(112), face_mask(256), square_mask(128)):
        assert mask.dtype == np.float32
        assert mask[0].max() == 0 and mask[-1].max() == 0 and mask[:, 0].max() == 0 and mask[:, -1].max() == 0
        c = mask.shape[0] // 2
        assert mask[c, c] > 0.99


def test_paste_back_leaves_pixels_outside_the_mask_bit_identical() -> None:
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 255, (200, 260, 3), dtype=np.uint8)
    lms = ARCFACE_112 * 0.9 + [150.0, 90.0]  # partly outside the frame on the right/bottom
    _, m = warp_face(frame, lms, 112)
    crop = np.full((112, 112, 3), 255, dtype=np.uint8)
    out, mask = paste_back(frame, crop, face_mask(112), m)
    assert mask.shape == frame.shape[:2] and mask.dtype == np.float32
    assert 0.0 <= mask.min() and mask.max() <= 1.0
    untouched = mask == 0
    assert untouched.any() and (~untouched).any()
    assert np.array_equal(out[untouched], frame[untouched])
    assert not np.array_equal(out[~untouched], frame[~untouched])


def test_paste_back_with_poisson_still_respects_the_mask() -> None:
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)
    lms = ARCFACE_112 + [40.0, 40.0]
    _, m = warp_face(frame, lms, 112)
    crop = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    out, mask = paste_back(frame, crop, face_mask(112), m, poisson=True)
    assert np.array_equal(out[mask == 0], frame[mask == 0])


def test_colour_transfer_moves_the_source_mean_to_the_target_mean() -> None:
    mask = face_mask(112)
    source = np.full((112, 112, 3), (200, 120, 90), dtype=np.uint8)
    source = np.clip(source + np.random.default_rng(3).normal(0, 10, source.shape), 0, 255).astype(np.uint8)
    target = np.full((112, 112, 3), (90, 110, 160), dtype=np.uint8)
    out = transfer_colour_lab(source, target, mask)
    inside = mask > 0.5
    assert np.abs(out[inside].mean(axis=0) - target[inside].mean(axis=0)).max() < 6
