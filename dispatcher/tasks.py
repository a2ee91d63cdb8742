"""Thin Celery adapters for the cpu queue: plan a job, merge a job.

The work is in plain functions (``dispatcher.planner``, ``dispatcher.merger``, ``shared.media``);
these tasks only load the job, call them, record the outcome in the state store and enqueue the next
step by name. Permanent errors end the job FAILED with their message; retryable ones retry the task
a few times before they do.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init

from dispatcher.celery_app import app
from dispatcher.jobs import merge_job_now, plan_job_now
from dispatcher.service import FarmContext
from shared.errors import ExternalToolError, FaceFarmError, PermanentError, RetryableError
from shared.names import MERGE_JOB, PLAN_JOB
from shared.settings import get_settings
from shared.state import JobStore
from shared.storage import create_storage

RETRY_COUNTDOWN_S = (1.0, 5.0, 15.0)


def _send_task(
    name: str,
    args: list[Any],
    *,
    queue: str,
    task_id: str,
    argsrepr: str | None = None,
    countdown_s: float | None = None,
) -> None:
    app.send_task(name, args=args, queue=queue, task_id=task_id, argsrepr=argsrepr, countdown=countdown_s)


@lru_cache(maxsize=1)
def farm_context() -> FarmContext:
    """This process's context, created on first use in the child (never inherited across fork)."""
    settings = get_settings()
    return FarmContext(
        settings=settings,
        store=JobStore.from_settings(settings),
        storage=create_storage(settings),
        send_task=_send_task,
    )


@worker_process_init.connect
def _forget_parent_context(**_: Any) -> None:
    farm_context.cache_clear()


def _run(task: Task, job_id: str, step: str, fn: Any) -> dict[str, Any]:
    ctx = farm_context()
    try:
        return dict(fn(ctx, job_id))
    except SoftTimeLimitExceeded as exc:
        error: FaceFarmError = ExternalToolError(f"{step} of job {job_id} exceeded the soft time limit")
        return _give_up_or_retry(task, ctx, job_id, step, error, exc)
    except RetryableError as exc:
        return _give_up_or_retry(task, ctx, job_id, step, exc, exc)
    except PermanentError as exc:
        ctx.store.append_log(job_id, f"{step} failed: {exc}")
        ctx.store.fail_job(job_id, exc)
        return {"job_id": job_id, "failed": exc.kind}


def _give_up_or_retry(
    task: Task, ctx: FarmContext, job_id: str, step: str, error: FaceFarmError, exc: BaseException
) -> dict[str, Any]:
    retries = task.request.retries
    if retries < len(RETRY_COUNTDOWN_S):
        ctx.store.append_log(job_id, f"{step} hit a transient error, retrying: {error}")
        raise task.retry(exc=exc, countdown=RETRY_COUNTDOWN_S[retries], max_retries=len(RETRY_COUNTDOWN_S))
    ctx.store.append_log(job_id, f"{step} failed after {retries + 1} tries: {error}")
    ctx.store.fail_job(job_id, error)
    return {"job_id": job_id, "failed": error.kind}


@app.task(name=PLAN_JOB, bind=True)
def plan_job(self: Task, job_id: str) -> dict[str, Any]:
    """Probe, check limits, plan chunks, record them, enqueue the renders (longest first)."""
    return _run(self, job_id, "planning", plan_job_now)


@app.task(name=MERGE_JOB, bind=True)
def merge_job(self: Task, job_id: str) -> dict[str, Any]:
    """Concatenate the committed chunks, store the output, mark COMPLETED, then drop the chunks."""

    def merge(ctx: FarmContext, job: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix=f"ff-merge-{job}-") as tmp:
            return merge_job_now(ctx, job, Path(tmp), timeout_s=float(ctx.settings.task_soft_time_limit_s))

    return _run(self, job_id, "merge", merge)
