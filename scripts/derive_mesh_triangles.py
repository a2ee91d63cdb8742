"""Derive the fixed face-mesh triangle list from MediaPipe's FACEMESH_TESSELATION edge list.

Reads ``mediapipe/python/solutions/face_mesh_connections.py`` out of the mediapipe wheel (never imports or
installs mediapipe), finds the triangles of the edge graph (3-cliques that form a manifold surface),
orients them consistently and writes ``worker/models/mesh/face_triangles.json``.

    pip download --no-deps --only-binary=:all: mediapipe==0.10.21 --python-version 3.11 \
        --platform manylinux_2_28_x86_64 -d /tmp/mp
    python scripts/derive_mesh_triangles.py /tmp/mp/mediapipe-0.10.21-*.whl

Orientation: triangles are wound like FACEMESH_FACE_OVAL's loop (10 -> 338 -> 297 ...), which runs
clockwise on screen for a frontal face, i.e. a positive shoelace area in y-down image coordinates.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import zipfile
from collections import defaultdict
from pathlib import Path

MEMBER = "mediapipe/python/solutions/face_mesh_connections.py"
OUT = Path(__file__).resolve().parents[1] / "worker" / "models" / "mesh" / "face_triangles.json"


def read_connections(wheel: Path) -> dict[str, list[tuple[int, int]]]:
    """Evaluate the frozenset literals of the connections module with ``ast`` (pure data, no import)."""
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read(MEMBER).decode()
    out: dict[str, list[tuple[int, int]]] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        call = node.value
        if getattr(call.func, "id", None) == "frozenset" and call.args and isinstance(call.args[0], ast.List):
            out[node.targets[0].id] = [tuple(p) for p in ast.literal_eval(call.args[0])]  # type: ignore[attr-defined]
    return out


def find_triangles(edges: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """All 3-cliques of the edge graph, then drop cliques whose edges would be shared by >2 faces."""
    nbrs: dict[int, set[int]] = defaultdict(set)
    for a, b in edges:
        nbrs[a].add(b)
        nbrs[b].add(a)
    tris = set()
    for a in nbrs:
        for b, c in itertools.combinations(sorted(nbrs[a]), 2):
            if c in nbrs[b]:
                tris.add(tuple(sorted((a, b, c))))
    tris_l = sorted(tris)
    # A 3-cycle that is not a face makes its edges appear in 3 cliques; drop such cliques when every
    # edge of theirs is over-used (separating triangles), keeping the surface a 2-manifold.
    while True:
        use: dict[tuple[int, int], int] = defaultdict(int)
        for t in tris_l:
            for e in itertools.combinations(t, 2):
                use[e] += 1
        bad = [t for t in tris_l if all(use[e] > 2 for e in itertools.combinations(t, 2))]
        if not bad:
            break
        tris_l = [t for t in tris_l if t not in bad[:1]]
    return tris_l


# The three holes of the tessellation (two eyes, the mouth), named by the two corners their fill strip
# runs between: right eye 33/133, left eye 362/263, mouth 78/308 (MediaPipe canonical indices).
HOLE_CORNERS = {"right_eye": (33, 133), "left_eye": (362, 263), "mouth": (78, 308)}


def fill_hole(
    surface: list[tuple[int, int, int]], corner_a: int, corner_b: int
) -> list[tuple[int, int, int]]:
    """Close the boundary loop through two corners with a zig-zag strip between its two arcs.

    The tessellation leaves the eyes and mouth open; the warp needs them covered so the source's closed
    eyes and lips move with the target.
    """
    use: dict[frozenset[int], int] = defaultdict(int)
    for t in surface:
        for e in itertools.combinations(t, 2):
            use[frozenset(e)] += 1
    adj: dict[int, list[int]] = defaultdict(list)
    for e, n in use.items():
        if n == 1:
            a, b = tuple(e)
            adj[a].append(b)
            adj[b].append(a)
    arcs = []
    for first in adj[corner_a]:
        arc, prev, cur = [corner_a], corner_a, first
        while cur != corner_b:
            arc.append(cur)
            prev, cur = cur, next(v for v in adj[cur] if v != prev)
        arcs.append(arc + [corner_b])
    upper, lower = arcs
    tris, i, j = [], 0, 0
    while i < len(upper) - 1 or j < len(lower) - 1:
        advance_upper = j == len(lower) - 1 or (
            i < len(upper) - 1 and (i + 1) / (len(upper) - 1) <= (j + 1) / (len(lower) - 1)
        )
        if advance_upper:
            tris.append((upper[i], upper[i + 1], lower[j]))
            i += 1
        else:
            tris.append((upper[i], lower[j + 1], lower[j]))
            j += 1
    return [tuple(sorted(t)) for t in tris if len(set(t)) == 3]


def orient(tris: list[tuple[int, int, int]], oval: list[tuple[int, int]]) -> list[list[int]]:
    """Wind all triangles consistently by propagating across shared edges, matching the oval's direction."""
    by_edge: dict[frozenset[int], list[int]] = defaultdict(list)
    for i, t in enumerate(tris):
        for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
            by_edge[frozenset((a, b))].append(i)
    wound: dict[int, tuple[int, int, int]] = {}
    oval_dir = set(oval)
    # seed: a triangle on the oval boundary, wound so that it traverses its oval edge in the oval's direction
    seed_edge = oval[0]
    seed = by_edge[frozenset(seed_edge)][0]
    a, b = seed_edge
    c = next(v for v in tris[seed] if v not in seed_edge)
    wound[seed] = (a, b, c)
    stack = [seed]
    while stack:
        i = stack.pop()
        t = wound[i]
        for x, y in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
            for j in by_edge[frozenset((x, y))]:
                if j in wound:
                    continue
                z = next(v for v in tris[j] if v not in (x, y))
                wound[j] = (y, x, z)  # the neighbour runs the shared edge the other way
                stack.append(j)
    if len(wound) != len(tris):
        raise SystemExit(f"mesh is not connected: wound {len(wound)} of {len(tris)} triangles")
    for t in wound.values():  # every oval edge must now run in the oval's direction
        for x, y in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
            if (y, x) in oval_dir:
                raise SystemExit(f"triangle {t} runs the face oval backwards: orientation is inconsistent")
    return [list(wound[i]) for i in range(len(tris))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="mediapipe 0.10.x wheel (a zip)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    conns = read_connections(args.wheel)
    tess = conns["FACEMESH_TESSELATION"]
    surface = find_triangles(tess)
    holes = [fill_hole(surface, a, b) for a, b in HOLE_CORNERS.values()]
    tris = orient(surface + [t for h in holes for t in h], _loop(conns["FACEMESH_FACE_OVAL"]))
    n_surface = len(surface)
    groups = {"surface": [0, n_surface]}
    start = n_surface
    for name, h in zip(HOLE_CORNERS, holes, strict=True):
        groups[name] = [start, start + len(h)]
        start += len(h)
    data = {
        "source": f"{args.wheel.name}:{MEMBER} FACEMESH_TESSELATION ({len(tess)} edges), Apache-2.0",
        "winding": "positive shoelace area in y-down image coordinates on a frontal face",
        "triangles": tris,
        "groups": groups,
        "face_oval": [a for a, _ in _loop(conns["FACEMESH_FACE_OVAL"])],
        "lips_inner": [a for a, _ in _loop(_inner_lips(conns["FACEMESH_LIPS"]))],
        "lips_outer": [a for a, _ in _loop(_outer_lips(conns["FACEMESH_LIPS"]))],
    }
    args.out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"{len(tris)} triangles from {len(tess)} edges -> {args.out}")


