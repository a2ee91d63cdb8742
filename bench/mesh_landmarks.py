"""Face-mesh landmark throughput on one device, written as JSON (for the GPU machine).

python bench/mesh_landmarks.py --device cuda --dtype float16 --batch 16 64 --out mesh.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from worker.models.mesh.landmarker import benchmark_landmarks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("mesh_landmarks.json"))
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        import torch

        torch.backends.cudnn.benchmark = True
    rows = []
    for dtype in args.dtype:
        for batch in args.batch:
            for compiled in (False, True) if args.compile else (False,):
                row = benchmark_landmarks(
                    args.device,
                    batch,
                    dtype,
                    store=args.store,
                    iterations=args.iterations,
                    compile_net=compiled,
                )
                print(json.dumps(row))
                rows.append(row)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
