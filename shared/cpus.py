"""Host CPU shares for GPU clients: CPU lists read and written, split, applied (torch-free).

Several render processes on one node each size their thread pools (x264, OpenMP, OpenCV, our own)
from the whole machine; together they oversubscribe the cores and every chunk slows down. The
launcher gives each GPU client a disjoint, contiguous block of the CPUs it may use
(``FACEFARM_CPU_AFFINITY``), the worker pins itself to it before its pool forks, and every pool
sizes itself from ``usable_cpu_count()``, which honours that pin.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from shared.errors import ConfigError


def parse_cpu_list(text: str) -> list[int]:
    """``0-3,8,10-11`` → ``[0, 1, 2, 3, 8, 10, 11]`` (the kernel's cpulist format)."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, sep, last = part.partition("-")
        try:
            lo = int(first)
            hi = int(last) if sep else lo
        except ValueError:
            raise ConfigError(
                f"FACEFARM_CPU_AFFINITY={text!r}: {part!r} is not a CPU or a range like 0-7"
            ) from None
        if lo < 0 or hi < lo:
            raise ConfigError(f"FACEFARM_CPU_AFFINITY={text!r}: bad range {part!r}")
        cpus.update(range(lo, hi + 1))
    if not cpus:
        raise ConfigError(f"FACEFARM_CPU_AFFINITY={text!r} names no CPU")
    return sorted(cpus)


def format_cpu_list(cpus: Sequence[int]) -> str:
    """The inverse of ``parse_cpu_list``, with runs collapsed: ``[0, 1, 2, 5]`` → ``0-2,5``."""
    ordered = sorted(set(cpus))
    runs: list[str] = []
    start = prev = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(runs)


def split_cpus(cpus: Sequence[int], parts: int) -> list[list[int]]:
    """``cpus`` in ``parts`` contiguous blocks as equal as possible (neighbours share caches and a
    NUMA node); with fewer CPUs than parts, blocks are shared round-robin rather than left empty."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    ordered = sorted(set(cpus))
    if len(ordered) < parts:
        return [[ordered[i % len(ordered)]] for i in range(parts)]
    base, extra = divmod(len(ordered), parts)
    blocks, at = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        blocks.append(ordered[at : at + size])
        at += size
    return blocks


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask; all of them where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def usable_cpu_count() -> int:
    """How many CPUs this process may use: what thread pools should size themselves by."""
    return len(usable_cpus())


def pin_to(text: str | None) -> list[int] | None:
    """Pin this process (and every thread and child it makes later) to the CPU list ``text``."""
    if not text or not hasattr(os, "sched_setaffinity"):
        return None
    wanted = parse_cpu_list(text)
    allowed = set(usable_cpus())
    cpus = [c for c in wanted if c in allowed] or sorted(allowed)
    os.sched_setaffinity(0, cpus)
    return cpus
