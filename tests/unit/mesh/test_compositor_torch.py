"""The torch compositor (the CUDA path, run here on the CPU) gives the cv2 path's picture.

On CUDA the mesh swapper warps, masks, colour-matches and blends on the device; CI has no GPU, so the
same code runs here on the CPU device and is held to the cv2 path face by face.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from worker.models.mesh import blend_torch
from worker.models.mesh.raster_torch import fill_from_nearest, rasterise
from worker.models.mesh.swapper import MeshSwapper
from worker.models.mesh.warp import rasterise_mesh

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def both_paths(mesh_store, source_tom, swap_clip):
    """The clip swapped through the cv2 and the torch compositor, from the same tracked meshes."""
    image, face = source_tom
    frames, _, faces = swap_clip
    cv2_path = MeshSwapper(image, face, mesh_store, "cpu", compositor="cv2")
    torch_path = MeshSwapper(image, face, mesh_store, "cpu", compositor="torch")
    meshes = cv2_path.track_batch(frames, faces)
    return (
        cv2_path.blend_batch(frames, faces, meshes),
        torch_path.blend_batch(frames, faces, meshes),
        meshes,
        torch_path,
    )


def test_torch_compositor_matches_cv2_on_every_face(swap_clip, both_paths):
    frames, labels, faces = swap_clip
    reference, candidate, _, _ = both_paths
    compared = 0
    for frame, ref, out, label in zip(frames, reference, candidate, labels, strict=True):
        assert out.paths == ref.paths, label
        assert np.abs(out.mask - ref.mask).max() < 0.02, label
        touched = (ref.mask > 0) | (out.mask > 0)
        assert np.array_equal(out.frame[~touched], frame[~touched]), label
        if not touched.any():
            assert np.array_equal(out.frame, frame), label
            continue
        ys, xs = np.nonzero(touched)
        window = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        diff = np.abs(out.frame[window].astype(int) - ref.frame[window].astype(int))
        assert diff.mean() < 1.0 and np.percentile(diff, 99) < 4, (label, diff.mean(), diff.max())
        compared += 1
    assert compared >= 14


def test_gpu_rasteriser_paints_exactly_the_pixels_cv2_paints(swap_clip, both_paths):
    """Triangle ids per pixel equal cv2.fillConvexPoly's far-to-near fill on every real mesh; the jump
    flood fills the holes like cv2's distance transform (up to its ties)."""
    frames, labels, _ = swap_clip
    _, _, meshes, swapper = both_paths
    tris = swapper.topology.triangles
    checked = 0
    for frame, frame_meshes, label in zip(frames, meshes, labels, strict=True):
        for pts in frame_meshes:
            if pts is None:
                continue
            x0, y0, x1, y1 = swapper._plan(frame.shape[:2], pts).window
            shape = (y1 - y0, x1 - x0)
            ref = rasterise_mesh(pts, tris, (x0, y0), shape)
            tri_map = rasterise(pts, tris, (x0, y0), shape, CPU)
            assert np.array_equal(tri_map.numpy(), ref.tri_map), label
            filled = fill_from_nearest(tri_map).numpy()
            assert (filled >= 0).all(), label
            assert np.mean(filled == ref.filled) > 0.97, label
            checked += 1
    assert checked >= 14


@pytest.mark.parametrize(
    ("border", "cv2_border"),
    [
        ("replicate", cv2.BORDER_REPLICATE),
        ("constant", cv2.BORDER_CONSTANT),
        ("reflect101", cv2.BORDER_REFLECT_101),
    ],
)
def test_gaussian_blur_equals_cv2_for_every_border(border, cv2_border):
    image = np.random.default_rng(0).uniform(0, 1, (37, 53, 3)).astype(np.float32)
    for sigma in (0.3, 2.5, 9.0, 40.0):  # 40: kernel wider than the image
        ref = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, borderType=cv2_border)
        out = blend_torch.gaussian_blur(torch.from_numpy(image).permute(2, 0, 1), sigma, border)
        assert np.abs(out.permute(1, 2, 0).numpy() - ref).max() < 1e-5, sigma


def test_lab_round_trip_follows_cv2():
    rgb = np.random.default_rng(1).uniform(0, 1, (31, 29, 3)).astype(np.float32)
    lab_ref = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    lab = blend_torch.rgb_to_lab(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    assert np.abs(lab - lab_ref).max() < 0.5  # cv2 quantises dark chroma; grey levels agree (below)
    back = blend_torch.lab_to_rgb(torch.from_numpy(lab_ref).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    assert np.abs(back - cv2.cvtColor(lab_ref, cv2.COLOR_LAB2RGB)).max() * 255 < 0.05


def test_elliptic_dilation_equals_cv2():
    rng = np.random.default_rng(2)
    mask = ((rng.uniform(0, 1, (40, 50)) > 0.97) * rng.uniform(0.2, 1.0, (40, 50))).astype(np.float32)
    for radius in (1, 4, 11):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        out = blend_torch.dilate_ellipse(torch.from_numpy(mask), radius).numpy()
        assert np.array_equal(out, cv2.dilate(mask, kernel)), radius


def test_auto_blends_with_cv2(mesh_store, source_tom):
    """cv2 is the default compositor (measured faster on the H100 host too); torch is opt-in."""
    image, face = source_tom
    assert MeshSwapper(image, face, mesh_store, "cpu")._compositor is None
    assert MeshSwapper(image, face, mesh_store, "cpu", compositor="torch")._compositor is not None
