"""The optional visible label (``--watermark``): a small "AI-GENERATED" box burnt into a corner.

Drawn after super-resolution, on the final pixels, so its size is the same fraction of every output
and it cannot be upscaled away. Pure and deterministic (OpenCV's Hershey font, no anti-aliasing):
the same frames always give the same bytes, so chunks rendered twice stay identical.
"""

from __future__ import annotations

import cv2
import numpy as np

WATERMARK_TEXT = "AI-GENERATED"
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT_HEIGHT_FRACTION = 0.045  # of the frame's shorter side
_MIN_TEXT_PX = 7


def watermark_box(
    width: int, height: int, text: str = WATERMARK_TEXT
) -> tuple[int, int, int, int, float, int]:
    """Where the label goes in a ``width``x``height`` frame: x0, y0, x1, y1, font scale, thickness."""
    text_px = max(_MIN_TEXT_PX, round(min(width, height) * _TEXT_HEIGHT_FRACTION))
    (unit_w, unit_h), _ = cv2.getTextSize(text, _FONT, 1.0, 1)
    scale = text_px / unit_h
    thickness = max(1, round(scale * 1.5))
    (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = max(2, text_px // 3)
    margin = max(2, text_px // 2)
    x1, y1 = width - margin, height - margin
    x0, y0 = max(0, x1 - text_w - 2 * pad), max(0, y1 - text_h - baseline - 2 * pad)
    return x0, y0, x1, y1, scale, thickness


def apply_watermark(frames: np.ndarray, text: str = WATERMARK_TEXT) -> np.ndarray:
    """``frames`` (N, H, W, 3) uint8 with a white-on-black ``text`` box in the bottom-right corner."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (N, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    height, width = frames.shape[1:3]
    x0, y0, x1, y1, scale, thickness = watermark_box(width, height, text)
    (_, text_h), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = (y1 - y0 - text_h - baseline) // 2
    out = np.ascontiguousarray(frames).copy()
    for frame in out:
        cv2.rectangle(frame, (x0, y0), (x1 - 1, y1 - 1), (0, 0, 0), thickness=-1)
        cv2.putText(
            frame, text, (x0 + pad, y1 - pad - baseline), _FONT, scale, (255, 255, 255), thickness, cv2.LINE_8
        )
    return out
