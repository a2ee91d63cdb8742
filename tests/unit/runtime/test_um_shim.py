"""The unified-memory shim: builds with cc alone, exports its symbols, calls the right CUDA forms.

A stand-in libcudart (compiled here, plain C) records how the shim calls it, so the CUDA 12 vs 13
signatures of cudaMemAdvise/cudaMemPrefetchAsync and the free-memory guard are checked without
a GPU. The shim itself is the real one.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.errors import ConfigError
from worker.runtime.um import (
    SHIM_SYMBOLS,
    build_compile_command,
    compile_um_shim,
    find_loaded_cudart,
    load_um_shim,
    refuse_under_mps_limit,
)

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

MIB = 1024**2

FAKE_CUDART = r"""
#include <stdlib.h>
#include <stddef.h>
struct loc { int type; int id; };
int last_kind = 0, last_a = -99, last_b = -99, last_c = -99; size_t last_count = 0; void *last_stream = 0;
size_t free_bytes = (size_t)1024 << 20;
int cudaRuntimeGetVersion(int *v) { *v = VERSION; return 0; }
int cudaMallocManaged(void **p, size_t n, unsigned int flags) { (void)flags; *p = malloc(n ? n : 1); return 0; }
int cudaFree(void *p) { free(p); return 0; }
int cudaMemGetInfo(size_t *f, size_t *t) { *f = free_bytes; *t = (size_t)80 << 30; return 0; }
int cudaGetDevice(int *d) { *d = 0; return 0; }
int cudaSetDevice(int d) { (void)d; return 0; }
int cudaDeviceGetAttribute(int *v, int attr, int dev) { *v = (attr == 83 && dev == 0) ? 1 : 0; return 0; }
#if VERSION >= 13000
int cudaMemAdvise(const void *p, size_t n, int advice, struct loc l) {
  (void)p; last_kind = 13; last_count = n; last_a = advice; last_b = l.type; last_c = l.id; return 0; }
int cudaMemPrefetchAsync(const void *p, size_t n, struct loc l, unsigned int flags, void *s) {
  (void)p; last_kind = 13; last_count = n; last_a = l.type; last_b = l.id; last_c = (int)flags; last_stream = s; return 0; }
#else
int cudaMemAdvise(const void *p, size_t n, int advice, int device) {
  (void)p; last_kind = 12; last_count = n; last_a = advice; last_b = device; last_c = -1; return 0; }
int cudaMemPrefetchAsync(const void *p, size_t n, int device, void *s) {
  (void)p; last_kind = 12; last_count = n; last_a = device; last_b = -1; last_c = -1; last_stream = s; return 0; }
#endif
"""


def build_fake_cudart(tmp_path: Path, version: int) -> ctypes.CDLL:
    source = tmp_path / "fake_cudart.c"
    source.write_text(FAKE_CUDART)
    output = tmp_path / f"libcudart_fake_{version}.so"
    subprocess.run(
        ["cc", "-shared", "-fPIC", f"-DVERSION={version}", "-o", str(output), str(source)], check=True
    )
    return ctypes.CDLL(str(output))


def shim_with_runtime(tmp_path: Path, version: int) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """A fresh shim (its own cache dir: separate state) bound to a fake runtime of ``version``."""
    fake = build_fake_cudart(tmp_path, version)
    shim = load_um_shim(compile_um_shim(tmp_path / "cache"))
    assert shim.um_init(str(tmp_path / f"libcudart_fake_{version}.so").encode()) == 0
    return shim, fake


def last_call(fake: ctypes.CDLL) -> tuple[int, int, int, int, int]:
    def read(name: str, ctype: type) -> int:
        return ctype.in_dll(fake, name).value

    return (
        read("last_kind", ctypes.c_int),
        read("last_count", ctypes.c_size_t),
        read("last_a", ctypes.c_int),
        read("last_b", ctypes.c_int),
        read("last_c", ctypes.c_int),
    )


def test_the_shim_compiles_with_cc_alone_and_exports_its_symbols(tmp_path: Path) -> None:
    command = build_compile_command(Path("um_shim.c"), Path("out.so"))
    assert command[:3] == ["cc", "-shared", "-fPIC"]
    assert not any("cuda" in part.lower() or part.startswith("-I") for part in command)
    path = compile_um_shim(tmp_path)
    assert compile_um_shim(tmp_path) == path  # cached by source hash
    exported = subprocess.run(
        ["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True
    )
    names = {line.split()[-1] for line in exported.stdout.splitlines() if " T " in line}
    assert set(SHIM_SYMBOLS) <= names


def test_without_a_cuda_runtime_the_allocator_returns_null_instead_of_crashing(tmp_path: Path) -> None:
    shim = load_um_shim(compile_um_shim(tmp_path))
    assert shim.um_init(b"/nonexistent/libcudart.so.13") != 0
    assert shim.um_malloc(1024, 0, None) is None


def test_cuda_13_runtime_gets_the_mem_location_forms(tmp_path: Path) -> None:
    shim, fake = shim_with_runtime(tmp_path, 13000)
    assert shim.um_runtime_version() == 13000
    assert shim.um_prefetch(0x1000, 4096, 0, 0xBEEF) == 0
    assert last_call(fake) == (13, 4096, 1, 0, 0)  # location {device, 0}, flags 0
    assert ctypes.c_void_p.in_dll(fake, "last_stream").value == 0xBEEF
    assert shim.um_advise(0x1000, 8192, 1, 0) == 0
    assert last_call(fake) == (13, 8192, 1, 1, 0)  # SetReadMostly at {device, 0}
    assert shim.um_prefetch(0x1000, 4096, -1, None) == 0
    assert last_call(fake)[2] == 2  # host location


def test_cuda_12_runtime_gets_the_device_int_forms(tmp_path: Path) -> None:
    shim, fake = shim_with_runtime(tmp_path, 12090)
    assert shim.um_prefetch(0x1000, 4096, 0, None) == 0
    assert last_call(fake) == (12, 4096, 0, -1, -1)
    assert shim.um_advise(0x1000, 4096, 1, -1) == 0
    assert last_call(fake) == (12, 4096, 1, -1, -1)  # cudaCpuDeviceId


def test_managed_allocations_stay_under_free_memory_and_the_limit(tmp_path: Path) -> None:
    shim, fake = shim_with_runtime(tmp_path, 13000)  # the fake reports 1 GiB free
    assert shim.um_device_attribute(83, 0) == 1
    assert shim.um_malloc(900 * MIB, 0, None) is None  # 1 GiB free less the 256 MiB margin
    shim.um_set_limit(300 * MIB)
    first = shim.um_malloc(200 * MIB, 0, None)
    assert first is not None and shim.um_outstanding_bytes() == 200 * MIB
    assert shim.um_malloc(200 * MIB, 0, None) is None  # would pass the 300 MiB limit
    shim.um_free(first, 200 * MIB, 0, None)
    assert shim.um_outstanding_bytes() == 0
    assert shim.um_malloc(200 * MIB, 0, None) is not None


def test_unified_memory_is_refused_under_an_mps_limit() -> None:
    with pytest.raises(ConfigError, match="cannot oversubscribe"):
        refuse_under_mps_limit("0=4096M")
    refuse_under_mps_limit(None)


def test_the_loaded_cudart_is_found_in_the_process_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n"
        "7f02-7f03 r-xp 00000000 08:01 2 /venv/nvidia/cu13/lib/libcudart.so.13\n"
    )
    assert find_loaded_cudart(maps) == "/venv/nvidia/cu13/lib/libcudart.so.13"
    assert find_loaded_cudart(tmp_path / "missing") is None
