"""Redis killed and restarted mid-job (AOF on, password on), S3 storage, the API with a token.

One job through the real client → API → workers → merger, with every secret configured (Redis
password, API token, S3 credentials). Redis is SIGKILLed while a chunk renders and restarted on the
same port and directory; the API, workers and reconciler reconnect and the job completes. Then every
process log is scanned for every secret.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import FaceFarmError
from shared.schemas import JobStatus
from tests.integration.reliability.conftest import (
    OPTIONS,
    TOKENS,
    Farm,
    Recorder,
    framemd5,
    run_reliability_farm,
)
from tests.support.services import moto_s3_server

pytestmark = pytest.mark.integration

REDIS_PASSWORD = "redis-pw-" + secrets.token_hex(8)
S3_KEY_ID = "AKIAFF" + secrets.token_hex(7).upper()
S3_SECRET = "s3secret-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def secret_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Farm, Path]]:
    import boto3

    workdir = tmp_path_factory.mktemp("secretfarm")
    log_file = workdir / "test-process.log"
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.DEBUG)
    # moto's own HTTP access log stands in for AWS's server side, not a FaceFarm process: presigned
    # URLs carry the access key *id* by design (SigV4), and S3 itself logs them too.
    handler.addFilter(lambda rec: not rec.name.startswith("werkzeug"))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID=S3_KEY_ID, AWS_SECRET_ACCESS_KEY=S3_SECRET, AWS_DEFAULT_REGION="us-east-1"
    )
    try:
        with moto_s3_server() as endpoint:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
                Bucket="rel-farm"
            )
            extra = {
                "AWS_ACCESS_KEY_ID": S3_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                "AWS_DEFAULT_REGION": "us-east-1",
                "FACEFARM_S3_ENDPOINT_URL": endpoint,
            }
            with run_reliability_farm(
                workdir,
                render_workers=1,
                aof=True,
                password=REDIS_PASSWORD,
                storage_url="s3://rel-farm/facefarm",
                overrides={"FACEFARM_S3_ENDPOINT_URL": endpoint},
                extra_env=extra,
            ) as farm:
                yield farm, log_file
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_redis_killed_mid_job_with_aof_restarts_and_the_job_completes(
    secret_farm: tuple[Farm, Path], videos: Path, face_image: Path, tmp_path: Path, record: Recorder
) -> None:
    farm, _ = secret_farm
    assert farm.redis.password and REDIS_PASSWORD in farm.settings.redis_url  # requirepass is on
    t0 = time.monotonic()
    with farm.client() as client:
        job_id = client.submit(str(videos / "base30.mp4"), str(face_image), OPTIONS)
    farm.wait(job_id, lambda v: v.stats.get("chunks_running", 0) >= 1 or v.status.finished)
    farm.redis.kill()
    time.sleep(1.0)
    farm.redis.start()  # same port, same dir: the AOF brings the job, chunks and queues back
    assert farm.ctx.store.get_job(job_id).status in (
        JobStatus.RENDERING,
        JobStatus.MERGING,
        JobStatus.COMPLETED,
    )
    final = farm.wait(job_id, timeout_s=150)[-1]
    seconds = time.monotonic() - t0
    assert final.status is JobStatus.COMPLETED, farm.ctx.store.logs(job_id)
    out = tmp_path / "out.mp4"
    with farm.client() as client:
        client.download(job_id, out)
    assert len(framemd5(str(out))) == 30
    record("restart", "redis-server SIGKILLed mid-render, restarted with AOF", "job COMPLETED, 30/30 frames",
           seconds=round(seconds, 1))  # fmt: skip


def test_no_secret_appears_in_any_process_log(secret_farm: tuple[Farm, Path], record: Recorder) -> None:
    farm, test_log = secret_farm
    logs = {p.name: p.read_text(errors="replace") for p in sorted(farm.logs_dir.glob("*.log"))}
    logs["test-process (API, reconciler, client)"] = test_log.read_text(errors="replace")
    assert any("render_chunk" in text for text in logs.values())  # the logs are real and non-empty
    job_logs = "\n".join(line for j in farm.ctx.store.active_job_ids() for line in farm.ctx.store.logs(j))
    for name, secret in {
        "redis password": REDIS_PASSWORD,
        "API token": TOKENS["alice"],
        "S3 access key id": S3_KEY_ID,
        "S3 secret key": S3_SECRET,
    }.items():
        for source, text in {**logs, "job logs": job_logs}.items():
            assert secret not in text, f"the {name} leaked into {source}"
        record("security", f"{name} absent from all process logs", "clean")


def test_wrong_redis_password_is_refused_with_a_clear_error(secret_farm: tuple[Farm, Path]) -> None:
    from shared.state import JobStore

    farm, _ = secret_farm
    store = JobStore.from_url(farm.settings.redis_url.replace(REDIS_PASSWORD, "wrong"), max_attempts=3)
    try:
        with pytest.raises(FaceFarmError, match="Redis"):
            store.ping()
    finally:
        store.close()
