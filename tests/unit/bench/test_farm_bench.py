"""The farm benchmark's pure parts: worker counts, ratios vs one worker, the summary, PyAV planning info."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.farm_bench import (
    chunk_summary,
    clip_video_info,
    cpu_clients,
    farm_env,
    parse_counts,
    redis_server_args,
    scaling,
    summary_lines,
)
from bench.make_clip import load_source_images, write_clip
from dispatcher.planner import plan_chunks
from shared.schemas import ChunkSpec, ChunkStats, ChunkStatus, EncoderSettings, JobOptions
from shared.state import Attempt, ChunkRecord


def test_counts_always_include_one_and_skip_what_the_machine_lacks() -> None:
    assert parse_counts("1,2,4", 2) == ([1, 2], [4])
    assert parse_counts("4,2", 8) == ([1, 2, 4], [])
    with pytest.raises(SystemExit):
        parse_counts("two", 2)


def test_scaling_is_relative_to_one_worker_and_checks_the_issue_targets() -> None:
    rows = [
        {"workers": 1, "frames_per_s": 10.0},
        {"workers": 2, "frames_per_s": 18.0},
        {"workers": 4, "frames_per_s": 38.0},
    ]
    by_count = {s["workers"]: s for s in scaling(rows)}
    assert by_count[2]["x_one"] == 1.8 and by_count[2]["met"] is False and by_count[2]["efficiency"] == 0.9
    assert by_count[4]["x_one"] == 3.8 and by_count[4]["met"] is True
    assert "met" not in by_count[1]


def test_scaling_gives_no_ratio_without_a_one_worker_figure() -> None:
    rows: list[dict[str, object]] = [{"workers": 1, "error": "boom"}, {"workers": 2, "frames_per_s": 18.0}]
    assert all("x_one" not in s for s in scaling(rows))


def _record(index: int, worker: str, start: float, end: float, frames: int) -> ChunkRecord:
    encoder = EncoderSettings(width=64, height=64, time_base_num=1, time_base_den=30, fps_num=30, fps_den=1)
    spec = ChunkSpec(
        job_id="j", index=index, start_frame=0, end_frame=frames, seek_pts=0, seek_frame=0,
        source_uri="file:///v.mp4", face_uri="file:///f.png", output_uri="file:///o.mp4",
        options=JobOptions(), encoder=encoder,
    )  # fmt: skip
    return ChunkRecord(
        index=index, spec=spec, status=ChunkStatus.COMMITTED, frame_count=frames, attempt_id="a",
        worker=worker, heartbeat_at=end, frames_done=frames, hwm=frames, deliveries=1,
        attempts=(Attempt(attempt_id="a", worker=worker, start=start, end=end),), error="",
        stats=ChunkStats(frames=frames, faces=2, stage_seconds={"decode": 0.5}),
    )  # fmt: skip


def test_chunk_summary_times_first_enqueue_to_last_commit() -> None:
    records = [_record(0, "gpu0", 100.5, 104.0, 60), _record(1, "gpu1", 100.6, 110.0, 60)]
    summary = chunk_summary(records, t0=100.0)
    assert summary["wall_s"] == 10.0 and summary["frames"] == 120 and summary["frames_per_s"] == 12.0
    assert summary["chunks_per_worker"] == {"gpu0": 1, "gpu1": 1}
    assert summary["faces"] == 4 and summary["stage_seconds_total"] == {"decode": 1.0}


def test_summary_has_a_line_per_count_and_names_failures() -> None:
    report = {
        "runs": [
            {"workers": 1, "chunks": 4, "frames": 240, "wall_s": 20.0, "frames_per_s": 12.0,
             "chunks_per_worker": {"gpu0": 4}, "gpus": {"0": {"util_mean": 55.0}}},
            {"workers": 2, "error": "RuntimeError: worker died"},
            {"workers": 4, "skipped": "only 2 cuda workers available"},
        ],
        "scaling": scaling([{"workers": 1, "frames_per_s": 12.0}]),
    }  # fmt: skip
    lines = summary_lines(report)
    assert len(lines) == 4 and "55" in lines[1] and "worker died" in lines[2] and "only 2" in lines[3]


def test_worker_environment_and_redis_command_are_built_as_lists(tmp_path: Path) -> None:
    assert farm_env({"redis_url": "redis://x", "batch_frames": 8}) == {
        "FACEFARM_REDIS_URL": "redis://x",
        "FACEFARM_BATCH_FRAMES": "8",
    }
    assert [c.node_name for c in cpu_clients(2)] == ["cpu0-0@%h", "cpu1-0@%h"]
    args = redis_server_args("/bin/redis-server", 6400, tmp_path)
    assert args[:3] == ["/bin/redis-server", "--port", "6400"] and "--save" in args


def test_pyav_video_info_plans_the_same_chunks_as_ffprobe(tmp_path: Path) -> None:
    from shared.media import probe

    clip = write_clip(
        tmp_path / "c.mp4", load_source_images(None), width=64, height=48, frames=90, gop_frames=30
    )
    ours, reference = clip_video_info(clip.path), probe(str(clip.path))
    assert ours.model_dump(exclude={"field_order"}) == reference.model_dump(exclude={"field_order"})
    assert plan_chunks(ours, chunk_frames=20, warmup_frames=8) == plan_chunks(
        reference, chunk_frames=20, warmup_frames=8
    )
