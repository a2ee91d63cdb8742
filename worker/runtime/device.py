"""Which device a worker computes on, resolved lazily in the worker child.

CUDA must not be touched before Celery forks its pool child (the child would inherit a dead
context), so nothing here runs at import time: ``LazyDevice.get()`` resolves the setting on the
first task, inside the child.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shared.errors import ConfigError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class DeviceInfo:
    """What the worker reports about its device (heartbeat, logs, telemetry)."""

    device: str  # "cpu" or "cuda:N" (N relative to CUDA_VISIBLE_DEVICES)
    name: str
    total_bytes: int
    free_bytes: int
    uuid: str | None = None  # "GPU-..." as NVML spells it; None on CPU

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def parse_device_setting(value: str) -> tuple[str, int | None]:
    """Validate ``auto|cpu|cuda|cuda:N`` and split it into kind and index."""
    match = _DEVICE_RE.match(value.strip().lower())
    if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
        raise ConfigError(f"FACEFARM_DEVICE={value!r} is not one of auto, cpu, cuda, cuda:N")
    index = match.group(2)
    return match.group(1), None if index is None else int(index)


def select_device(
    setting: str,
    *,
    cuda_available: Callable[[], bool] = torch.cuda.is_available,
    cuda_count: Callable[[], int] = torch.cuda.device_count,
) -> torch.device:
    """Resolve a device setting; ``auto`` prefers the first visible GPU, else the CPU."""
    kind, index = parse_device_setting(setting)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "auto":
        return torch.device("cuda", 0) if cuda_available() else torch.device("cpu")
    if not cuda_available():
        raise ConfigError(
            f"FACEFARM_DEVICE={setting} but no CUDA device is visible to this process: "
            "check CUDA_VISIBLE_DEVICES and the driver, or use FACEFARM_DEVICE=cpu"
        )
    count = cuda_count()
    wanted = index or 0
    if wanted >= count:
        raise ConfigError(
            f"FACEFARM_DEVICE={setting} but only {count} CUDA device(s) are visible "
            f"(cuda:0..cuda:{count - 1}); pin the worker with CUDA_VISIBLE_DEVICES instead"
        )
    return torch.device("cuda", wanted)


class LazyDevice:
    """Resolves and initialises the device on first use, in the process that computes."""

    def __init__(self, setting: str) -> None:
        parse_device_setting(setting)  # fail fast on a typo, without touching CUDA
        self._setting = setting
        self._device: torch.device | None = None

    @property
    def resolved(self) -> bool:
        return self._device is not None

    def get(self) -> torch.device:
        if self._device is None:
            device = select_device(self._setting)
            if device.type == "cuda":
                torch.cuda.set_device(device)
                torch.cuda.init()
            self._device = device
        return self._device


def mem_get_info(device: torch.device) -> tuple[int, int]:
    """``(free_bytes, total_bytes)``: the CUDA driver's view, or host RAM on the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    page = os.sysconf("SC_PAGE_SIZE")
    return page * os.sysconf("SC_AVPHYS_PAGES"), page * os.sysconf("SC_PHYS_PAGES")


def describe_device(device: torch.device) -> DeviceInfo:
    """Name, memory and NVML identity of a resolved device."""
    free, total = mem_get_info(device)
    if device.type != "cuda":
        return DeviceInfo(device="cpu", name="cpu", total_bytes=total, free_bytes=free)
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    nvml_uuid = None if uuid is None else _nvml_uuid(str(uuid))
    return DeviceInfo(
        device=f"cuda:{device.index or 0}",
        name=props.name,
        total_bytes=total,
        free_bytes=free,
        uuid=nvml_uuid,
    )


def _nvml_uuid(torch_uuid: str) -> str:
    """torch prints a bare UUID; NVML wants it prefixed with ``GPU-``."""
    return torch_uuid if torch_uuid.startswith(("GPU-", "MIG-")) else f"GPU-{torch_uuid}"
