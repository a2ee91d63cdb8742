"""The one fixed triangle list of the 468-point mesh, derived once from MediaPipe's tessellation edges.

A per-frame Delaunay would re-pick diagonals as points move and make the warp flicker; a fixed topology
keeps every pixel tied to the same three landmarks in every frame. Data: ``face_triangles.json``, made by
``scripts/derive_mesh_triangles.py`` (Apache-2.0, MediaPipe authors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

TRIANGLES_FILE = Path(__file__).with_name("face_triangles.json")


@dataclass(frozen=True)
class MeshTopology:
    """Triangles (T,3) wound clockwise on screen (positive y-down area) plus named index groups."""

    triangles: np.ndarray  # (T,3) int32
    groups: dict[str, tuple[int, int]]  # name -> [start, stop) rows of ``triangles``
    face_oval: np.ndarray  # (36,) closed outer loop
    lips_inner: np.ndarray  # (20,) closed inner-lip loop (the mouth opening)
    lips_outer: np.ndarray  # (20,) closed outer-lip loop

    def group(self, name: str) -> np.ndarray:
        """The triangles of one group: surface, right_eye, left_eye, mouth."""
        start, stop = self.groups[name]
        return self.triangles[start:stop]


@lru_cache(maxsize=1)
def load_topology(path: Path = TRIANGLES_FILE) -> MeshTopology:
    """Read the committed triangle list (cached; the file never changes at run time)."""
    data = json.loads(path.read_text())
    return MeshTopology(
        triangles=np.asarray(data["triangles"], dtype=np.int32),
        groups={k: (int(v[0]), int(v[1])) for k, v in data["groups"].items()},
        face_oval=np.asarray(data["face_oval"], dtype=np.int32),
        lips_inner=np.asarray(data["lips_inner"], dtype=np.int32),
        lips_outer=np.asarray(data["lips_outer"], dtype=np.int32),
    )


def signed_areas(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Twice the signed area of each triangle in y-down pixels (positive = the committed winding)."""
    p = np.asarray(points, dtype=np.float64)[:, :2]
    a, b, c = p[triangles[:, 0]], p[triangles[:, 1]], p[triangles[:, 2]]
    return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
