"""One mapping from colour tags to swscale matrices, shared by decode and encode.

Decode (YUV→RGB) and encode (RGB→YUV) must use the same matrix and range, or every chunk shifts
colour. Untagged video uses swscale's default (BT.601) both ways, so the round trip is neutral.
"""

from __future__ import annotations

from av.video.reformatter import ColorRange, Colorspace, Interpolation

# AVColorSpace values (libavutil/pixfmt.h) -> swscale matrix.
_MATRIX_BY_AVCOL = {
    1: Colorspace.ITU709,
    4: Colorspace.FCC,
    5: Colorspace.ITU601,
    6: Colorspace.SMPTE170M,
    7: Colorspace.SMPTE240M,
    9: Colorspace.BT2020,
    10: Colorspace.BT2020,
}
# ffprobe/ffmpeg names (av_color_*_name) -> AVColor* values, for tagging the encoder.
AVCOL_SPACE = {
    "gbr": 0,
    "bt709": 1,
    "fcc": 4,
    "bt470bg": 5,
    "smpte170m": 6,
    "smpte240m": 7,
    "ycgco": 8,
    "bt2020nc": 9,
    "bt2020c": 10,
}
AVCOL_PRIMARIES = {
    "bt709": 1,
    "bt470m": 4,
    "bt470bg": 5,
    "smpte170m": 6,
    "smpte240m": 7,
    "film": 8,
    "bt2020": 9,
    "smpte428": 10,
    "smpte431": 11,
    "smpte432": 12,
    "ebu3213": 22,
}
AVCOL_TRC = {
    "bt709": 1,
    "gamma22": 4,
    "bt470m": 4,
    "gamma28": 5,
    "bt470bg": 5,
    "smpte170m": 6,
    "smpte240m": 7,
    "linear": 8,
    "log100": 9,
    "log316": 10,
    "iec61966-2-4": 11,
    "bt1361e": 12,
    "iec61966-2-1": 13,
    "bt2020-10": 14,
    "bt2020-12": 15,
    "smpte2084": 16,
    "smpte428": 17,
    "arib-std-b67": 18,
}
AVCOL_RANGE = {"tv": 1, "mpeg": 1, "pc": 2, "jpeg": 2}

# Accurate rounding keeps the decode→encode round trip within one code value.
INTERPOLATION = int(Interpolation.BILINEAR | Interpolation.ACCURATE_RND)


def matrix_for_avcol(avcol_space: int) -> Colorspace:
    """The swscale matrix for a decoded frame's colour space (unknown → BT.601, swscale's default)."""
    return _MATRIX_BY_AVCOL.get(avcol_space, Colorspace.ITU601)


def matrix_for_name(name: str | None) -> Colorspace:
    """The swscale matrix for a colour-space name from the job's encoder settings."""
    return matrix_for_avcol(AVCOL_SPACE.get(name or "", 2))


def range_for_frame(avcol_range: int, pix_fmt: str) -> ColorRange:
    """Full range if tagged so or if the pixel format is a JPEG (``yuvj*``) one."""
    if avcol_range == 2 or pix_fmt.startswith("yuvj"):
        return ColorRange.JPEG
    return ColorRange.MPEG


def range_for_name(name: str | None) -> ColorRange:
    return ColorRange.JPEG if AVCOL_RANGE.get(name or "", 1) == 2 else ColorRange.MPEG
