"""MTCNN face detector in plain torch on facenet-pytorch's shipped P/R/O-Net weights.

A re-implementation of facenet-pytorch 2.6.0's ``detect_face`` (which needs torchvision and pins
old torch/numpy): same pyramid, same stage thresholds, same NMS semantics, batched across frames.

Everything between the frames' upload and the final faces stays on the device: all pyramid scales
are launched back to back and every NMS runs for all groups at once (``GroupNms``), so the host
waits for the device four times per ``detect`` whatever the batch or pyramid size (five with very
many candidates), instead of after every scale and every NMS group (188 waits for 8 frames at 360p
before). On a GPU shared with other threads each such wait costs a GIL round trip of milliseconds.
The results are those of the one-scale-at-a-time host path, bit for bit (on the CPU; in the same
arithmetic on a GPU).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ModelStoreError
from shared.model_store import require_file
from worker.models.cuda_graphs import GraphedModule, shared_graphed
from worker.models.faces import Face

STAGE_THRESHOLDS = (0.6, 0.7, 0.7)
PYRAMID_FACTOR = 0.709
# One device NMS holds (boxes x window) pairs; beyond this many a call runs on the host (memory bound).
DEVICE_NMS_MAX_PAIRS = 1 << 26
# On the CPU nothing waits for a device, and numpy's greedy pass beats a large pair band.
CPU_NMS_MAX_PAIRS = 1 << 20
# Stage 1's cross-scale NMS spans all candidates without a sync up to this many pairs; beyond, it
# first reads how many survived the per-scale NMS (one more sync) and spans only those.
CROSS_NMS_BLIND_PAIRS = 1 << 25
# Pairs whose float64 overlaps are computed at once (bounds the temporaries to 32-64 MiB each).
_PAIR_CHUNK = 1 << 22
# Fixed-point steps queued per device NMS before the host looks (MTCNN's suppression chains are short).
NMS_STEPS = 8


class PNet(nn.Module):
    """Proposal net: fully convolutional, 12 px receptive field."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The weights come from caffe/TF: flatten in (W, H, C) order.
        x = x.permute(0, 3, 2, 1).contiguous().flatten(1)
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output net on 48x48 crops: box, 5 landmarks, probability."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous().flatten(1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def load_mtcnn_nets(store: Path, device: torch.device) -> tuple[PNet, RNet, ONet]:
    """Load the three nets from the model store (sha256-checked ``{p,r,o}net.pt``)."""
    nets: list[nn.Module] = []
    for name, net in (("pnet", PNet()), ("rnet", RNet()), ("onet", ONet())):
        path = require_file(Path(store), f"{name}.pt")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except Exception as exc:  # corrupt pickle, wrong keys or shapes
            raise ModelStoreError(
                f"MTCNN weights {path} cannot be loaded ({exc}); run 'facefarm models fetch --store {store}' again",
                path=str(path),
            ) from exc
        nets.append(net.to(device).eval())
    return nets[0], nets[1], nets[2]  # type: ignore[return-value]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_max: float, *, by_min: bool = False) -> np.ndarray:
    """Greedy NMS on the host; ``by_min`` divides the overlap by the smaller area (MTCNN's last stage, +1 px areas).

    The reference semantics: ``GroupNms`` computes the same on the device for many groups at once.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    extra = 1.0 if by_min else 0.0
    area = (x2 - x1 + extra) * (y2 - y1 + extra)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + extra)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + extra)
        inter = w * h
        if by_min:
            overlap = inter / np.minimum(area[i], area[rest])
        else:
            overlap = inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= iou_max]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, iou_max: float, *, by_min: bool = False
) -> np.ndarray:
    """NMS independently per group (image, or image and scale) on the host; indices sorted ascending."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    keep = [
        members[nms(boxes[members], scores[members], iou_max, by_min=by_min)]
        for members in (np.flatnonzero(groups == g) for g in np.unique(groups))
    ]
    return np.sort(np.concatenate(keep))


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array to the device without a sync: a blocking copy from pageable memory waits for the stream."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _fetch(*parts: torch.Tensor) -> list[np.ndarray]:
    """Several device tensors in one device-to-host copy: one sync, not one each (values as float64)."""
    flat = torch.cat([p.reshape(-1).to(torch.float64) for p in parts]).cpu().numpy()
    sizes = np.cumsum([p.numel() for p in parts])[:-1]
    return [a.reshape(p.shape) for a, p in zip(np.split(flat, sizes), parts, strict=True)]


