"""The mesh swapper's compositing for every face of a batch of frames at once, on the device.

The per-face torch compositor issues a few hundred kernels and builds its triangle tables on the host
for every face; at ~7 faces a 1080p frame that launch and host cost is the whole budget. Here the faces
of a batch are rows of one padded (F, H, W) stack (windows at the top left, padding bottom/right): the
rasteriser's pixel pairs, the hole fill, the warp (one grid_sample per source level), the masks, the
per-face blurs (each face's own kernel zero-padded to the widest) and the colour match run once over the
stack, so the number of launches does not grow with the number of faces. The picture is the per-face
compositor's: faces whose windows overlap still stack in order, through layers pasted one after another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from worker.models.align import MASK_EPS
from worker.models.mesh.blend_torch import (
    Border,
    ellipse_half_widths,
    lab_to_rgb,
    rgb_to_lab,
    round_u8,
    upload,
)
from worker.models.mesh.compositor_torch import FacePlan
from worker.models.mesh.raster_torch import (
    covers,
    fill_from_nearest_batched,
    pixel_boxes,
    pixel_pairs,
    scan_tables_torch,
)
from worker.models.mesh.triangles import MeshTopology
from worker.models.mesh.warp import polygon_mask_u8

HostStep = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""A face blended on the host (the classic path): the current frame in, the new frame and its mask out."""

Item = FacePlan | HostStep | None  # None: a mesh face too small to blend (the frame stays as it is)

_SHIFT_BITS = 4  # the rasteriser's 1/16 px vertices (raster_torch, warp.py)
_PAIRS_PER_SCATTER = 1 << 23  # pixel pairs per rasteriser scatter: ~1.5 GB of temporaries on CUDA
_DILATE_ELEMENTS = 1 << 25  # elements of the dilation's row gather per step: ~128 MB
_BOX_COL = 32  # fill_tables' 32 columns, then the pixel box (x0, y0, width) and the face's buffer offset


def plan_layers(items: Sequence[Sequence[Item]]) -> list[list[int]]:
    """Per frame and item, the layer it is blended in (-1: nothing to do).

    A mesh face goes one layer after every earlier face of its frame whose window overlaps its own (it
    must see their pixels) and after every earlier host step; a host step runs after the device pass of
    its layer, behind every earlier item of its frame. Faces that do not overlap share layer 0, however
    many there are.
    """
    layers: list[list[int]] = []
    for row in items:
        row_layers: list[int] = []
        for k, item in enumerate(row):
            earlier = [(row[j], row_layers[j]) for j in range(k) if row_layers[j] >= 0]
            if item is None:
                row_layers.append(-1)
            elif isinstance(item, FacePlan):
                after = [
                    layer + 1
                    for other, layer in earlier
                    if not isinstance(other, FacePlan) or _overlap(other.window, item.window)
                ]
                row_layers.append(max(after, default=0))
            else:
                row_layers.append(max((layer for _, layer in earlier), default=0))
        layers.append(row_layers)
    return layers


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def plan_passes(plans: Sequence[FacePlan], max_pass_px: int) -> list[list[int]]:
    """The faces of one layer split into device passes, each ordered by source level.

    A pass pads every face to its largest window, so a face half the size of the largest starts a new
    pass (padding then costs at most 4x a face's pixels), as does one that would take the pass over
    ``max_pass_px`` padded pixels (the memory bound).
    """
    hw = np.array([(p.window[3] - p.window[1], p.window[2] - p.window[0]) for p in plans]).reshape(-1, 2)
    side = hw.max(axis=1)
    passes: list[list[int]] = []
    current: list[int] = []
    hm = wm = 0
    for i in np.argsort(-side, kind="stable").tolist():
        nh, nw = max(hm, int(hw[i, 0])), max(wm, int(hw[i, 1]))
        if current and (2 * side[i] < side[current[0]] or (len(current) + 1) * nh * nw > max_pass_px):
            passes.append(current)
            current, nh, nw = [], int(hw[i, 0]), int(hw[i, 1])
        current.append(i)
        hm, wm = nh, nw
    if current:
        passes.append(current)
    return [sorted(p, key=lambda i: plans[i].level) for p in passes]


