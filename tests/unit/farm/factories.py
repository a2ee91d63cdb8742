"""Builders for store tests: chunk specs and jobs already planned into RENDERING."""

from __future__ import annotations

from shared.schemas import ChunkSpec, EncoderSettings, JobOptions, JobStatus
from shared.state import JobStore


def make_specs(job_id: str, frame_counts: list[int], *, warmup: int = 2) -> list[ChunkSpec]:
    """Chunk specs of the given sizes, back to back from frame 0."""
    encoder = EncoderSettings(width=64, height=64, time_base_num=1, time_base_den=25, fps_num=25, fps_den=1)
    specs, start = [], 0
    for index, count in enumerate(frame_counts):
        specs.append(
            ChunkSpec(
                job_id=job_id,
                index=index,
                start_frame=start,
                end_frame=start + count,
                warmup_frames=min(warmup, start),
                seek_pts=0,
                seek_frame=0,
                source_uri="file:///src.mp4",
                face_uri="file:///face.png",
                output_uri=f"file:///out/{index}.mp4",
                options=JobOptions(swapper="classic"),
                encoder=encoder,
            )
        )
        start += count
    return specs


def planned_job(store: JobStore, job_id: str, frame_counts: list[int], *, owner: str = "alice") -> None:
    """A job that went QUEUED → PLANNING → RENDERING with these chunks."""
    store.create_job(
        job_id,
        owner=owner,
        options=JobOptions(swapper="classic"),
        video_uri="file:///v.mp4",
        face_uri="file:///f.png",
    )
    assert store.set_status(job_id, JobStatus.PLANNING)
    assert store.record_plan(
        job_id, make_specs(job_id, frame_counts), frames_total=sum(frame_counts), video_info_json="{}"
    )
