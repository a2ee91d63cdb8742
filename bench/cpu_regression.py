"""The "no CPU regression" row: this checkout's CPU pipeline against an earlier commit's, same machine, same run.

    python bench/cpu_regression.py --base <commit> --store ~/.cache/facefarm/models --out /tmp/cpu-regression

The earlier commit is checked out as a git worktree, and both run ``device_bench.py --parts cpu`` (96 px
frames, 48 frames, per-frame baseline and ``render_chunk``) in alternation, ``--rounds`` times each, so drift
of a noisy machine hits both alike. Reported: the median ``render_chunk`` fps of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ROW = "render_chunk pipelined x2"


def run_cpu_part(checkout: Path, store: Path, out: Path) -> float:
    """One ``--parts cpu`` run in ``checkout``; the pipelined row's fps."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "bench/device_bench.py", "--out", str(out), "--store", str(store), "--parts", "cpu",
         "--device", "cpu", "--compile", "off", "--work", str(out / "work")],
        cwd=checkout, check=True, capture_output=True, text=True,
    )  # fmt: skip
    report = json.loads((out / "bench.json").read_text())
    rows = report["parts"]["cpu"]["runs"]
    row = next(r for r in rows if r["run"] == ROW)
    if "fps" not in row:
        raise RuntimeError(f"{checkout}: {ROW} did not finish: {row.get('error')}")
    return float(row["fps"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the earlier commit (before the work being checked)")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="facefarm-base-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=REPO, check=True,
                       capture_output=True)  # fmt: skip
        try:
            fps: dict[str, list[float]] = {"base": [], "head": []}
            for k in range(args.rounds):
                for name, checkout in (("base", base), ("head", REPO)):
                    fps[name].append(run_cpu_part(checkout, args.store.resolve(), args.out / f"{name}-{k}"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    head_rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    result = {
        "row": ROW,
        "base": args.base,
        "head": head_rev.stdout.strip() + " (+ working tree)",
        "fps": fps,
        "median_fps": {k: statistics.median(v) for k, v in fps.items()},
    }
    result["ratio_head_over_base"] = round(result["median_fps"]["head"] / result["median_fps"]["base"], 3)
    (args.out / "cpu_regression.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
