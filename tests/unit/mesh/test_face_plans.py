"""The mesh swapper's per-face plans, computed for all faces of a batch at once, are exactly what the
per-face code computed (kept below as the reference): same windows, levels, hidden triangles, hulls."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.models.mesh.compositor_torch import FacePlan
from worker.models.mesh.swapper import MeshSwapper, inter_ocular_px, mask_outline
from worker.models.mesh.triangles import signed_areas


def reference_plan(swapper: MeshSwapper, shape_hw: tuple[int, int], points: np.ndarray) -> FacePlan | None:
    """The per-face ``_plan`` before plans were batched (commit eb93fe4)."""
    h, w = shape_hw
    xy = points[:, :2]
    x0, y0 = (int(v) for v in np.clip(np.floor(xy.min(axis=0)) - 1, 0, [w, h]))
    x1, y1 = (int(v) for v in np.clip(np.ceil(xy.max(axis=0)) + 2, 0, [w, h]))
    iod = inter_ocular_px(points)
    if x1 - x0 < 4 or y1 - y0 < 4 or not np.isfinite(iod) or iod < 1.0:
        return None
    source_iod = inter_ocular_px(swapper.source_points)
    level = int(np.clip(math.floor(math.log2(max(source_iod / iod, 1.0))), 0, len(swapper._pyramid) - 1))
    tris = swapper.topology.triangles
    src = signed_areas(swapper.source_points, tris)
    dst = signed_areas(points, tris)
    front = dst > 0
    ratio = np.where(front, src / np.where(front, dst, 1.0), 1.0)
    ref = float(np.median(ratio[front])) if front.any() else 1.0
    rel = ratio / max(ref, 1e-6)
    rel[swapper.topology.groups["surface"][1] :] = 1.0
    hidden = np.clip((swapper.hidden_rel - rel) / (0.7 * swapper.hidden_rel), 0.0, 1.0).astype(np.float32)
    return FacePlan(
        window=(x0, y0, x1, y1),
        iod_px=iod,
        level=level,
        src_xy=(swapper.source_points[:, :2] + 0.5) / 2.0**level - 0.5,
        points=points,
        hidden=hidden,
        hull=mask_outline(points, swapper.topology.face_oval, swapper.forehead_keep),
    )


@pytest.fixture(scope="module")
def swapper(mesh_store, source_tom) -> MeshSwapper:
    image, face = source_tom
    return MeshSwapper(image, face, mesh_store, "cpu", compositor="batched")


def meshes_of_every_kind(swapper: MeshSwapper, swap_clip) -> list[np.ndarray]:
    """The clip's meshes, plus copies scaled down (other pyramid levels), cut by the frame edge,
    turned edge-on (every triangle folded: no front-facing one), and too small to plan."""
    frames, _, faces = swap_clip
    meshes = [m for row in swapper.track_batch(frames, faces) for m in row if m is not None]
    assert meshes, "the clip has no mesh faces"
    base = meshes[0]
    centre = base.mean(axis=0)
    out = list(meshes)
    for scale in (0.5, 0.25, 0.12):
        out.append(((base - centre) * scale + centre).astype(base.dtype))
    shifted = base.copy()
    shifted[:, 0] -= centre[0]  # half the face left of the frame
    out.append(shifted)
    flipped = base.copy()
    flipped[:, 0] = 2 * centre[0] - flipped[:, 0]  # mirrored: every triangle's winding reversed
    out.append(flipped)
    out.append(((base - centre) * 0.01 + centre).astype(base.dtype))  # a dot: no plan
    return out


def test_batched_plans_equal_the_per_face_plans(swapper, swap_clip) -> None:
    meshes = meshes_of_every_kind(swapper, swap_clip)
    shape = swap_clip[0].shape[1:3]
    batched = swapper._plans(shape, meshes)
    assert len(batched) == len(meshes)
    levels, nones = set(), 0
    for got, points in zip(batched, meshes, strict=True):
        want = reference_plan(swapper, shape, points)
        if want is None:
            assert got is None
            nones += 1
            continue
        assert got is not None
        assert got.window == want.window and got.level == want.level and got.iod_px == want.iod_px
        assert np.array_equal(got.hidden, want.hidden)
        assert np.array_equal(got.src_xy, want.src_xy)
        assert np.array_equal(got.hull, want.hull)
        assert got.points is points
        levels.add(got.level)
    assert nones >= 1 and len(levels) >= 2  # the cases above were really exercised
    assert swapper._plans(shape, []) == []
