"""Moved to ``tests.support.services``; this re-export keeps older imports working."""

from tests.support.services import (
    PROJECT_ROOT,
    S3_TEST_ENV,
    START_TIMEOUT_S,
    CeleryWorker,
    free_port,
    moto_s3_server,
    redis_server,
    start_celery_worker,
)

__all__ = [
    "PROJECT_ROOT",
    "S3_TEST_ENV",
    "START_TIMEOUT_S",
    "CeleryWorker",
    "free_port",
    "moto_s3_server",
    "redis_server",
    "start_celery_worker",
]