def _loop(edges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Order a closed loop's edges head to tail, starting at the first edge's start."""
    nxt = {}
    for a, b in edges:
        nxt.setdefault(a, []).append(b)
    start = edges[0][0] if edges[0][0] == 10 or 10 not in nxt else 10
    order, cur = [], start
    while True:
        b = nxt[cur][0]
        order.append((cur, b))
        cur = b
        if cur == start:
            return order


def _inner_lips(lips: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The inner lip contour (78 ... 308 upper and lower) as one closed loop 78 -> upper -> 308 -> lower."""
    inner_nodes = {78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311, 310, 415}
    inner = [(a, b) for a, b in lips if a in inner_nodes and b in inner_nodes]
    upper = _path(inner, 78, 308, {191, 80, 81, 82, 13, 312, 311, 310, 415})
    lower = _path(inner, 78, 308, {95, 88, 178, 87, 14, 317, 402, 318, 324})
    loop = upper + [(b, a) for a, b in reversed(lower)]
    return loop


def _outer_lips(lips: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The outer lip contour as one closed loop 61 -> upper -> 291 -> lower."""
    nodes = {a for e in lips for a in e}
    outer = [(a, b) for a, b in lips if a in nodes and b in nodes]
    upper = _path(outer, 61, 291, {185, 40, 39, 37, 0, 267, 269, 270, 409})
    lower = _path(outer, 61, 291, {146, 91, 181, 84, 17, 314, 405, 321, 375})
    return upper + [(b, a) for a, b in reversed(lower)]


def _path(edges: list[tuple[int, int]], start: int, end: int, via: set[int]) -> list[tuple[int, int]]:
    adj: dict[int, list[int]] = defaultdict(list)
    for a, b in edges:
        if (a in via or a in (start, end)) and (b in via or b in (start, end)):
            adj[a].append(b)
            adj[b].append(a)
    out, prev, cur = [], -1, start
    while cur != end:
        nxt = next(v for v in adj[cur] if v != prev)
        out.append((cur, nxt))
        prev, cur = cur, nxt
    return out


if __name__ == "__main__":
    main()
