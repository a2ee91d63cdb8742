"""The compose stack, run as the same ``facefarm ...`` processes with the compose environment: the API
answers, the workers register with the password-protected Redis, and a real job completes on S3."""

from __future__ import annotations

import httpx
import pytest

from shared.schemas import ChunkStatus, JobStatus
from tests.integration.ops.conftest import (
    COMPOSE_SERVICES,
    ComposeFarm,
    FinishedJob,
    count_frames,
    ping_workers,
)
from tests.integration.ops.processes import wait_for

pytestmark = pytest.mark.integration


def test_services_run_the_compose_commands_with_the_compose_environment(compose_farm: ComposeFarm) -> None:
    for name in COMPOSE_SERVICES:
        env, argv = compose_farm.envs[name], compose_farm.argvs[name]
        assert argv[0].endswith("/facefarm") and argv[1] in ("api", "worker", "reconciler", "flower")
        assert (
            env["FACEFARM_ENVIRONMENT"] == "production" and env["FACEFARM_REQUIRE_REDIS_PASSWORD"] == "true"
        )
        assert env["FACEFARM_REDIS_URL"] == compose_farm.redis_url  # the password travels in the URL
        assert env["FACEFARM_STORAGE_URL"] == "s3://facefarm"
        assert env["FACEFARM_S3_ENDPOINT_URL"] == compose_farm.s3_endpoint
    assert compose_farm.argvs["gpu-worker"][1:4] == ["worker", "--gpus", "none"]
    for service in compose_farm.group.started:
        service.check_alive()


def test_api_answers_healthz_without_a_token(compose_farm: ComposeFarm) -> None:
    response = httpx.get(f"{compose_farm.api_url}/healthz", timeout=5)
    assert response.status_code == 200, response.text
    assert httpx.get(f"{compose_farm.api_url}/jobs", timeout=5).status_code == 401


def test_redis_refuses_clients_without_the_password(compose_farm: ComposeFarm) -> None:
    import redis

    no_password = compose_farm.redis_url.replace(compose_farm.redis_url.split("@")[0] + "@", "redis://")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(no_password).ping()


def test_cpu_and_render_workers_register_with_redis(compose_farm: ComposeFarm) -> None:
    host = compose_farm.hostname
    # cpu-worker (plan/merge and the face check), gpu-worker with --gpus none
    expected = {f"dispatch-0@{host}", f"check-0@{host}", f"cpu0-0@{host}"}
    seen: set[str] = set()

    def registered() -> bool:
        seen.update(ping_workers(compose_farm.redis_url))
        return expected <= seen

    wait_for("every worker answering ping", registered, 60, on_fail=compose_farm.logs)
    assert seen == expected


def test_a_small_job_submitted_with_farmclient_completes(
    compose_farm: ComposeFarm, completed_job: FinishedJob
) -> None:
    final = completed_job.views[-1]
    assert final.status is JobStatus.COMPLETED, (final, compose_farm.logs())
    assert final.frames_done == final.frames_total == 30 and final.chunks_done == 2
    progress = [v.frames_done for v in completed_job.views]
    assert progress == sorted(progress)
    store = compose_farm.store()
    try:
        chunks = store.chunks(completed_job.job_id)
    finally:
        store.close()
    assert [c.status for c in chunks] == [ChunkStatus.COMMITTED] * 2
    assert {c.worker for c in chunks} == {f"cpu0-0@{compose_farm.hostname}"}
    assert sum(c.stats.faces for c in chunks if c.stats) > 0
    with compose_farm.client() as client:
        output = client.download(completed_job.job_id, compose_farm.group.log_dir / "smoke-output.mp4")
    assert count_frames(str(output)) == 30
