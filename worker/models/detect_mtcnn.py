"""MTCNN face detector in plain torch on facenet-pytorch's shipped P/R/O-Net weights.

A re-implementation of facenet-pytorch 2.6.0's ``detect_face`` (which needs torchvision and pins
old torch/numpy): same pyramid, same stage thresholds, same NMS semantics, batched across frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ModelStoreError
from shared.model_store import require_file
from worker.models.faces import Face

STAGE_THRESHOLDS = (0.6, 0.7, 0.7)
PYRAMID_FACTOR = 0.709
# Groups of boxes this large go through the matrix NMS on a GPU (an n x n matrix each).
GPU_NMS_MIN = 64
GPU_NMS_MAX = 8192


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


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_max: float,
    *,
    by_min: bool = False,
    device: torch.device | None = None,
) -> np.ndarray:
    """Greedy NMS; ``by_min`` divides the overlap by the smaller area (MTCNN's last stage, +1 px areas).

    On a GPU, mid-sized groups use an exact matrix form of the same greedy pass (see below).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    if device is not None and device.type == "cuda" and GPU_NMS_MIN <= len(boxes) <= GPU_NMS_MAX:
        return nms_matrix(boxes, scores, iou_max, by_min, device)
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


def nms_matrix(
    boxes: np.ndarray, scores: np.ndarray, iou_max: float, by_min: bool, device: torch.device
) -> np.ndarray:
    """Greedy NMS as a fixed point: box i survives iff no surviving higher-scored box overlaps it.

    Iterating ``keep = not any(keep[j] and overlaps[j, i] for j before i)`` from all-kept reaches
    that unique solution (the greedy one) in as many steps as the longest suppression chain, each
    one matrix product on the GPU instead of one Python step per kept box.
    """
    order = np.argsort(-scores, kind="stable")
    b = torch.from_numpy(boxes[order].astype(np.float64)).to(device)
    x1, y1, x2, y2 = b.unbind(1)
    extra = 1.0 if by_min else 0.0
    area = (x2 - x1 + extra) * (y2 - y1 + extra)
    w = (torch.minimum(x2[:, None], x2[None]) - torch.maximum(x1[:, None], x1[None]) + extra).clamp(min=0)
    h = (torch.minimum(y2[:, None], y2[None]) - torch.maximum(y1[:, None], y1[None]) + extra).clamp(min=0)
    inter = w * h
    if by_min:
        overlap = inter / torch.minimum(area[:, None], area[None])
    else:
        overlap = inter / (area[:, None] + area[None] - inter)
    overlap = torch.nan_to_num(overlap, nan=float("inf"))  # numpy's "nan <= t" is False: suppressed
    suppresses = (overlap > iou_max).triu(1).float()  # [j, i]: j (higher score) suppresses i
    keep = torch.ones(len(order), device=device)
    for _ in range(len(order)):
        new = ((keep @ suppresses) == 0).float()
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep.bool().cpu().numpy()]


