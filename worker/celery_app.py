"""The render worker's Celery app (gpu and check queues) and the per-process resources its tasks use.

``celery -A worker.celery_app worker -Q gpu -P prefork -c 1`` names this module. Nothing here touches
CUDA or imports torch: the pipeline is imported lazily inside the task, in the forked child, so the
parent never initialises a device (research/renderfarm-celery.md §2.4). Resources (state store,
storage) are created per child by ``worker.hooks`` and reached through ``get_resources``.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from shared.celery_config import celery_config
from shared.settings import Settings, get_settings
from shared.state import JobStore
from shared.storage import Storage, create_storage

app = Celery(
    "facefarm-worker", include=["worker.tasks", "worker.checks", "worker.hooks"], set_as_current=False
)
app.add_defaults(lambda: celery_config(get_settings(), role="gpu"))


@dataclass
class WorkerResources:
    """What one worker process owns: its settings, a state-store client and a storage client."""

    settings: Settings
    store: JobStore
    storage: Storage

    def close(self) -> None:
        self.store.close()


_resources: list[WorkerResources] = []


def open_resources(settings: Settings | None = None) -> WorkerResources:
    """Create this process's resources (replacing any inherited from a parent before fork)."""
    settings = settings or get_settings()
    _resources[:] = [
        WorkerResources(
            settings=settings, store=JobStore.from_settings(settings), storage=create_storage(settings)
        )
    ]
    return _resources[0]


def close_resources() -> None:
    while _resources:
        _resources.pop().close()


def get_resources() -> WorkerResources:
    """This process's resources, created on first use if no hook did it yet."""
    return _resources[0] if _resources else open_resources()
