"""The device benchmark runs end to end on the CPU (--smoke) and writes valid JSON; bench helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.make_clip import build_canvas, frame_at, load_source_images, write_clip
from bench.swapper_like import INSWAPPER_PARAMS, SwapperLike, count_parameters

REPO = Path(__file__).resolve().parents[3]


def test_swapper_stand_in_has_inswappers_parameter_count() -> None:
    params = count_parameters(SwapperLike())
    assert abs(params - INSWAPPER_PARAMS) / INSWAPPER_PARAMS < 0.02


def test_clip_pans_over_real_faces_and_reads_back(tmp_path: Path) -> None:
    images = load_source_images(None)
    canvas = build_canvas(images, 64, 48)
    first, later = frame_at(canvas, 0, 64, 48), frame_at(canvas, 20, 64, 48)
    assert first.shape == (48, 64, 3) and not np.array_equal(first, later)
    info = write_clip(tmp_path / "c.mp4", images, width=64, height=48, frames=5)
    assert (info.width, info.height, info.frames, info.first_pts) == (64, 48, 5, 0)


def test_smoke_run_writes_json_without_errors(tmp_path: Path, model_store: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(REPO / "bench" / "device_bench.py"), "--smoke", "--out", str(out),
        "--store", str(model_store), "--work", str(tmp_path / "work"), "--parts", "anime,swapper,cpu",
        "--budget-s", "600",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert set(report["parts"]) == {"anime", "swapper", "cpu"}
    assert report["environment"]["device"] == "cpu"
    rows = [r for part in report["parts"].values() for r in part.get("variants", []) + part.get("runs", [])]
    assert rows and not [r for r in rows if "error" in r or "skipped" in r]
    assert all(r["fps"] > 0 for r in rows)
    table = done.stdout[done.stdout.index("part ") :]
    assert "per-frame synchronous x2 [baseline]" in table and table.splitlines()[-1].startswith("total")


def test_rounds_get_same_round_ratios_and_reverted_cases_write_the_same_video(
    tmp_path: Path, model_store: Path
) -> None:
    """``--rounds 2`` with the headline pair and a case undoing the in-place blend: each row's ratio to
    its own round's baseline, and on the CPU (where the undone change moves no pixel) equal outputs."""
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(REPO / "bench" / "device_bench.py"), "--smoke", "--out", str(out), "--device", "cpu",
        "--store", str(model_store), "--work", str(tmp_path / "work"), "--parts", "pipeline", "--rounds", "2",
        "--pipeline-cases", "next chunk of the process,next chunk [baseline],copying blend", "--budget-s", "600",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "bench.json").read_text())["parts"]["pipeline"]["runs"]
    assert len(rows) == 6 and not [r for r in rows if "error" in r or "skipped" in r]
    for r in rows:
        base = next(b for b in rows if b["mode"] == "per_frame" and b["run"][-2:] == r["run"][-2:])
        assert r["x_same_round"] == round(r["fps"] / base["fps"], 2)
    digests = {r["output_md5"] for r in rows if r["mode"] == "pipelined"}
    assert len(digests) == 1


def test_a_case_filter_entry_that_matches_nothing_stops_before_any_work() -> None:
    import pytest

    from bench.device_bench import PipelineCase, select_cases

    cases = [PipelineCase("alpha, next", 2), PipelineCase("beta, next", 2), PipelineCase("gamma", 1)]
    assert [c.label for c in select_cases(cases, ("gamma", "beta,"))] == ["beta, next", "gamma"]
    assert len(select_cases(cases, ("next", "alpha"))) == 2
    with pytest.raises(SystemExit, match="matches no case"):
        select_cases(cases, ("gamma", "next#gamma"))
