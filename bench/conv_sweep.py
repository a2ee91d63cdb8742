"""Sweep the fused Triton 3x3 conv's tile shapes, warps and pipeline depths on the SR nets' layer shapes.

The autotuner (``triton_conv.TUNE_CONFIGS``) only tries a dozen configs, because every config is
compiled at a worker's first chunk. This sweep times many more, once per GPU kind, on the shapes that
carry the FLOPs (1080p, batch 1): what it finds goes into the autotuner's short list. Each row: the
config, its median time, TFLOP/s, and the speed-up over the config the autotuner picks today (pointer
loads). Every config runs with both load paths: pointer loads and TMA descriptors (``tma``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

# (label, C_in, C_out, activation, share of the net's FLOPs it stands for)
SHAPES = (
    ("animevideov3 body conv 64->64 + PReLU", 64, 64, "prelu"),
    ("x4plus dense conv 128->32 + leaky ReLU", 128, 32, "leaky_relu"),
    ("x4plus dense conv 192->64 (RDB output)", 192, 64, "none"),
)
WARPS_STAGES_M64 = ((4, 2), (4, 3), (4, 4), (4, 5))
CANDIDATES = (
    # (BLOCK_H, BLOCK_W, BLOCK_K, num_warps, num_stages)
    *[(1, 64, 64, w, s) for w, s in WARPS_STAGES_M64],
    (1, 64, 32, 4, 4),
    *[(1, 128, 64, 4, s) for s in (2, 3, 4, 5)],
    *[(1, 128, 32, 4, s) for s in (3, 4, 5, 6)],
    (1, 128, 64, 8, 3),
    (1, 128, 64, 8, 4),
    (2, 64, 64, 4, 3),
    (2, 64, 64, 4, 4),
    (4, 32, 64, 4, 3),
    (8, 16, 64, 4, 3),
    *[(1, 256, 64, 8, s) for s in (2, 3, 4)],
    (1, 256, 64, 4, 2),
    (1, 256, 64, 4, 3),
    (1, 256, 32, 8, 4),
    (1, 256, 32, 8, 5),
    (2, 128, 64, 8, 2),
    (2, 128, 64, 8, 3),
    (2, 128, 64, 8, 4),
    (4, 64, 64, 8, 3),
    (2, 128, 32, 8, 4),
    (1, 512, 64, 8, 2),
    (2, 256, 64, 8, 2),
    (4, 128, 64, 8, 2),
    (1, 512, 32, 8, 3),
    (2, 256, 32, 8, 3),
    (1, 512, 64, 16, 2),
)


def sweep(
    device: torch.device,
    *,
    width: int,
    height: int,
    left_s: Callable[[], float],
    max_configs: int | None = None,
) -> dict[str, Any]:
    """Time every candidate on every shape (until ``left_s()`` runs low); raw rows per shape."""
    torch.manual_seed(0)
    shapes = [
        _sweep_shape(device, label, c_in, c_out, act, width, height, left_s, CANDIDATES[:max_configs])
        for label, c_in, c_out, act in SHAPES
    ]
    return {"input": f"{width}x{height}, batch 1, fp16", "shapes": shapes}


def _sweep_shape(
    device: torch.device,
    label: str,
    c_in: int,
    c_out: int,
    act: str,
    width: int,
    height: int,
    left_s: Callable[[], float],
    candidates: tuple[tuple[int, ...], ...],
) -> dict[str, Any]:
    import triton.testing

    from worker.models import triton_conv
    from worker.models.triton_conv import conv3x3, pack_conv3x3

    x = torch.randn(1, c_in, height, width, device=device, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.randn(c_out, c_in, 3, 3, device=device) * (2.0 / (9 * c_in)) ** 0.5
    b = torch.randn(c_out, device=device) * 0.1
    prelu = torch.rand(c_out, device=device) * 0.3 if act == "prelu" else None
    layers = {
        loads: pack_conv3x3(w, b, activation=act, prelu_weight=prelu, dtype=torch.float16, tma=loads == "tma")
        for loads in ("pointer", "tma")
    }
    out = torch.empty(1, c_out, height, width, device=device, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last
    )
    flop = 2.0 * 9 * c_in * c_out * width * height
    ref = torch.nn.functional.conv2d(x.float(), w, b, padding=1)
    if act == "prelu":
        ref = torch.nn.functional.prelu(ref, prelu)
    elif act == "leaky_relu":
        ref = torch.nn.functional.leaky_relu(ref, 0.01)
    row: dict[str, Any] = {"shape": label, "gflop": round(flop / 1e9, 2), "configs": []}

    def timed(loads: str, block: tuple[int, ...] | None) -> float:
        return float(
            triton.testing.do_bench(
                lambda: conv3x3(x, layers[loads], out=out, block=block),
                warmup=25,
                rep=200,
                return_mode="median",
            )
        )

    tuned = triton_conv._kernels(False)[1]
    base_ms: dict[str, float] = {}
    # the autotuner's pick for each load path; the pointer loads' is the ratios' base
    for loads in ("pointer", "tma"):
        started = time.perf_counter()
        try:
            conv3x3(x, layers[loads], out=out)
        except Exception as exc:  # TMA that this chip or Triton build refuses
            row[f"autotuned_{loads}"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        autotune_s = time.perf_counter() - started
        cache = getattr(tuned, "cache", None) or {}
        picked = next(iter(cache.values()), None)
        base_ms[loads] = timed(loads, None)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        row[f"autotuned_{loads}"] = {"config": str(picked), "ms": round(base_ms[loads], 4),
                                     "autotune_s": round(autotune_s, 1), "rel_err": float(f"{err:.2e}"),
                                     "tflop_s": round(flop / base_ms[loads] / 1e9, 1)}  # fmt: skip
        cache.clear()  # the next one tunes afresh, and reports its own pick
    reference_ms = base_ms.get("pointer") or next(iter(base_ms.values()), float("nan"))
    for loads in ("pointer", "tma"):
        for config in candidates:
            if left_s() < 30:
                row["stopped"] = "out of time"
                break
            entry: dict[str, Any] = {"loads": loads, "config": list(config)}
            try:
                out.fill_(float("nan"))
                conv3x3(x, layers[loads], out=out, block=config)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = timed(loads, config)
                entry.update(ms=round(ms, 4), tflop_s=round(flop / ms / 1e9, 1), rel_err=float(f"{err:.2e}"),
                             x_autotuned=round(reference_ms / ms, 3))  # fmt: skip
            except Exception as exc:  # a config the compiler or the chip refuses (shared memory, registers)
                entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
            row["configs"].append(entry)
        good = [c for c in row["configs"] if c["loads"] == loads and "ms" in c and c["rel_err"] < 1e-2]
        if good:
            row[f"best_{loads}"] = min(good, key=lambda c: c["ms"])
    return row
