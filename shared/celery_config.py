"""Celery settings as a plain dict (no celery import), one profile per worker role.

Why each value (research/renderfarm-celery.md §2): long chunks with ``acks_late`` need a Redis
visibility timeout far above the hard time limit, set in all three places Celery reads it; prefetch 1
so a busy process hoards nothing; ``reject_on_worker_lost`` so a killed child's chunk comes back (our
own delivery counter in the state store caps the loop); JSON only; events on for Flower.
"""

from __future__ import annotations

from typing import Any, Literal

from shared.names import CHECK_INPUTS, CHECK_QUEUE, CPU_QUEUE, GPU_QUEUE, MERGE_JOB, PLAN_JOB, RENDER_CHUNK
from shared.settings import Settings

Role = Literal["cpu", "gpu"]

RESULT_EXPIRES_S = 24 * 3600
GPU_MAX_TASKS_PER_CHILD = 50
PROC_ALIVE_TIMEOUT_S = 60.0
SOFT_SHUTDOWN_TIMEOUT_S = 60.0
BROKER_HEALTH_CHECK_S = 25


def task_routes() -> dict[str, dict[str, str]]:
    """Check inputs on the check queue, render on the gpu queue, plan and merge on the cpu queue."""
    return {
        CHECK_INPUTS: {"queue": CHECK_QUEUE},
        RENDER_CHUNK: {"queue": GPU_QUEUE},
        PLAN_JOB: {"queue": CPU_QUEUE},
        MERGE_JOB: {"queue": CPU_QUEUE},
    }


def celery_config(settings: Settings, *, role: Role) -> dict[str, Any]:
    """The ``app.conf`` mapping for a worker (or sender) of ``role``."""
    if role not in ("cpu", "gpu"):
        raise ValueError(f"role must be 'cpu' or 'gpu', not {role!r}")
    visibility = {"visibility_timeout": settings.visibility_timeout_s}
    config: dict[str, Any] = {
        "broker_url": settings.redis_url,
        "result_backend": settings.backend_url,
        "broker_transport_options": {**visibility, "health_check_interval": BROKER_HEALTH_CHECK_S},
        "result_backend_transport_options": dict(visibility),
        "visibility_timeout": settings.visibility_timeout_s,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_track_started": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_soft_shutdown_timeout": SOFT_SHUTDOWN_TIMEOUT_S,
        "result_expires": RESULT_EXPIRES_S,
        "task_routes": task_routes(),
        "task_default_queue": CPU_QUEUE,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "timezone": "UTC",
        "enable_utc": True,
    }
    if role == "gpu":
        config.update(
            worker_concurrency=1,
            worker_pool="prefork",
            worker_max_tasks_per_child=GPU_MAX_TASKS_PER_CHILD,
            worker_proc_alive_timeout=PROC_ALIVE_TIMEOUT_S,
        )
    return config
