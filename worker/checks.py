"""``facefarm.check_inputs``: the Celery shell around ``worker.preflight``, first step of every job.

Runs on the ``check`` queue in a CPU-only process (``facefarm worker`` starts one). On success it
enqueues planning (``facefarm.plan_job`` on the cpu queue, by name: the worker never imports the
dispatcher); a permanent error ends the job FAILED with its message; storage hiccups retry.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from celery import Task

from shared.errors import PermanentError, RetryableError
from shared.images import read_face_image
from shared.model_store import resolve_store
from shared.names import CHECK_INPUTS, CPU_QUEUE, PLAN_JOB
from shared.schemas import JobStatus
from worker.celery_app import app, get_resources

RETRY_COUNTDOWN_S = (1.0, 5.0, 15.0)


@app.task(name=CHECK_INPUTS, bind=True)
def check_inputs(self: Task, job_id: str) -> dict[str, Any]:
    """Refuse a face image without a usable face before planning; then hand the job to the planner."""
    res = get_resources()
    store, storage, settings = res.store, res.storage, res.settings
    job = store.get_job(job_id)
    if job.status is not JobStatus.QUEUED:  # cancelled, or a duplicate delivery after planning began
        return {"job_id": job_id, "skipped": job.status.value}
    from worker.preflight import check_face  # torch, lazily: the Celery parent stays light

    t0 = time.monotonic()
    name = job.audit.get("input_names", {}).get("face") or "face image"
    try:
        model_store = resolve_store(
            settings.model_store, settings=settings, cache_dir=settings.model_cache_dir
        )
        image = read_face_image(storage, job.face_uri, name)
        face = check_face(image, model_store, label=f"face image {name}")
        if job.reference_uri:
            check_face(
                read_face_image(storage, job.reference_uri, "reference image"),
                model_store,
                label="reference image",
            )
    except PermanentError as exc:
        store.append_log(job_id, f"input check failed: {exc}")
        store.fail_job(job_id, exc)
        return {"job_id": job_id, "failed": exc.kind}
    except RetryableError as exc:
        retries = self.request.retries
        if retries < len(RETRY_COUNTDOWN_S):
            store.append_log(job_id, f"input check hit a transient error, retrying: {exc}")
            raise self.retry(
                exc=exc, countdown=RETRY_COUNTDOWN_S[retries], max_retries=len(RETRY_COUNTDOWN_S)
            ) from exc
        store.append_log(job_id, f"input check failed after {retries + 1} tries: {exc}")
        store.fail_job(job_id, exc)
        return {"job_id": job_id, "failed": exc.kind}
    store.append_log(
        job_id,
        f"input check: the face image shows a {face.face.size_px:.0f} px face "
        f"({time.monotonic() - t0:.2f} s); planning",
    )
    app.send_task(
        PLAN_JOB,
        args=[job_id],
        queue=CPU_QUEUE,
        task_id=f"plan-{job_id}-{uuid.uuid4().hex[:8]}",
        argsrepr=f"job={job_id}",
    )
    return {"job_id": job_id, "face_px": round(face.face.size_px)}
