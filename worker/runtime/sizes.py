"""Sizes in settings and MPS variables, read and written (torch-free: the launcher uses it)."""

from __future__ import annotations

import re

from shared.errors import ConfigError

MIB = 1024**2
GIB = 1024**3

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": MIB,
    "mb": 1000**2,
    "mib": MIB,
    "g": GIB,
    "gb": 1000**3,
    "gib": GIB,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
# MPS writes binary sizes with G/M, and its own examples use "MB" for MiB
_MPS_UNITS = {
    "": 1,
    "k": 1024,
    "kb": 1024,
    "m": MIB,
    "mb": MIB,
    "g": GIB,
    "gb": GIB,
    "t": 1024**4,
    "tb": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: str | int) -> int:
    """``2147483648``, ``2GiB``, ``1.5GB`` (decimal) or MPS-style ``4G``/``512M`` (binary) to bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(f"{value!r} is not a size: write bytes, or e.g. 2GiB, 512MiB, 4G")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_mps_limit(value: str, ordinal: int = 0) -> int | None:
    """The limit for one device ordinal out of ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``.

    The variable reads like ``0=4G,1=512MB``; an entry without ``=`` applies to every device.
    None when no entry covers ``ordinal``.
    """
    fallback: int | None = None
    for entry in filter(None, (part.strip() for part in value.split(","))):
        key, sep, size = entry.partition("=")
        if not sep:
            fallback = _parse_mps_size(key, value)
        elif key.strip() == str(ordinal):
            return _parse_mps_size(size, value)
    return fallback


def _parse_mps_size(size: str, whole: str) -> int:
    match = _SIZE_RE.match(size)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _MPS_UNITS:
        raise ConfigError(
            f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT={whole!r}: cannot read {size!r} (write e.g. 0=4G)"
        )
    return int(float(match.group(1)) * _MPS_UNITS[unit])


def format_bytes(nbytes: float) -> str:
    """Human sizes for messages: ``1.50 GiB``, ``12.0 MiB``."""
    if abs(nbytes) >= GIB:
        return f"{nbytes / GIB:.2f} GiB"
    return f"{nbytes / MIB:.1f} MiB"
