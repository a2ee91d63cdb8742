"""A private redis-server for the store's reliability rules (the store has no in-memory twin)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from shared.state import JobStore
from tests.support.services import redis_server


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    job_store = JobStore.from_url(redis_url, max_attempts=3, block_after_failures=3, block_ttl_s=60)
    yield job_store
    job_store.close()
    client.close()
