"""Worker lifecycle hooks: per-child resources are opened after fork and closed at exit.

Opening is cheap (a Redis connection pool and an S3 client, both lazy), well within the
``worker_proc_alive_timeout``; models and the CUDA context are loaded later, on the first task.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

from worker.celery_app import close_resources, open_resources


@worker_process_init.connect
def _open_child_resources(**_: Any) -> None:
    open_resources()


@worker_process_shutdown.connect
def _close_child_resources(**_: Any) -> None:
    close_resources()
