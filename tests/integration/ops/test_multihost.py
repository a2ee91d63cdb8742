"""Several hosts for real: the head (Redis, moto S3, API, cpu worker) and render-worker hosts in their
own network, UTS and mount namespaces, talking only over veth links the test creates. One job's
chunks render on two hosts, a third host joins mid-job and takes chunks, and the merge is whole.

Every service runs the compose file's ``command:`` with its ``environment:``; the compose host names
become the head's addresses on each link, the ports are the compose ports (free in a fresh namespace).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import boto3
import httpx
import pytest

from facefarm.client import FarmClient
from shared.schemas import ChunkStatus, JobOptions, JobStatus, JobView
from shared.state import JobStore
from tests.integration.ops import netns
from tests.integration.ops.compose import load_services, local_command
from tests.integration.ops.conftest import (
    FACEFARM,
    SPEED_ENV,
    count_frames,
    insightface_image,
    make_face_clip,
    model_store_path,
    ping_workers,
    service_env,
    token_map,
)
from tests.integration.ops.processes import Services, redis_config, services, wait_for

pytestmark = pytest.mark.integration

FRAMES, CHUNK_FRAMES = 288, 8  # 36 chunks: enough left when the late host has registered (~5 s)
REDIS_PORT, S3_PORT, API_PORT = 6379, 9000, 8000  # the compose ports: free in a fresh namespace
JOB_TIMEOUT_S = 240.0
RENDER_NODE = "cpu0-0"  # `facefarm worker --gpus none`'s node name, @ the host's name


def test_chunks_render_on_several_hosts_and_a_host_joining_mid_job_takes_chunks(tmp_path: Path) -> None:
    password, token = "ff" + tmp_path.name.encode().hex()[:30], "tok-" + tmp_path.name
    variables = {
        "REDIS_PASSWORD": password,
        "MINIO_ROOT_PASSWORD": "moto-" + password,
        "FLOWER_BASIC_AUTH": "ops:unused-here",
        "FACEFARM_API_TOKENS": token_map(token, "alice"),
    }
    compose = load_services(variables)
    store_source = model_store_path()
    clip = make_face_clip(tmp_path / "multihost.mp4", FRAMES)

    with netns.topology(workers=3) as topo, services(tmp_path / "logs") as group:
        head = topo.head
        head_prefix = head.prefix(netns.HEAD_HOST_SCRIPT)
        head_hosts = {
            "redis:6379": f"127.0.0.1:{REDIS_PORT}",
            "http://minio:9000": f"http://{head.own_addr}:{S3_PORT}",
        }
        head_home = tmp_path / "head-home"
        head_home.mkdir()
        bind = " ".join(["127.0.0.1", head.own_addr, *(w.head_addr for w in topo.workers)])
        group.start(
            "redis",
            ["redis-server", "-"],
            {"PATH": "/usr/bin:/bin"},
            prefix=head_prefix,
            stdin_text=redis_config(REDIS_PORT, password, tmp_path, bind=bind),
        )
        moto = str(Path(sys.executable).with_name("moto_server"))
        group.start(
            "moto", [moto, "-H", "0.0.0.0", "-p", str(S3_PORT)], {"PATH": "/usr/bin:/bin"}, prefix=head_prefix
        )
        redis_from_root = f"redis://:{password}@{head.own_addr}:{REDIS_PORT}/0"
        s3_from_root = f"http://{head.own_addr}:{S3_PORT}"
        wait_for(
            "redis in the head",
            lambda: JobStore.from_url(redis_from_root, max_attempts=1).ping(),
            20,
            on_fail=group.logs,
        )
        api_env = compose["api"].environment
        s3 = boto3.client(
            "s3",
            endpoint_url=s3_from_root,
            region_name=api_env["FACEFARM_S3_REGION"],
            aws_access_key_id=api_env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=api_env["AWS_SECRET_ACCESS_KEY"],
        )
        wait_for("moto in the head", lambda: s3.list_buckets() is not None, 30, on_fail=group.logs)
        s3.create_bucket(Bucket=api_env["FACEFARM_STORAGE_URL"].removeprefix("s3://"))

        for name in ("api", "cpu-worker"):
            # the head's cpu-worker runs the face check too, so it needs the models (the image bakes them)
            head_env = {**SPEED_ENV, "FACEFARM_MODEL_STORE": str(store_source)}
            env = service_env(compose[name].environment, head_hosts, head_env, head_home)
            group.start(name, local_command(compose[name].command, FACEFARM), env, prefix=head_prefix)
        api_url = f"http://{head.own_addr}:{API_PORT}"

        def start_worker_host(host: netns.Host) -> None:
            hosts = {
                "redis:6379": f"{host.head_addr}:{REDIS_PORT}",
                "http://minio:9000": f"http://{host.head_addr}:{S3_PORT}",
            }
            overrides = {
                **SPEED_ENV,
                "FACEFARM_MODEL_STORE": "/tmp/models",  # this host's own copy (made by the host script)
                "TMPDIR": "/tmp/scratch",
                "FF_MODEL_STORE_SOURCE": str(store_source),
            }
            env = service_env(compose["gpu-worker"].environment, hosts, overrides, Path("/tmp/home"))
            argv = local_command(compose["gpu-worker"].command, FACEFARM, {"--gpus": "none"})
            group.start(host.hostname, argv, env, prefix=host.prefix(netns.WORKER_HOST_SCRIPT))

        first, second, late = topo.workers
        for host in (first, second):
            start_worker_host(host)
        wait_for("the API in the head", lambda: _healthy(api_url), 60, on_fail=group.logs)
        expected = {
            f"dispatch-0@{head.hostname}",
            f"check-0@{head.hostname}",
            f"{RENDER_NODE}@{first.hostname}",
            f"{RENDER_NODE}@{second.hostname}",
        }
        wait_for(
            "head and two worker hosts",
            lambda: expected <= ping_workers(redis_from_root),
            90,
            on_fail=group.logs,
        )
        _assert_worker_hosts_share_no_files(first, clip)

        state = JobStore.from_url(redis_from_root, max_attempts=3)
        try:
            with FarmClient(api_url, token) as client:
                job_id = client.submit(
                    clip,
                    insightface_image("Tom_Hanks_54745.png"),
                    JobOptions(swapper="classic", chunk_frames=CHUNK_FRAMES),
                )
                wait_for(
                    "rendering on the first hosts",
                    lambda: _started(state, job_id) >= 1,
                    120,
                    on_fail=group.logs,
                )
                joined_at = time.time()
                start_worker_host(late)
                late_node = f"{RENDER_NODE}@{late.hostname}"
                wait_for(
                    "the late host",
                    lambda: late_node in ping_workers(redis_from_root),
                    90,
                    on_fail=group.logs,
                )
                committed_when_joined = _committed(state, job_id)
                joined_s = time.time() - joined_at
                final = _wait_finished(client, job_id, group)
                assert final.status is JobStatus.COMPLETED, (final, client.logs(job_id), group.logs())
                output = client.download(job_id, tmp_path / "merged.mp4")  # the API redirects to S3
            chunks = state.chunks(job_id)
        finally:
            state.close()

        chunks_total = FRAMES // CHUNK_FRAMES
        assert [c.status for c in chunks] == [ChunkStatus.COMMITTED] * chunks_total
        assert committed_when_joined < chunks_total - 2, (
            f"the late host took {joined_s:.0f} s to register; only "
            f"{chunks_total - committed_when_joined} chunks were left: the machine is too slow for this test"
        )
        by_host = Counter(c.worker for c in chunks)
        names = {h: f"{RENDER_NODE}@{h.hostname}" for h in topo.workers}
        assert by_host[names[first]] >= 1 and by_host[names[second]] >= 1, by_host
        assert by_host[names[late]] >= 1, (by_host, group.logs())  # the host that joined took chunks
        late_starts = [a.start for c in chunks for a in c.attempts if a.worker == names[late]]
        first_starts = [a.start for c in chunks for a in c.attempts if a.worker != names[late]]
        assert min(first_starts) < joined_at < min(late_starts)  # it joined a job already rendering
        assert sum(by_host.values()) == chunks_total and set(by_host) == set(names.values())
        assert count_frames(str(output)) == FRAMES
        assert _has_audio(output)


def _healthy(api_url: str) -> bool:
    return httpx.get(f"{api_url}/healthz", timeout=2).status_code == 200


def _started(state: JobStore, job_id: str) -> int:
    """Chunks some attempt has claimed (0 until the job is planned)."""
    if not state.get_job(job_id).chunks_total:
        return 0
    return sum(1 for c in state.chunks(job_id) if c.attempts)


def _committed(state: JobStore, job_id: str) -> int:
    return sum(1 for c in state.chunks(job_id) if c.status is ChunkStatus.COMMITTED)


def _wait_finished(client: FarmClient, job_id: str, group: Services) -> JobView:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        view = client.status(job_id)
        if view.status.finished:
            return view
        assert time.monotonic() < deadline, (view, group.logs())
        time.sleep(0.3)


def _assert_worker_hosts_share_no_files(host: netns.Host, clip: Path) -> None:
    """The worker host's /tmp is its own: the test's files (and the clip) do not exist there."""
    argv = ["sh", "-c", f'test "$(hostname)" = {host.hostname} && test ! -e {clip} && test -d /tmp/models']
    done = subprocess.run(
        [*host.prefix(netns.WORKER_HOST_SCRIPT), *argv],
        env={"PATH": "/usr/bin:/bin", "FF_MODEL_STORE_SOURCE": str(model_store_path())},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def _has_audio(path: Path) -> bool:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "a",
            "-show_entries",
            "stream=codec_type",
            "-of",
            "csv=p=0",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return "audio" in out.stdout
