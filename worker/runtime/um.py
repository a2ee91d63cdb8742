"""Unified-memory mode (opt-in): a MemPool whose segments come from ``cudaMallocManaged``.

PyTorch has no managed-memory backend, so a tiny C allocator (``um_shim.c``) is compiled on first
use and plugged in through ``CUDAPluggableAllocator`` + ``MemPool`` + ``use_mem_pool`` (the caching
allocator stays in charge and keeps its stats). It is a safety margin for a worker that owns its
GPU, never a way around an MPS limit: managed memory counts against that limit and cannot
oversubscribe it (measured, see GPU.md), so the mode is refused under one.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from shared.errors import ConfigError
from worker.runtime.sizes import format_bytes

SHIM_SOURCE = Path(__file__).with_name("um_shim.c")
SHIM_SYMBOLS = (
    "um_init",
    "um_runtime_version",
    "um_last_error",
    "um_set_limit",
    "um_outstanding_bytes",
    "um_device_attribute",
    "um_malloc",
    "um_free",
    "um_advise",
    "um_prefetch",
)
CUDA_DEV_ATTR_MANAGED_MEMORY = 83
CUDA_DEV_ATTR_CONCURRENT_MANAGED_ACCESS = 89
CUDA_MEM_ADVISE_SET_READ_MOSTLY = 1
FREE_MARGIN_BYTES = 256 * 1024**2  # the shim keeps the same margin


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"facefarm-um-{os.getuid()}"


def build_compile_command(source: Path, output: Path, *, compiler: str = "cc") -> list[str]:
    """The one compiler call: a C compiler alone, no CUDA headers, no nvcc."""
    return [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(output), str(source), "-ldl", "-lpthread"]


def compile_um_shim(cache_dir: Path | None = None, *, compiler: str = "cc") -> Path:
    """The shim's ``.so`` in ``cache_dir``, compiled once per source version (atomic rename)."""
    cache_dir = cache_dir or default_cache_dir()
    source = SHIM_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    output = cache_dir / f"um_shim-{digest}.so"
    if output.exists():
        return output
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f".um_shim-{digest}-{os.getpid()}.so"
    command = build_compile_command(SHIM_SOURCE, partial, compiler=compiler)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"unified-memory mode needs a C compiler ({compiler!r} not found): install gcc or turn "
            "FACEFARM_UNIFIED_MEMORY off"
        ) from exc
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise ConfigError(f"compiling {SHIM_SOURCE.name} failed ({' | '.join(tail)})", stderr_tail=tail)
    os.replace(partial, output)
    return output


def load_um_shim(path: Path) -> ctypes.CDLL:
    """The shim with typed signatures (the same handle torch's CDLL of that path gets)."""
    lib = ctypes.CDLL(str(path))
    lib.um_init.argtypes = [ctypes.c_char_p]
    lib.um_init.restype = ctypes.c_int
    lib.um_runtime_version.restype = ctypes.c_int
    lib.um_last_error.restype = ctypes.c_int
    lib.um_set_limit.argtypes = [ctypes.c_size_t]
    lib.um_outstanding_bytes.restype = ctypes.c_size_t
    lib.um_device_attribute.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.um_device_attribute.restype = ctypes.c_int
    lib.um_malloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.um_malloc.restype = ctypes.c_void_p
    lib.um_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.um_free.restype = None
    lib.um_advise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    lib.um_advise.restype = ctypes.c_int
    lib.um_prefetch.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.um_prefetch.restype = ctypes.c_int
    return lib