def gaussian_taps_batched(sigmas: np.ndarray) -> np.ndarray:
    """(F,K) cv2.getGaussianKernel(ksize=(0,0)) float32 taps per sigma, centred, zero-padded to the widest.

    Vectorised ``blend_torch.gaussian_taps`` (cv2's formula: float taps summed in double, then scaled).
    """
    sigma = np.asarray(sigmas, np.float64).reshape(-1)
    ksize = np.round(sigma * 4 * 2 + 1).astype(np.int64) | 1
    radius = int(ksize.max()) // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)[None, :]
    taps = np.exp((-0.5 / (sigma * sigma))[:, None] * x * x).astype(np.float32)
    taps[np.abs(x) > (ksize // 2)[:, None]] = 0.0
    scale = 1.0 / taps.astype(np.float64).sum(axis=1, keepdims=True)
    return (taps.astype(np.float64) * scale).astype(np.float32)


def blur_batched(x: torch.Tensor, sigmas: np.ndarray, sizes: torch.Tensor, border: Border) -> torch.Tensor:
    """cv2.GaussianBlur of each face's window of (C,F,H,W) ``x``: face f's own sigma and its (h,w) size.

    Borders follow cv2's rule at each face's own edge (padding pixels are never read), so a face blurs
    as it would alone; values beyond a face's window are left undefined. One depthwise conv per axis.
    """
    taps_np = gaussian_taps_batched(sigmas)
    radius = taps_np.shape[1] // 2
    if radius == 0:
        return x.clone()
    taps = upload(taps_np, x.device)
    out = _blur_axis_batched(x, taps, sizes[:, 1], radius, border, 3)
    return _blur_axis_batched(out, taps, sizes[:, 0], radius, border, 2)


def _blur_axis_batched(
    x: torch.Tensor, taps: torch.Tensor, valid: torch.Tensor, radius: int, border: Border, dim: int
) -> torch.Tensor:
    """1-D per-face convolution of (C,F,H,W) ``x`` along ``dim`` (2 rows, 3 columns); ``valid`` (F,) is
    each face's length along it, where its border rule applies."""
    c, f, h, w = x.shape
    n = x.shape[dim]
    idx = torch.arange(-radius, n + radius, device=x.device)[None, :]
    length = valid[:, None]
    if border == "constant":
        x = F.pad(x, (0, 1) if dim == 3 else (0, 0, 0, 1))  # index n: a zero line
        src = torch.where((idx >= 0) & (idx < length), idx, n)
    elif border == "replicate":
        src = torch.minimum(idx.clamp(min=0), length - 1)
    else:
        period = (2 * (length - 1)).clamp(min=1)
        m = torch.remainder(idx, period)
        src = torch.where(m >= length, period - m, m)
    if dim == 3:
        padded = torch.gather(x, 3, src[None, :, None, :].expand(c, f, h, src.shape[1]))
        weight = taps.repeat(c, 1)[:, None, None, :]
    else:
        padded = torch.gather(x, 2, src[None, :, :, None].expand(c, f, src.shape[1], w))
        weight = taps.repeat(c, 1)[:, None, :, None]
    out = F.conv2d(padded.reshape(1, c * f, *padded.shape[2:]), weight, groups=c * f)
    return out.view(c, f, h, w)


def dilate_ellipses(x: torch.Tensor, radii: np.ndarray) -> torch.Tensor:
    """cv2.dilate of each non-negative (F,H,W) map with cv2's elliptic kernel of that face's radius.

    Each kernel row is a centred run: one horizontal max-pool per run width in use (over all faces),
    then per output row the max over kernel rows of the pool of that face's width there.
    """
    f, h, w = x.shape
    big = int(radii.max())
    width = np.full((f, 2 * big + 1), -1, np.int64)  # per face and kernel row: half width, -1 none
    for k, r in enumerate(radii.tolist()):
        width[k, big - r : big + r + 1] = ellipse_half_widths(int(r))
    used = sorted(set(width[width >= 0].tolist()))
    pools = [F.max_pool2d(x[:, None], (1, 2 * u + 1), stride=1, padding=(0, u))[:, 0] for u in used]
    stack = F.pad(torch.stack([*pools, torch.zeros_like(x)]), (0, 0, big, big))  # (U+1,F,H+2R,W)
    which = np.searchsorted(np.asarray(used), width)
    which[width < 0] = len(used)
    which_t = upload(which, x.device)
    faces = torch.arange(f, device=x.device)[:, None, None]
    rows = torch.arange(h, device=x.device)[None, :]
    out = torch.zeros_like(x)
    chunk = max(1, _DILATE_ELEMENTS // max(f * h * w, 1))
    for start in range(0, 2 * big + 1, chunk):
        stop = min(start + chunk, 2 * big + 1)
        offsets = torch.arange(start, stop, device=x.device)[:, None] + rows  # (D,H) padded rows
        picked = stack[which_t[:, start:stop, None], faces, offsets[None]]  # (F,D,H,W)
        out = torch.maximum(out, picked.amax(dim=1))
    return out


def _read_shifted(
    x: torch.Tensor,
    origin: torch.Tensor,
    shape_hw: tuple[int, int],
    lo: torch.Tensor,
    hi: torch.Tensor,
) -> torch.Tensor:
    """(F,h,w) with out[f,i,j] = x[f, i+oy, j+ox] where that lies in face f's box [lo, hi) (y, x), else 0;
    the box must lie in ``x``. One gather moves every face's rectangle (crop or paste-back)."""
    f, hx, wx = x.shape
    oh, ow = shape_hw
    device = x.device
    rows = origin[:, 0:1] + torch.arange(oh, device=device)[None, :]
    cols = origin[:, 1:2] + torch.arange(ow, device=device)[None, :]
    ok_r = (rows >= lo[:, 0:1]) & (rows < hi[:, 0:1])
    ok_c = (cols >= lo[:, 1:2]) & (cols < hi[:, 1:2])
    faces = torch.arange(f, device=device)[:, None, None]
    idx = (faces * hx + rows.clamp(0, hx - 1)[:, :, None]) * wx + cols.clamp(0, wx - 1)[:, None, :]
    values = x.reshape(-1)[idx]
    return torch.where(ok_r[:, :, None] & ok_c[:, None, :], values, torch.zeros_like(values))


class _Gathered:
    """Per pixel pair, the columns of its triangle's table row, each gathered when read: one gather from
    a small cache-resident row per column, never a (columns, pairs) copy."""

    def __init__(self, columns: torch.Tensor, rows: torch.Tensor) -> None:
        self.columns = columns
        self.rows = rows

    def __getitem__(self, column: int, /) -> torch.Tensor:
        return self.columns[column].index_select(0, self.rows)


def _draw_polygon(
    canvas: np.ndarray, polygon_xy: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]
) -> None:
    """``TorchCompositor._polygon`` into a host canvas: cv2's AA fill of just the polygon's box."""
    h, w = shape
    local = np.asarray(polygon_xy, np.float64) - np.asarray(origin, np.float64)
    bx0, by0 = (int(v) for v in np.clip(np.floor(local.min(axis=0)) - 2, 0, [w, h]))
    bx1, by1 = (int(v) for v in np.clip(np.ceil(local.max(axis=0)) + 3, 0, [w, h]))
    if bx1 > bx0 and by1 > by0:
        canvas[by0:by1, bx0:bx1] = polygon_mask_u8(
            polygon_xy, (origin[0] + bx0, origin[1] + by0), (by1 - by0, bx1 - bx0)
        )


class BatchedCompositor:
    """Blends the source onto every mesh face of a batch of frames; the per-face ``TorchCompositor``'s
    picture with a number of kernel launches that does not grow with the number of faces."""

    def __init__(
        self,
        pyramid: Sequence[np.ndarray],
        topology: MeshTopology,
        device: torch.device,
        *,
        mouth_mask: Literal["lips", "inner", "off"],
        feather_frac: float,
        mouth_margin_frac: float,
        colour_sigma_frac: float,
        max_pass_px: int = 1 << 24,
    ) -> None:
        self.device = device
        self.topology = topology
        self.mouth_mask = mouth_mask
        self.feather_frac = feather_frac
        self.mouth_margin_frac = mouth_margin_frac
        self.colour_sigma_frac = colour_sigma_frac
        self.max_pass_px = max_pass_px
        self.levels = [upload(level, device).permute(2, 0, 1)[None].to(torch.float32) for level in pyramid]
        self._tris = upload(topology.triangles.astype(np.int64), device)
        start, stop = topology.groups["mouth"]
        loop = topology.lips_outer if mouth_mask == "lips" else topology.lips_inner
        self._loop = loop
        # the mouth is non-zero only near these points: its dilation runs in their box only
        self._mouth_near = np.concatenate([np.unique(topology.triangles[start:stop]), loop])

    def composite(
        self, frames: np.ndarray, items: Sequence[Sequence[Item]], *, in_place: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The (N,H,W,3) uint8 frames with every item blended in order, and each frame's union mask
        (N,H,W float32, the max of its face masks). One download per layer; host steps run in place.
        ``in_place``: blend into ``frames`` itself (uint8, writable) rather than into a copy."""
        out = frames if in_place else np.array(frames, dtype=np.uint8, copy=True)
        union = np.zeros(out.shape[:3], dtype=np.float32)
        layers = plan_layers(items)
        for layer in range(max((max(row, default=-1) for row in layers), default=-1) + 1):
            faces = [
                (fi, item)
                for fi, row in enumerate(items)
                for item, at in zip(row, layers[fi], strict=True)
                if at == layer and isinstance(item, FacePlan)
            ]
            if faces:
                self._blend_layer(out, union, faces)
            for fi, row in enumerate(items):
                for item, at in zip(row, layers[fi], strict=True):
                    if at == layer and item is not None and not isinstance(item, FacePlan):
                        frame, mask = item(out[fi])
                        out[fi] = frame
                        np.maximum(union[fi], mask, out=union[fi])
        return out, union

    def _blend_layer(self, out: np.ndarray, union: np.ndarray, faces: list[tuple[int, FacePlan]]) -> None:
        """Blend faces whose windows do not overlap: queue every pass, download once, paste on the host."""
        passes = plan_passes([plan for _, plan in faces], self.max_pass_px)
        blended = [self._blend_pass(out, [faces[i] for i in group]) for group in passes]
        # every pass's masks (float32 bytes first, so each stays 4-byte aligned), then its pixels: the
        # layer's one sync, and the paste below copies whole contiguous rows
        parts = [m.view(torch.uint8) for _, m in blended] + [rgb for rgb, _ in blended]
        host = torch.cat([p.reshape(-1) for p in parts]).cpu().numpy()
        views, offset = [], 0
        for p in parts:
            views.append(host[offset : offset + p.numel()])
            offset += p.numel()
        for g, (group, (rgb_t, mask_t)) in enumerate(zip(passes, blended, strict=True)):
            masks = views[g].view(np.float32).reshape(mask_t.shape)
            block = views[len(blended) + g].reshape(rgb_t.shape)
            for k, i in enumerate(group):
                fi, plan = faces[i]
                x0, y0, x1, y1 = plan.window
                h, w = y1 - y0, x1 - x0
                out[fi, y0:y1, x0:x1] = block[k, :h, :w]
                np.maximum(union[fi, y0:y1, x0:x1], masks[k, :h, :w], out=union[fi, y0:y1, x0:x1])

    def _blend_pass(
        self, frames: np.ndarray, faces: list[tuple[int, FacePlan]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """On the device: each face's blended window (F,Hm,Wm,3) uint8 and its mask (F,Hm,Wm) float32."""
        plans = [plan for _, plan in faces]
        wins = np.array([plan.window for plan in plans], dtype=np.int64)
        hs, ws = wins[:, 3] - wins[:, 1], wins[:, 2] - wins[:, 0]
        f, hm, wm = len(plans), int(hs.max()), int(ws.max())
        crops = np.zeros((f, hm, wm, 3), np.uint8)  # windows top left, padded bottom/right
        polys = np.zeros((f, 2, hm, wm), np.uint8)  # blend outline, lip loop
        for k, (fi, plan) in enumerate(faces):
            x0, y0, x1, y1 = plan.window
            crops[k, : y1 - y0, : x1 - x0] = frames[fi, y0:y1, x0:x1]
            _draw_polygon(polys[k, 0], plan.hull, (x0, y0), (y1 - y0, x1 - x0))
            if self.mouth_mask != "off":
                _draw_polygon(polys[k, 1], plan.points[self._loop, :2], (x0, y0), (y1 - y0, x1 - x0))
        iod = np.array([plan.iod_px for plan in plans], np.float64)
        dev = self.device
        sizes = upload(np.stack([hs, ws], axis=1), dev)
        ys = torch.arange(hm, device=dev)[None, :, None]
        xs = torch.arange(wm, device=dev)[None, None, :]
        inside = (ys < sizes[:, 0, None, None]) & (xs < sizes[:, 1, None, None])
        tri_map, warped = self._warp_faces(plans, wins, inside)
        poly = upload(polys, dev).to(torch.float32) / 255.0
        region = poly[:, 0]
        mask = self._blend_mask(plans, wins, tri_map, poly, iod, sizes)
        mask = torch.where((mask < MASK_EPS) | ~inside, torch.zeros_like(mask), mask)
        roi = upload(crops, dev).permute(3, 0, 1, 2).to(torch.float32)  # (3,F,H,W)
        warped = _match_colour(warped, roi, region * (mask > 0), self.colour_sigma_frac * iod, sizes)
        m = mask[None]
        blended = torch.where(m > 0, round_u8(roi * (1.0 - m) + warped * m), roi)
        return blended.permute(1, 2, 3, 0).to(torch.uint8).contiguous(), mask.contiguous()

    def _warp_faces(
        self, plans: list[FacePlan], wins: np.ndarray, inside: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each face's triangle map (F,H,W; -1 off the mesh) and the source warped through it (3,F,H,W)."""
        pts = np.stack([plan.points for plan in plans])
        xy = upload(pts[..., :2].astype(np.float64), self.device)
        p = xy[:, self._tris]  # (F,T,3,2)
        area = (p[..., 1, 0] - p[..., 0, 0]) * (p[..., 2, 1] - p[..., 0, 1]) - (
            p[..., 2, 0] - p[..., 0, 0]
        ) * (p[..., 1, 1] - p[..., 0, 1])
        valid = area.abs() > 1e-6  # degenerate triangles are never drawn
        tri_map = self._rasterise(pts, valid, wins, (inside.shape[1], inside.shape[2]))
        warped = self._warp(plans, xy, valid, wins, fill_from_nearest_batched(tri_map, inside))
        return tri_map, warped

    def _blend_mask(
        self,
        plans: list[FacePlan],
        wins: np.ndarray,
        tri_map: torch.Tensor,
        poly: torch.Tensor,
        iod: np.ndarray,
        sizes: torch.Tensor,
    ) -> torch.Tensor:
        """(F,H,W) the feathered outline less where the target keeps its own pixels (the surface the
        source cannot supply, the mouth); ``TorchCompositor.composite``'s mask, every face at once."""
        blurred = blur_batched(poly[None, :, 0], np.maximum(self.feather_frac * iod, 0.5), sizes, "constant")[
            0
        ]
        ramp = ((blurred - 0.5) * 2.0).clamp(0.0, 1.0)
        mask = ramp * ramp * (3.0 - 2.0 * ramp)
        n_tris = len(self.topology.triangles)
        hidden = upload(np.stack([plan.hidden for plan in plans]).astype(np.float32).reshape(-1), self.device)
        face_rows = torch.arange(len(plans), device=self.device)[:, None, None] * n_tris
        keep_target = hidden[face_rows + tri_map.clamp(min=0)] * (tri_map >= 0)
        if self.mouth_mask != "off":
            keep_target = torch.maximum(keep_target, self._mouth_keep(plans, wins, tri_map, poly[:, 1], iod))
        keep_target = blur_batched(keep_target[None], np.maximum(0.04 * iod, 0.5), sizes, "reflect101")[0]
        return mask * (1.0 - (keep_target * 1.5).clamp(0.0, 1.0))

    def _rasterise(
        self,
        pts: np.ndarray,
        valid: torch.Tensor,
        wins: np.ndarray,
        shape_hw: tuple[int, int],
    ) -> torch.Tensor:
        """(F,Hm,Wm) int64 visible triangle per window pixel (-1 none): ``raster_torch.rasterise`` of every
        face at once. The host only rounds the vertices and sizes each triangle's pixel box (to lay out
        the pairs); the scan tables, the depth order and one scatter per pair budget run on the device."""
        hm, wm = shape_hw
        f, dev = len(pts), self.device
        tris = self.topology.triangles
        n_tris = len(tris)
        v16 = np.round((pts[..., :2].astype(np.float64) - wins[:, None, :2]) * (1 << _SHIFT_BITS))
        v16 = v16.astype(np.int64)
        size = (wins[:, 3:4] - wins[:, 1:2], wins[:, 2:3] - wins[:, 0:1])  # (F,1) each: broadcast per face
        boxes = pixel_boxes(v16[:, tris], size)  # (F,T,4)
        counts = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).reshape(-1)
        base = np.broadcast_to(np.arange(f)[:, None, None] * (hm * wm), (f, n_tris, 1))
        extra = np.concatenate([boxes[..., :2], boxes[..., 2:3] - boxes[..., :1], base], axis=2)
        scan = scan_tables_torch(upload(v16, dev)[:, self._tris].reshape(-1, 3, 2))
        # int32 halves the per-pair gather on CUDA, whose kernels widen it inline (the CPU would copy)
        narrow = torch.int32 if dev.type == "cuda" else torch.int64
        table = torch.cat([scan, upload(extra.reshape(-1, 4), dev)], dim=1).to(narrow)  # every value fits
        columns = table.T.contiguous()  # (36,R)
        # far first (cv2 fills far to near): a pixel keeps the highest draw rank that covers it
        depth = upload(-pts[..., 2][:, tris].mean(axis=2), dev)  # the per-face path's exact values
        order = torch.sort(depth, dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_tris, device=dev).expand(f, -1))
        rank = torch.where(valid, rank, -1).reshape(-1)
        out = torch.full((f * hm * wm,), -1, dtype=torch.int64, device=dev)
        for tri, k in pixel_pairs(counts, dev, _PAIRS_PER_SCATTER):
            t = _Gathered(columns, tri)
            width = t[_BOX_COL + 2]
            px = t[_BOX_COL] + k % width
            py = t[_BOX_COL + 1] + k // width
            values = torch.where(covers(t, px, py), rank[tri], -1)
            out.scatter_reduce_(0, t[_BOX_COL + 3] + py * wm + px, values, reduce="amax", include_self=True)
        out = out.view(f, hm * wm)
        drawn = torch.gather(order, 1, out.clamp(min=0))
        return torch.where(out >= 0, drawn, out).view(f, hm, wm)

    def _warp(
        self,
        plans: list[FacePlan],
        xy: torch.Tensor,
        valid: torch.Tensor,
        wins: np.ndarray,
        filled: torch.Tensor,
    ) -> torch.Tensor:
        """(3,F,H,W) grey levels: ``raster_torch.warp`` of every face, its triangle affines solved on the
        device, one grid_sample per source level (a pass is sorted by level, so a level is a slice)."""
        f, h, w = filled.shape
        dev = self.device
        src = upload(np.stack([plan.src_xy for plan in plans]).astype(np.float64), dev)[:, self._tris]
        dst = xy[:, self._tris]  # (F,T,3,2)
        d = torch.cat([dst, torch.ones_like(dst[..., :1])], dim=-1)  # rows (x, y, 1)
        d = torch.where(valid[..., None, None], d, torch.eye(3, dtype=d.dtype, device=dev))
        solved = torch.linalg.solve_ex(d, src).result  # (F,T,3,2); no error check, so no sync
        affines = torch.where(valid[..., None, None], solved.transpose(-1, -2), 0.0)
        table = affines.to(torch.float32).reshape(-1, 6)
        face_rows = torch.arange(f, device=dev)[:, None, None] * len(self._tris)
        coef = table[face_rows + filled.clamp(min=0)]  # (F,H,W,6)
        origin = upload(wins[:, :2].astype(np.float32), dev)
        xs = torch.arange(w, device=dev, dtype=torch.float32)[None, None, :] + origin[:, 0, None, None]
        ys = torch.arange(h, device=dev, dtype=torch.float32)[None, :, None] + origin[:, 1, None, None]
        map_x = coef[..., 0] * xs + coef[..., 1] * ys + coef[..., 2]
        map_y = coef[..., 3] * xs + coef[..., 4] * ys + coef[..., 5]
        warped = torch.empty((3, f, h, w), dtype=torch.float32, device=dev)
        levels = np.array([plan.level for plan in plans])
        for level in np.unique(levels).tolist():
            a, b = int(np.searchsorted(levels, level)), int(np.searchsorted(levels, level, side="right"))
            source = self.levels[level]
            hs, ws = source.shape[-2:]
            grid = torch.stack(
                [map_x[a:b] * (2.0 / max(ws - 1, 1)) - 1.0, map_y[a:b] * (2.0 / max(hs - 1, 1)) - 1.0], dim=-1
            )
            sampled = F.grid_sample(
                source,
                grid.view(1, (b - a) * h, w, 2),
                mode="bilinear",
                padding_mode="border",
                align_corners=True,
            )
            corner = source[0, :, :1, :1][:, None]  # (3,1,1,1)
            part = round_u8(sampled[0].view(3, b - a, h, w))
            warped[:, a:b] = torch.where((filled[a:b] < 0)[None], corner, part)
        return warped

    def _mouth_keep(
        self,
        plans: list[FacePlan],
        wins: np.ndarray,
        tri_map: torch.Tensor,
        lips: torch.Tensor,
        iod: np.ndarray,
    ) -> torch.Tensor:
        """(F,H,W) the target's mouth (its triangles and lip loop), dilated by each face's mouth margin.

        As ``TorchCompositor._mouth_keep``: only each face's box round its mouth points (plus its
        radius) is dilated, here all boxes at once in one padded stack.
        """
        f, h, w = tri_map.shape
        dev = self.device
        start, stop = self.topology.groups["mouth"]
        mouth = torch.maximum(((tri_map >= start) & (tri_map < stop)).to(torch.float32), lips)
        radii = np.array([max(1, round(self.mouth_margin_frac * v)) for v in iod.tolist()], np.int64)
        near = np.stack([plan.points[self._mouth_near, :2] for plan in plans]).astype(np.float64)
        near -= wins[:, None, :2]
        limit = np.stack([wins[:, 2] - wins[:, 0], wins[:, 3] - wins[:, 1]], axis=1)  # (w, h)
        lo = np.clip(np.floor(near.min(axis=1)) - 2 - radii[:, None], 0, limit).astype(np.int64)  # (x, y)
        hi = np.clip(np.ceil(near.max(axis=1)) + 3 + radii[:, None], 0, limit).astype(np.int64)
        hi = np.maximum(hi, lo)
        big = int(radii.max())
        box_h, box_w = int((hi - lo)[:, 1].max()), int((hi - lo)[:, 0].max())
        if box_h == 0 or box_w == 0:
            return torch.zeros_like(mouth)
        lo_t, hi_t = upload(lo[:, ::-1].copy(), dev), upload(hi[:, ::-1].copy(), dev)  # (y, x)
        crop = _read_shifted(mouth, lo_t - big, (box_h + 2 * big, box_w + 2 * big), lo_t, hi_t)
        grown = dilate_ellipses(crop, radii)
        back_lo = torch.full_like(lo_t, big)
        return _read_shifted(grown, big - lo_t, (h, w), back_lo, back_lo + (hi_t - lo_t))


def _match_colour(
    warped: torch.Tensor, target: torch.Tensor, region: torch.Tensor, sigmas: np.ndarray, sizes: torch.Tensor
) -> torch.Tensor:
    """``blend_torch.match_colour`` of every face of (3,F,H,W) stacks: statistics per face, each face's
    masked blurs with its own sigma (one 5-channel pass), no host sync."""
    _, f, h, w = warped.shape
    weight = (region > 0.5).to(torch.float32)
    count = weight.sum(dim=(1, 2))
    n = count.clamp(min=1.0)[:, None, None]
    src = rgb_to_lab((warped / 255.0).reshape(3, f * h, w)).view(3, f, h, w)
    tgt = rgb_to_lab((target / 255.0).reshape(3, f * h, w)).view(3, f, h, w)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return (x * weight).sum(dim=(1, 2), keepdim=True) / n

    src_mean, tgt_mean = mean(src[0]), mean(tgt[0])
    src_std = torch.sqrt(mean((src[0] - src_mean) ** 2))
    tgt_std = torch.sqrt(mean((tgt[0] - tgt_mean) ** 2))
    ratio = (tgt_std / src_std.clamp(min=1e-3)).clamp(0.5, 2.0)
    lum = ((src[0] - src_mean) * ratio + tgt_mean).clamp(0.0, 100.0)
    stacked = torch.cat([weight[None], src[1:] * weight, tgt[1:] * weight])  # (5,F,H,W)
    blurred = blur_batched(stacked, sigmas, sizes, "replicate")
    w_blur = blurred[0].clamp(min=1e-4)
    chroma = blurred[3:5] / w_blur + (src[1:] - blurred[1:3] / w_blur)
    lab = torch.cat([lum[None], chroma]).reshape(3, f * h, w)
    rgb = round_u8(lab_to_rgb(lab).view(3, f, h, w) * 255.0)
    return torch.where((count >= 16)[None, :, None, None], rgb, warped)
