"""Face alignment and paste-back: 5-point similarity warps, feathered masks, colour transfer.

Pure numpy/cv2 so every swapper (classic, inswapper, mesh fallback) pastes faces back the same way
and keeps pixels outside the mask bit-identical.
"""

from __future__ import annotations

import cv2
import numpy as np

# insightface's ArcFace 112x112 template (left eye, right eye, nose, left mouth, right mouth).
ARCFACE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
# Masks below this weight are treated as zero, so the paste-back never touches those pixels.
MASK_EPS = 1.0 / 512.0


def arcface_template(size_px: int) -> np.ndarray:
    """The 5-point template for a square crop, as insightface's ``estimate_norm`` builds it.

    Sizes divisible by 112 scale the 112 template; others (128, 256, ...) use ratio size/128 and
    shift x by 8*ratio.
    """
    if size_px % 112 == 0:
        return ARCFACE_112 * (size_px / 112.0)
    ratio = size_px / 128.0
    return ARCFACE_112 * ratio + np.array([8.0 * ratio, 0.0])


def estimate_similarity(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src to dst (Umeyama).

    Returns the (2,3) affine matrix; the same result as skimage's ``SimilarityTransform.estimate``.
    """
    src = np.asarray(src_pts, dtype=np.float64)
    dst = np.asarray(dst_pts, dtype=np.float64)
    n = src.shape[0]
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    cov = dst_c.T @ src_c / n
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1
    u, s, vt = np.linalg.svd(cov)
    rot = u @ np.diag(d) @ vt
    var_src = src_c.var(axis=0).sum()
    scale = (s @ d) / var_src if var_src > 0 else 1.0
    t = dst_mean - scale * (rot @ src_mean)
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = t
    return m


def align_matrix(landmarks: np.ndarray, size_px: int) -> np.ndarray:
    """The (2,3) matrix taking frame pixels to the ArcFace-aligned crop of ``size_px``."""
    return estimate_similarity(landmarks, arcface_template(size_px))


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a (2,3) affine matrix."""
    return cv2.invertAffineTransform(np.asarray(m, dtype=np.float64))


def warp_face(
    image: np.ndarray, landmarks: np.ndarray, size_px: int, *, replicate_border: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The aligned square crop and the matrix that made it (frame -> crop).

    Networks trained on insightface crops (ArcFace, inswapper) expect black outside the frame
    (``replicate_border=False``); blending prefers replicated edges.
    """
    m = align_matrix(landmarks, size_px)
    border = cv2.BORDER_REPLICATE if replicate_border else cv2.BORDER_CONSTANT
    crop = cv2.warpAffine(
        image, m, (size_px, size_px), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0
    )
    return crop, m


def crop_size_for(landmarks: np.ndarray, *, min_px: int = 112, max_px: int = 512, step_px: int = 16) -> int:
    """A crop size that keeps the target face at (about) its native resolution."""
    eye_dist = float(np.linalg.norm(np.asarray(landmarks[1]) - np.asarray(landmarks[0])))
    template_eye_dist = float(ARCFACE_112[1, 0] - ARCFACE_112[0, 0])
    size = 112.0 * eye_dist / template_eye_dist
    size = int(np.ceil(size / step_px) * step_px)
    return int(np.clip(size, min_px, max_px))


def face_mask(size_px: int, *, blur_frac: float = 0.035) -> np.ndarray:
    """Feathered elliptical inner-face mask in ArcFace-aligned crop space, exactly 0 at the borders.

    The ellipse spans brows to chin and cheek to cheek of the 112 template; its top stays below the
    hairline so the source's hair does not come along.
    """
    s = size_px / 112.0
    mask = np.zeros((size_px, size_px), dtype=np.float32)
    center = (int(round(56.0 * s)), int(round(64.0 * s)))
    axes = (int(round(30.0 * s)), int(round(34.0 * s)))
    cv2.ellipse(mask, center, axes, 0, 0, 360, 1.0, thickness=-1)
    return _feather(mask, blur_frac * size_px)


def _feather(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian feather that reaches exactly 0 at the crop border (so the paste-back has no seam)."""
    sigma = max(sigma_px, 0.5)
    ksize = 2 * int(np.ceil(3 * sigma)) + 1
    mask = cv2.GaussianBlur(mask, (ksize, ksize), sigma, borderType=cv2.BORDER_CONSTANT)
    mask[mask < MASK_EPS] = 0.0
    mask[0, :] = mask[-1, :] = 0.0
    mask[:, 0] = mask[:, -1] = 0.0
    return mask


def square_mask(size_px: int, *, erode_frac: float = 0.1, blur_frac: float = 0.05) -> np.ndarray:
    """insightface-style paste mask: the whole crop, eroded and blurred (for generated 128 px faces)."""
    mask = np.zeros((size_px, size_px), dtype=np.float32)
    margin = max(int(round(erode_frac * size_px)), 1)
    mask[margin:-margin, margin:-margin] = 1.0
    return _feather(mask, blur_frac * size_px)


def transfer_colour_lab(source: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shift ``source``'s LAB mean/std inside ``mask`` to ``target``'s; returns uint8 RGB."""
    weights = mask > 0.5
    if int(weights.sum()) < 16:
        return source
    src_lab = cv2.cvtColor(source.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    tgt_lab = cv2.cvtColor(target.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    src_px = src_lab[weights]
    tgt_px = tgt_lab[weights]
    src_mu, src_sd = src_px.mean(axis=0), src_px.std(axis=0)
    tgt_mu, tgt_sd = tgt_px.mean(axis=0), tgt_px.std(axis=0)
    ratio = np.clip(tgt_sd / np.maximum(src_sd, 1e-3), 0.5, 2.0)
    out = (src_lab - src_mu) * ratio + tgt_mu
    out[..., 0] = np.clip(out[..., 0], 0.0, 100.0)
    rgb = cv2.cvtColor(out.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def paste_back(
    frame: np.ndarray,
    crop: np.ndarray,
    crop_mask: np.ndarray,
    frame_to_crop: np.ndarray,
    *,
    poisson: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``crop`` into ``frame`` through the inverse warp, touching only the mask's region.

    Returns the new frame and the full-frame mask (float32 in [0,1]); pixels where that mask is 0
    are bit-identical to ``frame``.
    """
    h, w = frame.shape[:2]
    size = crop.shape[0]
    inv = invert_affine(frame_to_crop)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64)
    pts = corners @ inv.T
    x0 = int(np.clip(np.floor(pts[:, 0].min()) - 1, 0, w))
    y0 = int(np.clip(np.floor(pts[:, 1].min()) - 1, 0, h))
    x1 = int(np.clip(np.ceil(pts[:, 0].max()) + 2, 0, w))
    y1 = int(np.clip(np.ceil(pts[:, 1].max()) + 2, 0, h))
    full_mask = np.zeros((h, w), dtype=np.float32)
    out = frame.copy()
    if x1 <= x0 or y1 <= y0:
        return out, full_mask
    roi_inv = inv.copy()
    roi_inv[:, 2] -= (x0, y0)
    roi_w, roi_h = x1 - x0, y1 - y0
    warped = cv2.warpAffine(
        crop, roi_inv, (roi_w, roi_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    m = cv2.warpAffine(
        crop_mask.astype(np.float32), roi_inv, (roi_w, roi_h), flags=cv2.INTER_LINEAR, borderValue=0.0
    )
    m = np.clip(m, 0.0, 1.0)
    m[m < MASK_EPS] = 0.0
    if not m.any():
        return out, full_mask
    roi = frame[y0:y1, x0:x1]
    if poisson:
        warped = _seamless(warped, roi, m)
    blended = roi.astype(np.float32) * (1.0 - m[..., None]) + warped.astype(np.float32) * m[..., None]
    blended_u8 = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    out[y0:y1, x0:x1] = np.where(m[..., None] > 0, blended_u8, roi)
    full_mask[y0:y1, x0:x1] = m
    return out, full_mask


def _seamless(src: np.ndarray, dst: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Poisson-blend ``src`` into ``dst`` inside the mask; the feathered blend is applied afterwards."""
    binary = (mask > 0.5).astype(np.uint8) * 255
    ys, xs = np.nonzero(binary)
    if len(xs) < 16 or binary.shape[0] < 8 or binary.shape[1] < 8:
        return src
    # seamlessClone needs the mask away from the image border.
    binary[0, :] = binary[-1, :] = 0
    binary[:, 0] = binary[:, -1] = 0
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    center = (int((x0 + x1 + 1) // 2), int((y0 + y1 + 1) // 2))
    try:
        return cv2.seamlessClone(src, dst, binary, center, cv2.NORMAL_CLONE)
    except cv2.error:
        return src
