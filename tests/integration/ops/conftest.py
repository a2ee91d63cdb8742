"""The compose stack as local processes: every service's ``command:`` and ``environment:`` from
``docker-compose.yml``, with only these substitutions (all visible in ``compose_farm``):

* ``redis:6379`` → a local ``redis-server`` with ``requirepass`` on a free port;
* ``http://minio:9000`` → moto's S3 server (real HTTP) on a free port, bucket created;
* published ports → free ports on 127.0.0.1 (API, Flower); Flower's state file → a temp dir;
* ``gpu-worker``'s ``--gpus all`` → ``--gpus none`` (no GPU on CI);
* the model store → the session's test store (the images bake theirs in), and a few speed knobs
  for tiny clips on 2 cores (batch, warm-up, heartbeat interval, encoder threads).

One farm serves the whole package; the tests share it (and the job ``completed_job`` rendered).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from celery import Celery

from facefarm.client import FarmClient
from shared.schemas import JobOptions, JobView
from shared.state import JobStore
from tests.integration.ops.compose import PROJECT_ROOT, load_services, local_command, local_environment
from tests.integration.ops.processes import Services, http_ok, redis_config, services, wait_for
from tests.support.services import free_port, moto_s3_server

DEFAULT_TEST_MODEL_STORE = str(Path.home() / ".cache" / "facefarm" / "models")
VIDEO_W, VIDEO_H, VIDEO_FPS = 160, 96, 15
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
FACEFARM = str(Path(sys.executable).with_name("facefarm"))
JOB_TIMEOUT_S = 240.0
# The services the compose file runs on a CPU host (plus gpu-worker with --gpus none).
COMPOSE_SERVICES = ("api", "cpu-worker", "reconciler", "gpu-worker", "flower")
SPEED_ENV = {
    "FACEFARM_BATCH_FRAMES": "4",
    "FACEFARM_WARMUP_FRAMES": "2",
    "FACEFARM_HEARTBEAT_INTERVAL_S": "0.5",
    "FACEFARM_ENCODER_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}


def model_store_path() -> Path:
    from shared.model_store import ensure_store

    return ensure_store(Path(os.environ.get("FACEFARM_TEST_MODEL_STORE", DEFAULT_TEST_MODEL_STORE)))


def insightface_image(name: str) -> Path:
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / name


def make_face_clip(path: Path, frames: int) -> Path:
    """Real faces (insightface's t1.jpg) panning slowly, one keyframe, with an audio track."""
    photo = cv2.imread(str(insightface_image("t1.jpg")))
    assert photo is not None
    crop = photo[120:620, 0:830]  # four faces in a row
    args = ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24"]
    args += ["-s", f"{VIDEO_W}x{VIDEO_H}", "-r", str(VIDEO_FPS), "-i", "-"]
    args += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={frames / VIDEO_FPS:.3f}"]
    args += ["-c:v", "libx264", "-preset", "veryfast", "-g", "1000", "-sc_threshold", "0"]
    args += ["-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    for i in range(frames):
        view = crop[:, (i * 2) % 40 : (i * 2) % 40 + 790]
        frame = cv2.resize(view, (VIDEO_W, VIDEO_H), interpolation=cv2.INTER_AREA)
        proc.stdin.write(np.ascontiguousarray(frame).tobytes())
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    return path


def count_frames(path_or_url: str) -> int:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
         "stream=nb_read_frames", "-of", "json", path_or_url],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return int(json.loads(out.stdout)["streams"][0]["nb_read_frames"])


def token_map(token: str, owner: str) -> str:
    """FACEFARM_API_TOKENS: sha256(token) → owner, as the compose file documents."""
    return json.dumps({hashlib.sha256(token.encode()).hexdigest(): owner})


def ping_workers(redis_url: str, timeout_s: float = 1.0) -> set[str]:
    """Node names of the Celery workers that answer a broadcast ping through this broker."""
    app = Celery(broker=redis_url, set_as_current=False)
    try:
        replies = app.control.ping(timeout=timeout_s) or []
    finally:
        app.close()
    return {name for reply in replies for name, answer in reply.items() if answer.get("ok") == "pong"}


def wait_job(client: FarmClient, job_id: str, timeout_s: float, on_fail: object) -> list[JobView]:
    """Poll the job until it finishes; every view seen (the last one finished)."""
    seen: list[JobView] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen.append(client.status(job_id))
        if seen[-1].status.finished:
            return seen
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} stuck at {seen[-1]}\n{on_fail() if callable(on_fail) else ''}")


@dataclass
class ComposeFarm:
    api_url: str
    token: str
    redis_url: str
    flower_url: str
    flower_user: str
    flower_password: str
    s3_endpoint: str
    hostname: str
    group: Services
    envs: dict[str, dict[str, str]] = field(default_factory=dict)
    argvs: dict[str, list[str]] = field(default_factory=dict)

    def client(self) -> FarmClient:
        return FarmClient(self.api_url, self.token)

    def store(self) -> JobStore:
        return JobStore.from_url(self.redis_url, max_attempts=3)

    def logs(self) -> str:
        return self.group.logs()


