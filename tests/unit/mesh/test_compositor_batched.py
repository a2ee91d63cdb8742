"""The batched compositor (every face of a batch at once; the CUDA default) gives the per-face torch
compositor's picture, run here on the CPU device.

The scene packs real meshes of the clip several to a frame: tiles side by side, a face overlapping an
earlier one, faces scaled so they take other source pyramid levels, faces cut by the frame edge, and a
classic-path face between mesh faces. Its building blocks (per-face blurs, dilations, hole fill) are
held to their per-face twins one by one.
"""

from __future__ import annotations

import dataclasses
import time

import cv2
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from worker.models.mesh import blend_torch
from worker.models.mesh.compositor_batched import (
    blur_batched,
    dilate_ellipses,
    fill_from_nearest_batched,
    gaussian_taps_batched,
    plan_layers,
    plan_passes,
)
from worker.models.mesh.raster_torch import (
    fill_from_nearest,
    fill_tables,
    pixel_boxes,
    rasterise,
    scan_tables_torch,
)
from worker.models.mesh.swapper import MeshSwapper

TILE = 224
GRID = (2, 3)  # tiles per scene frame: rows, columns


@pytest.fixture(scope="module")
def swappers(mesh_store, source_tom) -> dict[str, MeshSwapper]:
    image, face = source_tom
    return {
        kind: MeshSwapper(image, face, mesh_store, "cpu", compositor=kind)
        for kind in ("batched", "torch", "cv2")
    }


@pytest.fixture(scope="module")
def tiles(swappers, swap_clip):
    """Every clip tile with a mesh: (image, its mesh, its detected face)."""
    frames, _, faces = swap_clip
    meshes = swappers["torch"].track_batch(frames, faces)
    return [
        (frame, row[0], frame_faces[0])
        for frame, row, frame_faces in zip(frames, meshes, faces, strict=True)
        if row and row[0] is not None
    ]


def _moved(points: np.ndarray, dx: float, dy: float, scale: float = 1.0) -> np.ndarray:
    """A mesh scaled about its centre (depth too) and shifted."""
    centre = points.mean(axis=0)
    out = (points - centre) * scale + centre
    out[:, 0] += dx
    out[:, 1] += dy
    return out.astype(points.dtype)


def _moved_face(face, dx: float, dy: float):
    shift = np.array([dx, dy], np.float32)
    return dataclasses.replace(face, box=face.box + np.tile(shift, 2), landmarks=face.landmarks + shift)