def find_loaded_cudart(maps: Path = Path("/proc/self/maps")) -> str | None:
    """The libcudart this process (torch) already mapped, so the shim shares torch's runtime."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        path = line.split()[-1] if line.split() else ""
        if "/libcudart.so" in path:
            return path
    return None


def refuse_under_mps_limit(mps_limit: str | None) -> None:
    """UM mode and an MPS memory limit do not mix: say so instead of failing at allocation."""
    if mps_limit:
        raise ConfigError(
            f"unified-memory mode cannot run under an MPS memory limit (CUDA_MPS_PINNED_DEVICE_MEM_LIMIT="
            f"{mps_limit}): managed memory counts against that limit and cannot oversubscribe it. "
            "Turn FACEFARM_UNIFIED_MEMORY off, or give this worker its GPU with --mps off"
        )


class UnifiedMemory:
    """A managed-memory ``MemPool`` on one device, with advise and prefetch for its tensors."""

    def __init__(self, lib: ctypes.CDLL, so_path: Path, device: torch.device, limit_bytes: int) -> None:
        self._lib = lib
        self.device = device
        self.limit_bytes = limit_bytes
        self.runtime_version = int(lib.um_runtime_version())
        allocator = torch.cuda.memory.CUDAPluggableAllocator(str(so_path), "um_malloc", "um_free")
        self._allocator = allocator  # keep the allocator and pool alive longer than their tensors
        self.pool = torch.cuda.MemPool(allocator.allocator())

    @contextmanager
    def activate(self) -> Iterator[None]:
        """Allocations of this thread inside the block come from managed memory."""
        with torch.cuda.use_mem_pool(self.pool, device=self.device):
            yield

    @property
    def outstanding_bytes(self) -> int:
        return int(self._lib.um_outstanding_bytes())

    def advise_read_mostly(self, tensor: torch.Tensor) -> None:
        """Weights are read, not written: let every processor keep a read-only copy."""
        ptr, nbytes = _storage_span(tensor)
        self._check(self._lib.um_advise(ptr, nbytes, CUDA_MEM_ADVISE_SET_READ_MOSTLY, self._index), "advise")

    def prefetch_to_device(self, tensor: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
        """Migrate the tensor's pages to the GPU ahead of use, ordered on ``stream``."""
        ptr, nbytes = _storage_span(tensor)
        stream = stream or torch.cuda.current_stream(self.device)
        self._check(self._lib.um_prefetch(ptr, nbytes, self._index, stream.cuda_stream), "prefetch")

    @property
    def _index(self) -> int:
        return self.device.index or 0

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"unified memory {what} failed with CUDA error {rc}")


def create_unified_memory(
    device: torch.device,
    *,
    limit_bytes: int,
    mps_limit: str | None,
    cache_dir: Path | None = None,
) -> UnifiedMemory:
    """Compile, load and check the shim, then build the managed pool (call in the worker child)."""
    refuse_under_mps_limit(mps_limit)
    if device.type != "cuda":
        raise ConfigError("unified-memory mode needs a CUDA device; turn FACEFARM_UNIFIED_MEMORY off on CPU")
    torch.cuda.init()
    so_path = compile_um_shim(cache_dir)
    lib = load_um_shim(so_path)
    cudart = find_loaded_cudart()
    rc = lib.um_init(cudart.encode() if cudart else None)
    if rc != 0:
        raise ConfigError(
            f"unified-memory shim could not load the CUDA runtime (code {rc}, library {cudart})"
        )
    index = device.index or 0
    if lib.um_device_attribute(CUDA_DEV_ATTR_MANAGED_MEMORY, index) != 1:
        raise ConfigError(f"GPU {index} cannot allocate managed memory; turn FACEFARM_UNIFIED_MEMORY off")
    free_bytes = int(torch.cuda.mem_get_info(device)[0])
    allowed = max(0, free_bytes - FREE_MARGIN_BYTES)
    if limit_bytes > allowed:
        raise ConfigError(
            f"unified-memory limit {format_bytes(limit_bytes)} exceeds the GPU's free memory "
            f"({format_bytes(free_bytes)} less a {format_bytes(FREE_MARGIN_BYTES)} margin); lower the budget"
        )
    lib.um_set_limit(limit_bytes)
    return UnifiedMemory(lib, so_path, device, limit_bytes)


def _storage_span(tensor: torch.Tensor) -> tuple[int, int]:
    """Advise/prefetch act on pages: pass the storage's base and size, not a view's."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()
