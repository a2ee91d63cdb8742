"""Queue names, task names and state-store key layout: the strings both sides must agree on."""

from __future__ import annotations

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
# CPU-only worker processes that run the face detector on a job's inputs before it is planned
CHECK_QUEUE = "check"

CHECK_INPUTS = "facefarm.check_inputs"
PLAN_JOB = "facefarm.plan_job"
RENDER_CHUNK = "facefarm.render_chunk"
MERGE_JOB = "facefarm.merge_job"

KEY_PREFIX = "ff"


def job_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:job:{job_id}"


def chunk_key(job_id: str, index: int) -> str:
    return f"{KEY_PREFIX}:job:{job_id}:chunk:{index:05d}"


def storage_input_key(job_id: str, name: str) -> str:
    """``name`` is ``video`` or ``face`` (plus the original extension)."""
    return f"jobs/{job_id}/input/{name}"


def storage_chunk_key(job_id: str, index: int, ext: str) -> str:
    return f"jobs/{job_id}/chunks/{index:05d}/output.{ext}"


def storage_output_key(job_id: str, ext: str) -> str:
    return f"jobs/{job_id}/output.{ext}"