@pytest.fixture(scope="module")
def scene(tiles):
    """Frames of 2x3 tiles and, per frame, the faces and meshes to blend (None: the classic path)."""
    rows, cols = GRID
    frames, faces, meshes = [], [], []
    for start in (0, 6, 9):
        frame = np.zeros((rows * TILE, cols * TILE, 3), np.uint8)
        frame_faces, frame_meshes = [], []
        for k in range(rows * cols):
            image, pts, face = tiles[(start + k) % len(tiles)]
            dy, dx = (k // cols) * TILE, (k % cols) * TILE
            frame[dy : dy + TILE, dx : dx + TILE] = image
            frame_faces.append(_moved_face(face, dx, dy))
            frame_meshes.append(_moved(pts, dx, dy))
        frames.append(frame)
        faces.append(frame_faces)
        meshes.append(frame_meshes)
    # frame 1: an overlapping face, a small and a large one (other pyramid levels), one cut by the edge
    _, pts, face = tiles[3]
    faces[1] += [face] * 4
    meshes[1] += [
        _moved(meshes[1][0], 55.0, 35.0),
        _moved(meshes[1][1], 0.0, 0.0, 0.4),
        _moved(meshes[1][4], -20.0, -10.0, 1.7),
        _moved(pts, -90.0, 300.0),
    ]
    # frame 2: a classic face between mesh faces that overlap it
    faces[2] = [*faces[2][:3], faces[2][1], faces[2][3], faces[2][1]]
    meshes[2] = [*meshes[2][:3], None, meshes[2][3], _moved(meshes[2][3], 30.0, 20.0, 0.8)]
    return np.stack(frames), faces, meshes


def _compare(reference, candidate, frames) -> tuple[int, float, float]:
    """Max and mean abs grey-level difference (over touched pixels) and max mask difference."""
    worst, total, count, mask_worst = 0, 0.0, 0, 0.0
    for ref, out, frame in zip(reference, candidate, frames, strict=True):
        assert out.paths == ref.paths
        assert out.frame.dtype == np.uint8 and out.mask.dtype == np.float32
        mask_worst = max(mask_worst, float(np.abs(out.mask - ref.mask).max()))
        touched = (ref.mask > 0) | (out.mask > 0)
        assert np.array_equal(out.frame[~touched], frame[~touched])
        diff = np.abs(out.frame.astype(int) - ref.frame.astype(int))[touched]
        worst = max(worst, int(diff.max(initial=0)))
        total += float(diff.sum())
        count += diff.size
    return worst, total / max(count, 1), mask_worst


def _with_host_steps(plans):
    """Plans with a stand-in host step where the classic path runs."""
    return [[(lambda f: (f, f[..., 0] * 0.0)) if p is None else p for p in row] for row in plans]


def test_scene_exercises_layers_levels_and_sizes(swappers, scene):
    frames, _, meshes = scene
    swapper = swappers["batched"]
    plans = [
        [None if pts is None else swapper._plan(frame.shape[:2], pts) for pts in row]
        for frame, row in zip(frames, meshes, strict=True)
    ]
    levels = {plan.level for row in plans for plan in row if plan is not None}
    sides = [max(p.window[2] - p.window[0], p.window[3] - p.window[1]) for row in plans for p in row if p]
    layers = plan_layers(_with_host_steps(plans))
    assert len(levels) >= 2, levels
    assert max(sides) > 2 * min(sides), sides  # two passes in a layer
    assert layers[0] == [0] * 6
    assert max(layers[1]) >= 1 and max(layers[2]) >= 2, layers
    assert any(p.window[0] == 0 for p in plans[1] if p) and sum(len(row) for row in plans) >= 22


def test_batched_matches_per_face_torch_on_a_packed_scene(swappers, scene):
    frames, faces, meshes = scene
    reference = swappers["torch"].blend_batch(frames, faces, meshes)
    candidate = swappers["batched"].blend_batch(frames, faces, meshes)
    worst, mean, mask_worst = _compare(reference, candidate, frames)
    print(f"\nscene: {sum(map(len, meshes))} faces, max diff {worst}, mean {mean:.2e}, mask {mask_worst:.2e}")
    assert worst <= 2 and mask_worst <= 0.01
    assert candidate[2].paths[3] == "classic"


@pytest.mark.parametrize("kind", ["batched", "torch", "cv2"])
def test_in_place_blend_writes_the_copys_picture_into_the_batch(swappers, scene, kind):
    """``in_place``: the same frames and masks as a blend into a copy (layers, levels, a classic face
    between overlapping mesh faces), written into the caller's batch, each output a view of it."""
    frames, faces, meshes = scene
    want = swappers[kind].blend_batch(frames, faces, meshes)
    batch = frames.copy()
    got = swappers[kind].blend_batch(batch, faces, meshes, in_place=True)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.paths == b.paths
        assert np.array_equal(a.frame, b.frame) and np.array_equal(a.mask, b.mask), (kind, i)
        assert np.shares_memory(a.frame, batch[i]) and np.array_equal(batch[i], b.frame)
    assert not np.array_equal(batch, frames)


def test_batched_matches_per_face_torch_on_the_clip(swappers, swap_clip):
    """One face a frame: every pose of the clip, the rotation sweep and the face-less frames."""
    frames, _, faces = swap_clip
    meshes = swappers["torch"].track_batch(frames, faces)
    reference = swappers["torch"].blend_batch(frames, faces, meshes)
    candidate = swappers["batched"].blend_batch(frames, faces, meshes)
    worst, mean, mask_worst = _compare(reference, candidate, frames)
    print(f"\nclip: max diff {worst}, mean {mean:.2e}, mask {mask_worst:.2e}")
    assert worst <= 2 and mask_worst <= 0.01


def test_single_face_swap_matches(swappers, tiles):
    image, pts, _ = tiles[0]
    a, mask_a = swappers["batched"].swap_face(image, pts)
    b, mask_b = swappers["torch"].swap_face(image, pts)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2 and np.abs(mask_a - mask_b).max() <= 0.01


class _CountOps(TorchDispatchMode):
    """Counts the torch operators run (on CUDA: at least the kernel launches)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _grid_of(pts: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` copies of one mesh, 200 px apart on a grid: same sizes, windows never overlap."""
    return [_moved(pts, 200.0 * (k % 4), 200.0 * (k // 4)) for k in range(n)]


def test_launches_and_layers_do_not_grow_with_the_number_of_faces(swappers, tiles):
    image, pts, _ = tiles[0]
    swapper = swappers["batched"]
    compositor = swapper._batched
    frame = np.tile(image, (4, 4, 1))[:800, :800]
    counts = {}
    for n in (1, 4, 12):
        plans = [[swapper._plan(frame.shape[:2], p) for p in _grid_of(pts, n)]]
        assert plan_layers(plans) == [[0] * n]
        with torch.inference_mode(), _CountOps() as ops:
            compositor.composite(frame[None], plans)
        counts[n] = ops.count
    assert counts[1] == counts[4] == counts[12], counts
    overlapping = [[swapper._plan(frame.shape[:2], _moved(pts, 10.0 * k, 0.0)) for k in range(5)]]
    assert plan_layers(overlapping) == [[0, 1, 2, 3, 4]]


def test_layers_follow_overlaps_and_host_steps(swappers, tiles):
    plan = swappers["batched"]._plan(tiles[0][0].shape[:2], tiles[0][1])

    def at(x0: int, y0: int, level: int = 0):
        return dataclasses.replace(plan, window=(x0, y0, x0 + 10, y0 + 10), level=level)

    def step(frame):
        return frame, frame[..., 0] * 0.0

    a, b, c = at(0, 0), at(20, 0), at(5, 5)
    assert plan_layers([[a, b, step, c, None], [a, c, step, b], [b, c, a]]) == [
        [0, 0, 0, 1, -1],
        [0, 1, 1, 2],
        [0, 0, 1],
    ]


def test_passes_split_by_size_and_sort_by_level(swappers, tiles):
    plan = swappers["batched"]._plan(tiles[0][0].shape[:2], tiles[0][1])
    sides_levels = [(200, 1), (190, 0), (90, 2), (120, 2), (60, 0)]
    plans = [dataclasses.replace(plan, window=(0, 0, s, s), level=lv) for s, lv in sides_levels]
    assert plan_passes(plans, 1 << 24) == [[1, 0, 3], [4, 2]]
    assert plan_passes(plans, 200 * 200 * 2) == [[1, 0], [4, 3, 2]]  # the pixel budget splits too


def test_gaussian_taps_batched_equal_cv2s_to_an_ulp():
    sigmas = np.array([0.5, 0.6, 1.3, 4.02, 9.0, 17.77, 40.0])
    taps = gaussian_taps_batched(sigmas)
    radius = taps.shape[1] // 2
    for row, sigma in zip(taps, sigmas, strict=True):
        ref = blend_torch.gaussian_taps(float(sigma))
        r = len(ref) // 2
        np.testing.assert_allclose(row[radius - r : radius + r + 1], ref, rtol=1e-6, atol=1e-12)  # 1 ulp
        assert not row[: radius - r].any() and not row[radius + r + 1 :].any()


@pytest.mark.parametrize(
    ("border", "cv2_border"),
    [
        ("replicate", cv2.BORDER_REPLICATE),
        ("constant", cv2.BORDER_CONSTANT),
        ("reflect101", cv2.BORDER_REFLECT_101),
    ],
)
def test_blur_batched_blurs_each_face_as_alone(border, cv2_border):
    rng = np.random.default_rng(3)
    sizes = [(37, 53), (20, 11), (41, 60), (1, 9)]
    sigmas = np.array([2.5, 0.7, 9.0, 3.0])
    stack = rng.uniform(0, 1, (2, len(sizes), 41, 60)).astype(np.float32)
    out = blur_batched(torch.from_numpy(stack), sigmas, torch.tensor(sizes), border).numpy()
    for k, ((h, w), sigma) in enumerate(zip(sizes, sigmas, strict=True)):
        image = np.ascontiguousarray(stack[:, k, :h, :w].transpose(1, 2, 0))
        ref = cv2.GaussianBlur(image, (0, 0), sigmaX=float(sigma), borderType=cv2_border)
        assert np.abs(out[:, k, :h, :w].transpose(1, 2, 0) - ref).max() < 1e-5, (k, sigma)


def test_dilate_ellipses_uses_each_faces_radius():
    rng = np.random.default_rng(4)
    maps = ((rng.uniform(0, 1, (3, 40, 50)) > 0.97) * rng.uniform(0.2, 1.0, (3, 40, 50))).astype(np.float32)
    radii = np.array([1, 11, 4])
    out = dilate_ellipses(torch.from_numpy(maps), radii).numpy()
    for k, radius in enumerate(radii.tolist()):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        assert np.array_equal(out[k], cv2.dilate(maps[k], kernel)), radius


def test_hole_fill_per_face_equals_the_single_face_fill(swappers, tiles):
    """Different window sizes in one padded stack: each face fills exactly as it does alone."""
    swapper = swappers["batched"]
    tris = swapper.topology.triangles
    maps = []
    for image, pts, _ in tiles[:5]:
        for scale in (1.0, 0.6):
            moved = _moved(pts, 0.0, 0.0, scale)
            x0, y0, x1, y1 = swapper._plan(image.shape[:2], moved).window
            maps.append(rasterise(moved, tris, (x0, y0), (y1 - y0, x1 - x0), torch.device("cpu")))
    hm, wm = max(m.shape[0] for m in maps), max(m.shape[1] for m in maps)
    stack = torch.full((len(maps), hm, wm), -1, dtype=torch.int64)
    inside = torch.zeros((len(maps), hm, wm), dtype=torch.bool)
    for k, m in enumerate(maps):
        stack[k, : m.shape[0], : m.shape[1]] = m
        inside[k, : m.shape[0], : m.shape[1]] = True
    filled = fill_from_nearest_batched(stack, inside)
    for k, m in enumerate(maps):
        assert torch.equal(filled[k, : m.shape[0], : m.shape[1]], fill_from_nearest(m)), k


def test_device_scan_tables_equal_the_host_ones(tiles):
    """The rasteriser's per-triangle fixed-point tables, built on the device, equal numpy's bit for bit
    (real meshes, and random vertices with negative and far-out coordinates)."""
    from worker.models.mesh.triangles import load_topology

    tris = load_topology().triangles
    rng = np.random.default_rng(5)
    v16 = [np.round(pts[:, :2] * 16).astype(np.int64)[tris] for _, pts, _ in tiles]
    v16.append(rng.integers(-3000, 60000, (5000, 3, 2)))
    v16.append(np.repeat(rng.integers(-50, 50, (300, 1, 2)), 3, axis=1))  # degenerate: one point
    for v in v16:
        table, boxes = fill_tables(v, (200, 300))
        assert np.array_equal(scan_tables_torch(torch.from_numpy(v)).numpy(), table)
        assert np.array_equal(pixel_boxes(v, (200, 300)), boxes)


def test_auto_is_cv2_on_the_cpu(mesh_store, source_tom):
    image, face = source_tom
    swapper = MeshSwapper(image, face, mesh_store, "cpu")
    assert swapper._batched is None and swapper._compositor is None


def test_cpu_timings_batched_vs_per_face(swappers, tiles):
    """Informative only (printed with -s): one 12-face batch through each compositor on one CPU thread,
    best of three (the batched path is for CUDA; on the CPU it does the per-face path's work)."""
    frames = np.stack([np.tile(image, (1, 2, 1)) for image, _, _ in tiles[:6]])
    meshes = [[pts, _moved(pts, TILE, 0.0)] for _, pts, _ in tiles[:6]]
    faces = [[face, _moved_face(face, TILE, 0.0)] for _, _, face in tiles[:6]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    report = []
    try:
        for kind in ("batched", "torch", "cv2"):
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                swappers[kind].blend_batch(frames, faces, meshes)
                best = min(best, time.perf_counter() - start)
            report.append(f"{kind} {1000 * best:.0f} ms")
    finally:
        torch.set_num_threads(threads)
    print("\n12 faces on one CPU thread: " + ", ".join(report))