def _nth_true(cumsum: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending indices of the ``count`` True entries behind ``cumsum``: ``nonzero`` without its sync."""
    return torch.searchsorted(cumsum, torch.arange(1, count + 1, device=cumsum.device))


def _per_image(image: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """How many entries of ``mask`` each of ``n`` images has, on the device."""
    return torch.zeros(n, dtype=torch.int64, device=image.device).index_add_(0, image, mask.long())


def _host_group_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor,
    active: torch.Tensor,
    iou_max: float,
    by_min: bool,
) -> torch.Tensor:
    """The host's ``batched_nms`` over the active boxes, as a device mask (pathological candidate counts)."""
    b, s, g, a = _fetch(boxes, scores, groups, active)
    members = np.flatnonzero(a)
    keep = np.zeros(len(b), dtype=bool)
    keep[
        members[batched_nms(b[members], s[members], g[members].astype(np.int64), iou_max, by_min=by_min)]
    ] = True
    return _to_device(keep, boxes.device)


def _suppression_band(
    boxes: torch.Tensor, groups: torch.Tensor, window: int, iou_max: float, by_min: bool
) -> torch.Tensor:
    """(n, window) bool: [p, c] is True iff box p - window + c, of p's group, overlaps box p over ``iou_max``.

    ``boxes`` (float64) and ``groups`` are in suppression order. The arithmetic is ``nms``'s, operation
    for operation in float64, so every comparison with ``iou_max`` comes out the same.
    """
    n = len(boxes)
    extra = 1.0 if by_min else 0.0
    x1, y1, x2, y2 = boxes[:, :4].unbind(1)
    area = (x2 - x1 + extra) * (y2 - y1 + extra)
    values = torch.cat([boxes[:, :4], area[:, None]], 1)  # x1, y1, x2, y2, area
    padded = torch.cat([values.new_zeros(window, 5), values])
    padded_groups = torch.cat([groups.new_full((window,), -1), groups])
    band = torch.empty((n, window), dtype=torch.bool, device=boxes.device)
    rows = max(1, _PAIR_CHUNK // window)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        prev = padded[r0 : r1 + window - 1].unfold(0, window, 1)  # (rows, 5, window): the earlier boxes
        cur = values[r0:r1, :, None]
        wh = torch.minimum(prev[:, 2:4], cur[:, 2:4]).sub_(torch.maximum(prev[:, 0:2], cur[:, 0:2]))
        if by_min:
            wh += extra
        wh.clamp_(min=0.0)
        inter = wh[:, 0] * wh[:, 1]
        if by_min:
            overlap = inter.div_(torch.minimum(prev[:, 4], cur[:, 4]))
        else:
            overlap = inter / (prev[:, 4] + cur[:, 4]).sub_(inter)
        same = padded_groups[r0 : r1 + window - 1].unfold(0, window, 1) == groups[r0:r1, None]
        # "not <=" rather than ">": a NaN overlap (0/0) suppresses, as numpy's filter does in nms.
        band[r0:r1] = (overlap <= iou_max).logical_not_().logical_and_(same)
    return band


class GroupNms:
    """Exact greedy NMS of many groups at once on the device, queued without host syncs.

    Boxes are sorted by (group, score descending, index): ``nms``'s stable order inside each group,
    so the possible suppressors of a box are the ``window`` boxes just before it. A box survives iff
    it is active and no surviving earlier box of its group overlaps it more than ``iou_max``;
    iterating that rule from "every active box survives" reaches its unique solution, the greedy
    one, in as many steps as the longest suppression chain (a few in MTCNN). Steps are queued blind:
    ``converged`` is a device flag for the caller's next sync, and ``settle`` finishes a longer chain.
    Bands over ``DEVICE_NMS_MAX_PAIRS`` pairs (``CPU_NMS_MAX_PAIRS`` on the CPU) run ``batched_nms`` instead.
    """

    def __init__(
        self,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        groups: torch.Tensor,
        active: torch.Tensor | None,
        iou_max: float,
        *,
        by_min: bool = False,
        max_group: int,
    ) -> None:
        n = len(boxes)
        dev = boxes.device
        active = torch.ones(n, dtype=torch.bool, device=dev) if active is None else active
        self.window = max(int(max_group) - 1, 0)
        self.converged = torch.ones((), dtype=torch.bool, device=dev)
        self._keep: torch.Tensor | None = active
        if self.window == 0:
            return
        if n * self.window > (CPU_NMS_MAX_PAIRS if dev.type == "cpu" else DEVICE_NMS_MAX_PAIRS):
            self._keep = _host_group_nms(boxes, scores, groups, active, iou_max, by_min)
            self.window = 0
            return
        order = torch.sort(scores, descending=True, stable=True).indices
        self._order = order[torch.sort(groups[order], stable=True).indices]
        self._active = active[self._order]
        # kept[window + p]: does box p (in suppression order) survive; the front padding never does.
        self._kept = torch.cat([torch.zeros(self.window, dtype=torch.bool, device=dev), self._active])
        self._band = _suppression_band(
            boxes[self._order].double(), groups[self._order], self.window, iou_max, by_min
        )

    def step(self, steps: int | None = None) -> GroupNms:
        """Queue ``steps`` fixed-point steps (``NMS_STEPS``); ``converged``: the last one changed nothing."""
        if self.window == 0:
            return self
        w = self.window
        kept = self._kept[w:]
        before = self._kept.unfold(0, w, 1)[: len(kept)]  # [p, c]: does box p - w + c survive
        for _ in range((NMS_STEPS if steps is None else steps) - 1):
            torch.gt(self._active, (self._band & before).any(1), out=kept)
        new = torch.gt(self._active, (self._band & before).any(1))
        self.converged = (new == kept).all()
        kept.copy_(new)
        self._keep = None
        return self

    def settle(self) -> None:
        """Step until converged, reading the flag each time: only for chains longer than the queued steps."""
        while not bool(self.converged):
            self.step()

    def keep(self) -> torch.Tensor:
        """The survivors as a mask in the input order (final once ``converged``)."""
        if self._keep is None:
            kept = self._kept[self.window :]
            self._keep = torch.zeros_like(kept)
            self._keep[self._order] = kept
        return self._keep


def area_resize_boxes(
    integral: torch.Tensor,
    image_inds: torch.Tensor,
    x0: torch.Tensor,
    y0: torch.Tensor,
    x1: torch.Tensor,
    y1: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """``F.interpolate(crop, (size, size), mode="area")`` of many crops at once, from an integral image.

    Area mode is adaptive average pooling: output bin i averages input rows
    [floor(i*h/size), ceil((i+1)*h/size)). ``integral`` is the (N,3,H+1,W+1) summed-area table
    (``integral_image``), so every bin is four look-ups, exact in integers, with no per-crop kernel
    launches. The crop corners are int64 tensors on ``integral``'s device.
    """
    i = torch.arange(size, device=integral.device)

    def bins(start: torch.Tensor, stop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = start[:, None]
        n = (stop - start)[:, None]
        first = lo + torch.div(i * n, size, rounding_mode="floor")
        last = lo + torch.div((i + 1) * n + size - 1, size, rounding_mode="floor")
        return first, last

    rs, re = bins(y0, y1)  # (K, size)
    cs, ce = bins(x0, x1)
    b = image_inds[:, None, None]
    sat = integral.permute(0, 2, 3, 1)  # (N, H+1, W+1, 3)
    total = (
        sat[b, re[:, :, None], ce[:, None, :]]
        - sat[b, rs[:, :, None], ce[:, None, :]]
        - sat[b, re[:, :, None], cs[:, None, :]]
        + sat[b, rs[:, :, None], cs[:, None, :]]
    )  # (K, size, size, 3)
    count = ((re - rs)[:, :, None] * (ce - cs)[:, None, :])[..., None]
    return (total.float() / count.float()).permute(0, 3, 1, 2)


def integral_image(raw: torch.Tensor) -> torch.Tensor:
    """The (N,3,H+1,W+1) summed-area table of (N,H,W,3) uint8 frames, zero first row and column: int32
    wherever a frame's sum fits (1080p and 4K do), which halves the look-ups' bytes; else int64."""
    n, h, w, _ = raw.shape
    dtype = torch.int32 if 255 * h * w < 2**31 else torch.int64
    return F.pad(raw.permute(0, 3, 1, 2).cumsum(2, dtype=dtype).cumsum(3, dtype=dtype), (1, 0, 1, 0))


def area_resize_full(integral: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(images, size, mode="area")`` of whole images from their (N,3,H+1,W+1) integral
    image (``integral_image``): every bin's sum from four look-ups, exact in integers, then divided by
    the bin's height and then its width, as PyTorch's adaptive average pooling divides. Bins of uint8
    images sum exactly in float32 below 2^24, so the result equals the pooling's bit for bit (tests)."""
    h, w = integral.shape[2] - 1, integral.shape[3] - 1
    device = integral.device

    def bins(length: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.arange(count, device=device)
        return (
            torch.div(i * length, count, rounding_mode="floor"),
            torch.div((i + 1) * length + count - 1, count, rounding_mode="floor"),
        )

    rs, re = bins(h, size[0])
    cs, ce = bins(w, size[1])
    rows_end, rows_start = integral[:, :, re], integral[:, :, rs]  # (N,3,oh,W+1)
    total = rows_end[..., ce] - rows_start[..., ce] - rows_end[..., cs] + rows_start[..., cs]
    return total.float() / (re - rs).float()[:, None] / (ce - cs).float()


def crop_bounds(
    boxes: torch.Tensor, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """0-based crop corners x0, y0, x1, y1 of float boxes clipped to the frame, and which crops are non-empty.

    Truncated toward zero and 1-based like the original MATLAB code.
    """
    b = boxes[:, :4].trunc().long()
    x = b[:, 0].clamp(min=1)
    y = b[:, 1].clamp(min=1)
    ex = b[:, 2].clamp(max=w)
    ey = b[:, 3].clamp(max=h)
    return x - 1, y - 1, ex, ey, (ey > y - 1) & (ex > x - 1)


def rerec(boxes: torch.Tensor) -> torch.Tensor:
    """Make boxes square around their centres (columns 0..3; other columns kept)."""
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.cat([torch.stack([x1, y1, x1 + side, y1 + side], 1), boxes[:, 4:]], 1)


def bbreg(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Move box edges by the regression outputs, in units of the (+1 px) box size."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    edges = torch.stack(
        [
            boxes[:, 0] + reg[:, 0] * w,
            boxes[:, 1] + reg[:, 1] * h,
            boxes[:, 2] + reg[:, 2] * w,
            boxes[:, 3] + reg[:, 3] * h,
        ],
        1,
    )
    return torch.cat([edges, boxes[:, 4:]], 1)


def pyramid_scales(h: int, w: int, min_face_px: int) -> list[float]:
    """P-Net's image pyramid: scales from ``12 / min_face_px`` down while the short side stays >= 12 px."""
    m = 12.0 / min_face_px
    min_side = min(h, w) * m
    scales: list[float] = []
    scale = m
    while min_side >= 12:
        scales.append(scale)
        scale *= PYRAMID_FACTOR
        min_side *= PYRAMID_FACTOR
    return scales


def pnet_map_size(size: tuple[int, int]) -> tuple[int, int]:
    """P-Net's output cells for an input of ``size``: 3x3 conv, 2x2 max-pool (ceil), two 3x3 convs."""
    return ((size[0] - 1) // 2 - 4, (size[1] - 1) // 2 - 4)


def pnet_pyramid(
    pnet: nn.Module, level: Callable[[tuple[int, int]], torch.Tensor], scales: list[float], h: int, w: int
) -> torch.Tensor:
    """P-Net over every pyramid level of (h, w) frames (``level(size)``: the frames area-resized to
    ``size``, float NCHW), launched back to back: (5, cells) box regression x1, y1, x2, y2 and face
    probability, cells in (scale, image, y, x) order (``PyramidCells``)."""
    maps: list[torch.Tensor] = []
    for scale in scales:
        data = (level((int(h * scale + 1), int(w * scale + 1))) - 127.5) * 0.0078125
        reg, probs = pnet(data)
        maps.append(torch.cat([reg, probs[:, 1:]], 1).transpose(0, 1).reshape(5, -1))
    return torch.cat(maps, 1)


class PyramidStage(nn.Module):
    """Stage 1's fixed-shape half on (N,H,W,3) uint8 frames: the (N,3,H+1,W+1) integral image (which
    stages 2 and 3 crop from), P-Net's (5, cells) values over the pyramid levels cut from it
    (``area_resize_full``), and the running count of cells over stage 1's threshold.

    Every shape in here follows from the batch's, and nothing reads the host, so the render worker
    replays it from one CUDA graph per batch shape (``cuda_graphs``): ~600 ops a 1080p batch of 8.
    """

    def __init__(self, pnet: nn.Module, min_face_px: int) -> None:
        super().__init__()
        self.pnet = pnet
        self.min_face_px = min_face_px

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        integral = integral_image(raw)
        scales = pyramid_scales(raw.shape[1], raw.shape[2], self.min_face_px)
        level = functools.partial(area_resize_full, integral)
        values = pnet_pyramid(self.pnet, level, scales, raw.shape[1], raw.shape[2])
        return integral, values, (values[4] >= STAGE_THRESHOLDS[0]).cumsum(0)


@dataclass
class Candidates:
    """Boxes between stages, on the device: (k, 5) float64 x1,y1,x2,y2,score, their images, per-image counts."""

    boxes: torch.Tensor
    image: torch.Tensor
    per_image: np.ndarray

    @classmethod
    def select(
        cls, boxes: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, per_image: np.ndarray
    ) -> Candidates:
        """The entries of ``mask`` (whose per-image counts the host already read), order kept."""
        idx = _nth_true(mask.cumsum(0), int(per_image.sum()))
        return cls(boxes[idx], image[idx], per_image.astype(np.int64))


def _pyramid_nms(
    boxes: torch.Tensor,
    score: torch.Tensor,
    scale_idx: torch.Tensor,
    image: torch.Tensor,
    counts: np.ndarray,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, np.ndarray]:
    """Stage 1's NMS: 0.5 per (scale, image), then 0.7 per image across scales, over all candidates at once.

    Returns the survivors that are also ``valid`` and their count per image, read in one sync. The
    cross-scale pass runs blind over every candidate (the per-scale pass's losers inactive) unless
    that band would exceed ``CROSS_NMS_BLIND_PAIRS``: then one more sync first counts the per-scale
    survivors, and the band spans only them.
    """
    n = counts.shape[1]
    per_scale = GroupNms(boxes, score, scale_idx * n + image, None, 0.5, max_group=int(counts.max())).step()

    def cross_scale() -> tuple[GroupNms, torch.Tensor | None]:
        if len(boxes) * int(counts.sum(0).max()) <= CROSS_NMS_BLIND_PAIRS:
            active = per_scale.keep()
            return GroupNms(boxes, score, image, active, 0.7, max_group=int(counts.sum(0).max())).step(), None
        flag, alive = _fetch(per_scale.converged, _per_image(image, per_scale.keep(), n))
        if not flag:
            per_scale.settle()
            (alive,) = _fetch(_per_image(image, per_scale.keep(), n))
        idx = _nth_true(per_scale.keep().cumsum(0), int(alive.sum()))
        return GroupNms(boxes[idx], score[idx], image[idx], None, 0.7, max_group=int(alive.max())).step(), idx

    def survivors(cross: GroupNms, idx: torch.Tensor | None) -> torch.Tensor:
        if idx is None:
            return cross.keep() & valid
        keep = torch.zeros_like(valid)
        keep[idx] = cross.keep()
        return keep & valid

    cross, idx = cross_scale()
    keep = survivors(cross, idx)
    flags, per_image = _fetch(torch.stack([per_scale.converged, cross.converged]), _per_image(image, keep, n))
    if not flags.all():  # a suppression chain longer than NMS_STEPS: finish step by step
        if not flags[0]:
            per_scale.settle()
            cross, idx = cross_scale()
        cross.settle()
        keep = survivors(cross, idx)
        (per_image,) = _fetch(_per_image(image, keep, n))
    return keep, per_image


class PyramidCells:
    """P-Net's outputs for every (scale, image, y, x) cell of a batch, flattened in that order.

    ``values`` is (5, cells): box regression x1, y1, x2, y2 and face probability. The corners of a
    cell's box are computed per scale exactly as facenet-pytorch does (a float32 division by the
    scale), into small tables that ``boxes`` gathers from.
    """

    def __init__(
        self, values: torch.Tensor, scales: list[float], shapes: list[tuple[int, int]], n: int
    ) -> None:
        dev = values.device
        self.values = values
        v = torch.arange(max(max(s) for s in shapes), device=dev, dtype=values.dtype)
        base = torch.stack([2 * v + 1, 2 * v + 12])  # stride 2, cell 12 px
        self.corners = torch.stack(
            [base / scale for scale in scales]
        ).floor_()  # (scale, start/end, position)
        hw = np.array([hs * ws for hs, ws in shapes], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(n * hw)])
        ws = np.array([s[1] for s in shapes], dtype=np.int64)
        ends = (starts[:-1, None] + hw[:, None] * np.arange(1, n + 1)).reshape(-1)
        meta = _to_device(np.concatenate([starts, ws, hw, ends]), dev)
        k = len(scales)
        self._starts, self._ws, self._hw = meta[:k], meta[k + 1 : 2 * k + 1], meta[2 * k + 1 : 3 * k + 1]
        self._scale_ends = meta[1 : k + 1]
        self.group_ends = meta[3 * k + 1 :]  # one past the last cell of each (scale, image)

    def boxes(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, 4) float64 boxes, scale indices and images of the cells at ``flat`` indices."""
        s = torch.bucketize(flat, self._scale_ends, right=True)
        local = flat - self._starts[s]
        image = torch.div(local, self._hw[s], rounding_mode="floor")
        rest = local - image * self._hw[s]
        y = torch.div(rest, self._ws[s], rounding_mode="floor")
        x = rest - y * self._ws[s]
        cx, cy = self.corners[s, :, x], self.corners[s, :, y]  # (k, start/end)
        return torch.stack([cx[:, 0], cy[:, 0], cx[:, 1], cy[:, 1]], 1).double(), s, image


class MtcnnDetector:
    """Detects faces and 5 landmarks in batches of same-size RGB frames.

    All candidates of all frames and pyramid scales stay on the device between stages; the host
    reads a few counts between stages (four device-to-host syncs per ``detect``, whatever the batch).
    The crops go through R-Net and O-Net in the same ``crop_batch`` chunks as ever, so their sums
    and results stay the same.
    """

    name = "mtcnn"

    def __init__(
        self,
        store: Path,
        device: torch.device | str,
        *,
        threshold: float = 0.9,
        min_face_px: int = 20,
        crop_batch: int = 1024,
        cuda_graph: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.threshold = threshold
        self.min_face_px = min_face_px
        self.crop_batch = crop_batch
        self.pnet, self.rnet, self.onet = load_mtcnn_nets(store, self.device)
        self._pyramid = PyramidStage(self.pnet, min_face_px)
        # One graphed stage per process and store: each chunk's engine builds its own detector, and
        # the graphs (~1 GiB of device memory each at 1080p x 8) are captured once, not once a chunk.
        self._graphed: GraphedModule | None = None
        if cuda_graph and self.device.type == "cuda":
            key = ("mtcnn-pyramid", str(Path(store).resolve()), str(self.device), str(min_face_px))
            self._graphed = shared_graphed(key, lambda: self._pyramid)
        self._cell_tables: dict[tuple[int, tuple[tuple[int, int], ...]], PyramidCells] = {}

    @torch.inference_mode()
    def detect(self, frames: np.ndarray, on_device: torch.Tensor | None = None) -> list[list[Face]]:
        """Faces per frame, largest first; ``frames`` is (N,H,W,3) uint8 RGB (or one (H,W,3) frame).

        ``on_device``: the same frames already on the device (``FramesOnDevice``), so they go up once.
        """
        if frames.ndim == 3:
            frames = frames[None]
        n, h, w = frames.shape[:3]
        if n == 0:
            return []
        out: list[list[Face]] = [[] for _ in range(n)]
        scales = pyramid_scales(h, w, self.min_face_px)
        if not scales:
            return out
        raw = _to_device(frames, self.device) if on_device is None else on_device
        integral, values, cumsum = self._pyramid_stage(raw)
        found = self._stage1(values, cumsum, scales, n, h, w)
        if found is None:
            return out
        integral = integral_image(raw) if integral is None else integral
        found = self._stage2(integral, found, h, w)
        if found is None:
            return out
        for row in self._stage3(integral, found, h, w):
            if row[4] < self.threshold:
                continue
            out[int(row[15])].append(
                Face(
                    box=row[:4].astype(np.float32),
                    score=float(row[4]),
                    landmarks=np.stack([row[5:10], row[10:15]], axis=1).astype(np.float32),
                )
            )
        for faces in out:
            faces.sort(key=lambda f: -f.area_px)
        return out

    def _pyramid_stage(self, raw: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Stage 1's fixed-shape half: (integral image or None, P-Net's (5, cells) values, the running
        count of cells over stage 1's threshold).

        On CUDA from the integral image (which stages 2 and 3 read too), replayed from a CUDA graph per
        batch shape when ``cuda_graph`` is set (``PyramidStage``); on the CPU the pyramid comes from
        adaptive pooling, the faster of the two there, and the integral image is made only if stage 1
        finds faces.
        """
        if raw.is_cuda:
            if self._graphed is not None:
                integral, values, cumsum = self._graphed(raw)
                return integral, values, cumsum
            return self._pyramid(raw)
        imgs = raw.permute(0, 3, 1, 2).float()
        n, h, w = raw.shape[:3]
        level = functools.partial(F.interpolate, imgs, mode="area")
        values = pnet_pyramid(self.pnet, level, pyramid_scales(h, w, self.min_face_px), h, w)
        return None, values, (values[4] >= STAGE_THRESHOLDS[0]).cumsum(0)

    def _stage1(
        self, values: torch.Tensor, cumsum: torch.Tensor, scales: list[float], n: int, h: int, w: int
    ) -> Candidates | None:
        """From P-Net's values over the whole pyramid (``_pyramid_stage``): the candidates, then
        per-(image, scale) NMS 0.5 and per-image NMS 0.7: two syncs."""
        shapes = [pnet_map_size((int(h * scale + 1), int(w * scale + 1))) for scale in scales]
        cells = self._cells(values, scales, shapes, n)
        (at_ends,) = _fetch(cumsum[cells.group_ends - 1])  # sync 1: candidates per (scale, image)
        counts = np.diff(at_ends.astype(np.int64), prepend=0).reshape(len(scales), n)
        if counts.sum() == 0:
            return None
        flat = _nth_true(cumsum, int(counts.sum()))
        boxes, scale_idx, image = cells.boxes(flat)
        reg = cells.values[:4, flat].T.double()
        score = cells.values[4, flat]
        regw = boxes[:, 2] - boxes[:, 0]
        regh = boxes[:, 3] - boxes[:, 1]
        edges = [boxes[:, i] + reg[:, i] * (regw if i % 2 == 0 else regh) for i in range(4)]
        refined = rerec(torch.stack([*edges, score.double()], 1))
        valid = crop_bounds(refined, h, w)[4]

        keep, per_image = _pyramid_nms(boxes, score, scale_idx, image, counts, valid)  # sync 2 (3 if many)
        if per_image.sum() == 0:
            return None
        return Candidates.select(refined, image, keep, per_image)

    def _cells(
        self, values: torch.Tensor, scales: list[float], shapes: list[tuple[int, int]], n: int
    ) -> PyramidCells:
        """``PyramidCells`` of ``values``, its tables (corners, offsets) made once per batch shape."""
        key = (n, tuple(shapes))
        tables = self._cell_tables.get(key)
        if tables is None:
            tables = self._cell_tables[key] = PyramidCells(values, scales, shapes, n)
        cells = copy.copy(tables)
        cells.values = values
        return cells

    def _stage2(self, integral: torch.Tensor, cand: Candidates, h: int, w: int) -> Candidates | None:
        """R-Net on every candidate's crop, then per-image NMS 0.7: one sync."""
        reg, probs = self._run_batched(self.rnet, self._crops(integral, cand, h, w, 24))
        score = probs[:, 1].double()
        boxes = torch.cat([cand.boxes[:, :4], score[:, None]], 1)
        ok = score > STAGE_THRESHOLDS[1]
        nms = GroupNms(boxes, score, cand.image, ok, 0.7, max_group=int(cand.per_image.max())).step()
        refined = rerec(bbreg(boxes, reg.double()))
        valid = crop_bounds(refined, h, w)[4]
        n = len(cand.per_image)
        flag, per_image = _fetch(nms.converged, _per_image(cand.image, nms.keep() & valid, n))  # sync 3
        if not flag:
            nms.settle()
            (per_image,) = _fetch(_per_image(cand.image, nms.keep() & valid, n))
        if per_image.sum() == 0:
            return None
        return Candidates.select(refined, cand.image, nms.keep() & valid, per_image)

    def _stage3(self, integral: torch.Tensor, cand: Candidates, h: int, w: int) -> np.ndarray:
        """O-Net on every candidate's crop, then per-image NMS 0.7 over the smaller area: one sync.

        Host rows of the survivors: x1, y1, x2, y2, score, 5 landmark x, 5 landmark y, image.
        """
        reg, pts, probs = self._run_batched(self.onet, self._crops(integral, cand, h, w, 48))
        score = probs[:, 1].double()
        b = cand.boxes
        pts = pts.double()
        px = (b[:, 2] - b[:, 0] + 1)[:, None] * pts[:, :5] + b[:, 0:1] - 1
        py = (b[:, 3] - b[:, 1] + 1)[:, None] * pts[:, 5:10] + b[:, 1:2] - 1
        boxes = bbreg(torch.cat([b[:, :4], score[:, None]], 1), reg.double())
        ok = score > STAGE_THRESHOLDS[2]
        nms = GroupNms(
            boxes, score, cand.image, ok, 0.7, by_min=True, max_group=int(cand.per_image.max())
        ).step()
        rows = torch.cat([boxes, px, py, cand.image[:, None].double()], 1)
        flag, keep, host_rows = _fetch(nms.converged, nms.keep(), rows)  # sync 4
        if not flag:
            nms.settle()
            (keep,) = _fetch(nms.keep())
        return host_rows[keep.astype(bool)]

    def _crops(self, integral: torch.Tensor, cand: Candidates, h: int, w: int, size: int) -> torch.Tensor:
        """Area-resized crops of every candidate (none is empty: ``Candidates.select`` dropped those)."""
        x0, y0, x1, y1, _ = crop_bounds(cand.boxes, h, w)
        step = self.crop_batch
        parts = [
            area_resize_boxes(integral, cand.image[k : k + step], x0[k : k + step], y0[k : k + step],
                              x1[k : k + step], y1[k : k + step], size)
            for k in range(0, len(x0), step)
        ]  # fmt: skip
        return (torch.cat(parts) - 127.5) * 0.0078125

    def _run_batched(self, net: nn.Module, data: torch.Tensor) -> list[torch.Tensor]:
        """The net in chunks of ``crop_batch`` (the same batches as always, so the same kernels and sums)."""
        outs = [list(net(data[k : k + self.crop_batch])) for k in range(0, len(data), self.crop_batch)]
        return [torch.cat([o[i] for o in outs]) for i in range(len(outs[0]))]
