"""The committed triangle list: a clean, consistently wound disk that covers the real face."""

from __future__ import annotations

import itertools
from collections import Counter

import cv2
import numpy as np
import pytest

from worker.models.mesh.landmarker import roi_from_face
from worker.models.mesh.triangles import load_topology, signed_areas


@pytest.fixture(scope="module")
def astronaut_mesh(detector, landmarker, astronaut) -> np.ndarray:
    points, presence, _ = landmarker.landmarks_refined(
        [astronaut], [roi_from_face(detector.detect(astronaut)[0][0], 0)]
    )
    assert presence[0] > 0.9
    return points[0]


def _edge_uses(triangles: np.ndarray) -> Counter:
    uses: Counter = Counter()
    for a, b, c in triangles.tolist():
        for x, y in ((a, b), (b, c), (c, a)):
            uses[(x, y)] += 1
    return uses


def test_no_duplicate_or_degenerate_triangles_and_all_points_used():
    tris = load_topology().triangles
    assert tris.shape == (898, 3)
    assert all(len(set(t)) == 3 for t in tris.tolist())
    assert len({frozenset(t) for t in tris.tolist()}) == len(tris)
    assert set(np.unique(tris)) == set(range(468))


def test_winding_is_consistent_and_the_mesh_is_a_disk_bounded_by_the_face_oval():
    topo = load_topology()
    uses = _edge_uses(topo.triangles)
    assert max(uses.values()) == 1  # a directed edge used twice means two neighbours disagree on winding
    boundary = [e for e in uses if (e[1], e[0]) not in uses]
    oval = topo.face_oval.tolist()
    assert {frozenset(e) for e in boundary} == {
        frozenset(p) for p in zip(oval, oval[1:] + oval[:1], strict=True)
    }
    edges = {frozenset(e) for e in uses}
    assert 468 - len(edges) + len(topo.triangles) == 1  # Euler characteristic of a disk


def test_triangles_cover_the_hull_of_a_real_face(astronaut_mesh):
    tris = load_topology().triangles
    xy = np.round(astronaut_mesh[:, :2] * 4).astype(np.int32)  # 4x supersampled raster
    union = np.zeros((2048, 2048), np.uint8)
    for t in tris:
        cv2.fillConvexPoly(union, xy[t], 1)
    hull = np.zeros_like(union)
    cv2.fillConvexPoly(hull, cv2.convexHull(xy), 1)
    inter = int((union & hull).sum())
    assert inter / hull.sum() > 0.97
    assert union.sum() - inter <= 0.01 * hull.sum()


def test_no_flipped_triangles_on_a_frontal_face(astronaut_mesh):
    """Turned to face the camera (yaw/pitch from the mesh's own depth), only slivers at the cheek edges
    and lip corners may fold: under 3% of triangles and 0.5% of the area."""
    p = astronaut_mesh - astronaut_mesh.mean(axis=0)
    for axis, (i, j) in ((1, (33, 263)), (0, (10, 152))):
        k = 0 if axis == 1 else 1
        angle = np.arctan2(p[j, 2] - p[i, 2], p[j, k] - p[i, k])
        c, s = np.cos(-angle), np.sin(-angle)
        rot = np.eye(3)
        rot[np.ix_([k, 2], [k, 2])] = [[c, -s], [s, c]]
        p = p @ rot.T
    areas = signed_areas(p, load_topology().triangles)
    assert np.mean(areas < 0) < 0.03
    assert -areas[areas < 0].sum() < 0.005 * np.abs(areas).sum()


def test_group_ranges_partition_the_list():
    topo = load_topology()
    spans = sorted(topo.groups.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(topo.triangles)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert len(topo.lips_inner) == 20 and len(topo.lips_outer) == 20