def service_env(
    compose_env: Mapping[str, str], hosts: Mapping[str, str], overrides: Mapping[str, str], home: Path
) -> dict[str, str]:
    """A container-like environment: a bare base, the compose environment, the substitutions."""
    base = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home)}
    base["LANG"] = "C.UTF-8"
    return {**base, **local_environment(compose_env, hosts, overrides)}


@pytest.fixture(scope="package")
def compose_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeFarm]:
    import boto3

    workdir = tmp_path_factory.mktemp("compose")
    home = workdir / "home"
    home.mkdir()
    token = secrets.token_hex(16)
    flower_user, flower_password = "ops", secrets.token_hex(8)
    variables = {
        "REDIS_PASSWORD": secrets.token_hex(24),
        "MINIO_ROOT_PASSWORD": secrets.token_hex(24),
        "FLOWER_BASIC_AUTH": f"{flower_user}:{flower_password}",
        "FACEFARM_API_TOKENS": token_map(token, "alice"),
    }
    compose = load_services(variables)
    store = model_store_path()
    with services(workdir / "logs") as group, moto_s3_server() as s3_endpoint:
        redis_port = free_port()
        config = redis_config(redis_port, variables["REDIS_PASSWORD"], workdir)
        redis_proc = group.start("redis", ["redis-server", "-"], {"PATH": "/usr/bin:/bin"}, stdin_text=config)
        redis_url = f"redis://:{variables['REDIS_PASSWORD']}@127.0.0.1:{redis_port}/0"
        wait_for(
            "redis-server",
            lambda: JobStore.from_url(redis_url, max_attempts=1).ping(),
            10,
            on_fail=redis_proc.log,
        )
        api_env = compose["api"].environment
        s3 = boto3.client(
            "s3",
            endpoint_url=s3_endpoint,
            region_name=api_env["FACEFARM_S3_REGION"],
            aws_access_key_id=api_env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=api_env["AWS_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket=api_env["FACEFARM_STORAGE_URL"].removeprefix("s3://").split("/")[0])

        hosts = {"redis:6379": f"127.0.0.1:{redis_port}", "http://minio:9000": s3_endpoint}
        common = {"FACEFARM_MODEL_STORE": str(store), **SPEED_ENV}
        api_port, flower_port = free_port(), free_port()
        per_service = {
            "api": {"FACEFARM_API_HOST": "127.0.0.1", "FACEFARM_API_PORT": str(api_port)},
            "flower": {
                "FACEFARM_FLOWER_PORT": str(flower_port),
                "FLOWER_ADDRESS": "127.0.0.1",
                "FLOWER_DB": str(workdir / "flower.db"),
            },
        }
        replace_args = {"gpu-worker": {"--gpus": "none"}}
        farm = ComposeFarm(
            api_url=f"http://127.0.0.1:{api_port}",
            token=token,
            redis_url=redis_url,
            flower_url=f"http://127.0.0.1:{flower_port}",
            flower_user=flower_user,
            flower_password=flower_password,
            s3_endpoint=s3_endpoint,
            hostname=socket.gethostname(),
            group=group,
        )
        for name in COMPOSE_SERVICES:
            spec = compose[name]
            env = service_env(spec.environment, hosts, {**common, **per_service.get(name, {})}, home)
            argv = local_command(spec.command, FACEFARM, replace_args.get(name))
            farm.envs[name], farm.argvs[name] = env, argv
            group.start(name, argv, env)

        wait_for("the API's /healthz", lambda: http_ok(f"{farm.api_url}/healthz"), 60, on_fail=group.logs)
        wait_for("Flower", lambda: http_ok(f"{farm.flower_url}/healthcheck"), 60, on_fail=group.logs)
        yield farm


@pytest.fixture(scope="package")
def face_image() -> Path:
    return insightface_image("Tom_Hanks_54745.png")


@pytest.fixture(scope="package")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 frames: two chunks of 15."""
    return make_face_clip(tmp_path_factory.mktemp("clips") / "short.mp4", 30)


@dataclass(frozen=True)
class FinishedJob:
    job_id: str
    views: list[JobView]
    elapsed_s: float


@pytest.fixture(scope="package")
def completed_job(compose_farm: ComposeFarm, short_clip: Path, face_image: Path) -> FinishedJob:
    """A small classic-swapper job submitted through the API with ``FarmClient``, waited for."""
    t0 = time.monotonic()
    with compose_farm.client() as client:
        job_id = client.submit(short_clip, face_image, JobOptions(swapper="classic", chunk_frames=15))
        views = wait_job(client, job_id, JOB_TIMEOUT_S, compose_farm.logs)
    return FinishedJob(job_id, views, time.monotonic() - t0)


def flower_get(farm: ComposeFarm, path: str, *, auth: bool) -> httpx.Response:
    credentials = (farm.flower_user, farm.flower_password) if auth else None
    return httpx.get(f"{farm.flower_url}{path}", auth=credentials, timeout=10.0)


def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise AssertionError(
            "Debian's chromium is missing: `apt-get install -y chromium` (scripts/install.sh --dev)"
        )
    return found