def batched_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    iou_max: float,
    *,
    by_min: bool = False,
    device: torch.device | None = None,
) -> np.ndarray:
    """NMS independently per group (image, or image and scale); indices sorted ascending.

    One greedy pass per group keeps the cost linear in the number of groups (frames in a batch).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    keep = [
        members[nms(boxes[members], scores[members], iou_max, by_min=by_min, device=device)]
        for members in (np.flatnonzero(groups == g) for g in np.unique(groups))
    ]
    return np.sort(np.concatenate(keep))


def area_resize_boxes(
    integral: torch.Tensor,
    image_inds: np.ndarray,
    x0: np.ndarray,
    y0: np.ndarray,
    x1: np.ndarray,
    y1: np.ndarray,
    size: int,
) -> torch.Tensor:
    """``F.interpolate(crop, (size, size), mode="area")`` of many crops at once, from an integral image.

    Area mode is adaptive average pooling: output bin i averages input rows
    [floor(i*h/size), ceil((i+1)*h/size)). ``integral`` is the (N,3,H+1,W+1) int64 summed-area
    table, so every bin is four look-ups, exact in integers, with no per-crop kernel launches.
    """
    dev = integral.device
    i = torch.arange(size, device=dev)

    def bins(start: np.ndarray, stop: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.from_numpy(start).to(dev)[:, None]
        n = torch.from_numpy(stop - start).to(dev)[:, None]
        first = lo + torch.div(i * n, size, rounding_mode="floor")
        last = lo + torch.div((i + 1) * n + size - 1, size, rounding_mode="floor")
        return first, last

    rs, re = bins(y0, y1)  # (K, size)
    cs, ce = bins(x0, x1)
    b = torch.from_numpy(image_inds).to(dev)[:, None, None]
    sat = integral.permute(0, 2, 3, 1)  # (N, H+1, W+1, 3)
    total = (
        sat[b, re[:, :, None], ce[:, None, :]]
        - sat[b, rs[:, :, None], ce[:, None, :]]
        - sat[b, re[:, :, None], cs[:, None, :]]
        + sat[b, rs[:, :, None], cs[:, None, :]]
    )  # (K, size, size, 3)
    count = ((re - rs)[:, :, None] * (ce - cs)[:, None, :])[..., None]
    return (total.float() / count.float()).permute(0, 3, 1, 2)


def _rerec(boxes: np.ndarray) -> np.ndarray:
    """Make boxes square around their centres (columns 0..3)."""
    out = boxes.copy()
    h = out[:, 3] - out[:, 1]
    w = out[:, 2] - out[:, 0]
    side = np.maximum(w, h)
    out[:, 0] = out[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = out[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _bbreg(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    w = out[:, 2] - out[:, 0] + 1
    h = out[:, 3] - out[:, 1] + 1
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


class MtcnnDetector:
    """Detects faces and 5 landmarks in batches of same-size RGB frames."""

    name = "mtcnn"

    def __init__(
        self,
        store: Path,
        device: torch.device | str,
        *,
        threshold: float = 0.9,
        min_face_px: int = 20,
        crop_batch: int = 1024,
    ) -> None:
        self.device = torch.device(device)
        self.threshold = threshold
        self.min_face_px = min_face_px
        self.crop_batch = crop_batch
        self.pnet, self.rnet, self.onet = load_mtcnn_nets(store, self.device)

    @torch.inference_mode()
    def detect(self, frames: np.ndarray) -> list[list[Face]]:
        """Faces per frame, largest first; ``frames`` is (N,H,W,3) uint8 RGB (or one (H,W,3) frame)."""
        if frames.ndim == 3:
            frames = frames[None]
        n, h, w = frames.shape[:3]
        if n == 0:
            return []
        raw = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        imgs = raw.permute(0, 3, 1, 2).float()

        boxes, image_inds = self._stage1(imgs, h, w)
        points = np.zeros((0, 5, 2), dtype=np.float64)
        if len(boxes):
            integral = F.pad(raw.permute(0, 3, 1, 2).long().cumsum(2).cumsum(3), (1, 0, 1, 0))
            boxes, image_inds = self._stage2(integral, boxes, image_inds, h, w)
            if len(boxes):
                boxes, image_inds, points = self._stage3(integral, boxes, image_inds, h, w)

        out: list[list[Face]] = [[] for _ in range(n)]
        for k in range(len(boxes)):
            if boxes[k, 4] < self.threshold:
                continue
            out[int(image_inds[k])].append(
                Face(
                    box=boxes[k, :4].astype(np.float32),
                    score=float(boxes[k, 4]),
                    landmarks=points[k].astype(np.float32),
                )
            )
        for faces in out:
            faces.sort(key=lambda f: -f.area_px)
        return out

    def _stage1(self, imgs: torch.Tensor, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        m = 12.0 / self.min_face_px
        min_side = min(h, w) * m
        scales: list[float] = []
        scale = m
        while min_side >= 12:
            scales.append(scale)
            scale *= PYRAMID_FACTOR
            min_side *= PYRAMID_FACTOR

        all_boxes: list[np.ndarray] = []
        all_inds: list[np.ndarray] = []
        for scale in scales:
            size = (int(h * scale + 1), int(w * scale + 1))
            data = (F.interpolate(imgs, size=size, mode="area") - 127.5) * 0.0078125
            reg, probs = self.pnet(data)
            boxes_s, inds_s = self._generate_boxes(reg, probs[:, 1], scale, STAGE_THRESHOLDS[0])
            pick = batched_nms(boxes_s[:, :4], boxes_s[:, 4], inds_s, 0.5, device=self.device)
            all_boxes.append(boxes_s[pick])
            all_inds.append(inds_s[pick])
        if not all_boxes:
            return np.zeros((0, 9)), np.zeros(0, dtype=np.int64)
        boxes = np.concatenate(all_boxes)
        inds = np.concatenate(all_inds)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7, device=self.device)
        boxes, inds = boxes[pick], inds[pick]

        regw = boxes[:, 2] - boxes[:, 0]
        regh = boxes[:, 3] - boxes[:, 1]
        refined = np.stack(
            [
                boxes[:, 0] + boxes[:, 5] * regw,
                boxes[:, 1] + boxes[:, 6] * regh,
                boxes[:, 2] + boxes[:, 7] * regw,
                boxes[:, 3] + boxes[:, 8] * regh,
                boxes[:, 4],
            ],
            axis=1,
        )
        return _rerec(refined), inds

    @staticmethod
    def _generate_boxes(
        reg: torch.Tensor, probs: torch.Tensor, scale: float, thresh: float
    ) -> tuple[np.ndarray, np.ndarray]:
        stride, cell = 2, 12
        mask = probs >= thresh
        idx = mask.nonzero()
        score = probs[mask]
        reg_sel = reg.permute(1, 0, 2, 3)[:, mask].permute(1, 0)
        bb = idx[:, 1:].to(reg.dtype).flip(1)  # (x, y) cell positions
        q1 = ((stride * bb + 1) / scale).floor()
        q2 = ((stride * bb + cell) / scale).floor()
        boxes = torch.cat([q1, q2, score[:, None], reg_sel], dim=1)
        return boxes.double().cpu().numpy(), idx[:, 0].cpu().numpy()

    def _crops(
        self, integral: torch.Tensor, boxes: np.ndarray, inds: np.ndarray, h: int, w: int, size: int
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Cut and area-resize each box (clipped to the frame, 1-based like the original)."""
        b = np.trunc(boxes[:, :4]).astype(np.int64)
        x = np.maximum(b[:, 0], 1)
        y = np.maximum(b[:, 1], 1)
        ex = np.minimum(b[:, 2], w)
        ey = np.minimum(b[:, 3], h)
        valid = (ey > y - 1) & (ex > x - 1)
        if not valid.any():
            return torch.zeros((0, 3, size, size), device=integral.device), valid
        parts = []
        idx = np.flatnonzero(valid)
        for start in range(0, len(idx), self.crop_batch):
            k = idx[start : start + self.crop_batch]
            parts.append(area_resize_boxes(integral, inds[k], x[k] - 1, y[k] - 1, ex[k], ey[k], size))
        return (torch.cat(parts) - 127.5) * 0.0078125, valid

    def _run_batched(self, net: nn.Module, data: torch.Tensor) -> list[np.ndarray]:
        outs: list[list[torch.Tensor]] = []
        for start in range(0, len(data), self.crop_batch):
            res = net(data[start : start + self.crop_batch])
            outs.append(list(res))
        return [torch.cat([o[i] for o in outs]).double().cpu().numpy() for i in range(len(outs[0]))]

    def _stage2(
        self, integral: torch.Tensor, boxes: np.ndarray, inds: np.ndarray, h: int, w: int
    ) -> tuple[np.ndarray, np.ndarray]:
        data, valid = self._crops(integral, boxes, inds, h, w, 24)
        boxes, inds = boxes[valid], inds[valid]
        if len(boxes) == 0:
            return boxes, inds
        reg, probs = self._run_batched(self.rnet, data)
        score = probs[:, 1]
        ok = score > STAGE_THRESHOLDS[1]
        boxes = np.concatenate([boxes[ok, :4], score[ok, None]], axis=1)
        inds, reg = inds[ok], reg[ok]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7, device=self.device)
        boxes, inds, reg = boxes[pick], inds[pick], reg[pick]
        return _rerec(_bbreg(boxes, reg)), inds

    def _stage3(
        self, integral: torch.Tensor, boxes: np.ndarray, inds: np.ndarray, h: int, w: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        data, valid = self._crops(integral, boxes, inds, h, w, 48)
        boxes, inds = boxes[valid], inds[valid]
        if len(boxes) == 0:
            return boxes, inds, np.zeros((0, 5, 2))
        reg, pts, probs = self._run_batched(self.onet, data)
        score = probs[:, 1]
        ok = score > STAGE_THRESHOLDS[2]
        boxes = np.concatenate([boxes[ok, :4], score[ok, None]], axis=1)
        inds, reg, pts = inds[ok], reg[ok], pts[ok]
        bw = boxes[:, 2] - boxes[:, 0] + 1
        bh = boxes[:, 3] - boxes[:, 1] + 1
        px = bw[:, None] * pts[:, :5] + boxes[:, 0:1] - 1
        py = bh[:, None] * pts[:, 5:10] + boxes[:, 1:2] - 1
        points = np.stack([px, py], axis=2)
        boxes = _bbreg(boxes, reg)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7, by_min=True, device=self.device)
        return boxes[pick], inds[pick], points[pick]
