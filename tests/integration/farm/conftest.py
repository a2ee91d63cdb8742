"""A whole farm per test module: redis-server, storage, 2 render workers + 1 cpu worker (Celery subprocesses).

Workers run on the CPU (``FACEFARM_DEVICE=cpu``) with the real pipeline, real ffmpeg and the shipped
weights from the test model store; videos are tiny (160x96, tens of frames) so a job takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from dispatcher.service import FarmContext, create_context
from shared.settings import Settings
from tests.integration.farm.services import (
    S3_TEST_ENV,
    CeleryWorker,
    moto_s3_server,
    redis_server,
    start_celery_worker,
)

DEFAULT_TEST_MODEL_STORE = "/work/main/models-store"
VIDEO_W, VIDEO_H, VIDEO_FPS = 160, 96, 15
BATCH_FRAMES = 4
CHUNK_FRAMES = 15


def model_store_path() -> Path:
    from shared.model_store import ensure_store

    return ensure_store(Path(os.environ.get("FACEFARM_TEST_MODEL_STORE", DEFAULT_TEST_MODEL_STORE)))


def insightface_image(name: str) -> Path:
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / name


def make_multiface_video(path: Path, frames: int, *, gop: int = 1000) -> Path:
    """Several real faces (insightface's t1.jpg) panning slowly, long GOP (one keyframe), with audio."""
    photo = cv2.imread(str(insightface_image("t1.jpg")))
    crop = photo[120:620, 0:830]  # four faces in a row
    args = ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24"]
    args += ["-s", f"{VIDEO_W}x{VIDEO_H}", "-r", str(VIDEO_FPS), "-i", "-"]
    args += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={frames / VIDEO_FPS:.3f}"]
    args += ["-c:v", "libx264", "-preset", "veryfast", "-g", str(gop), "-keyint_min", str(gop)]
    args += ["-sc_threshold", "0", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    for i in range(frames):
        x0 = (i * 2) % 40
        view = crop[:, x0 : x0 + 790]
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


def keyframe_count(path: Path) -> int:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-skip_frame", "nokey", "-count_frames",
         "-show_entries", "stream=nb_read_frames", "-of", "json", str(path)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return int(json.loads(out.stdout)["streams"][0]["nb_read_frames"])


@dataclass
class Farm:
    ctx: FarmContext
    settings: Settings
    env: dict[str, str]
    inputs: Path
    render_workers: list[CeleryWorker]
    cpu_worker: CeleryWorker

    def worker_logs(self) -> str:
        return "\n".join(w.log()[-3000:] for w in [*self.render_workers, self.cpu_worker])


def farm_values(redis_url: str, storage_url: str, inputs: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """The farm's settings as FACEFARM_* environment values (workers) — the test builds Settings from them too."""
    return {
        "FACEFARM_REDIS_URL": redis_url,
        "FACEFARM_STORAGE_URL": storage_url,
        "FACEFARM_FILE_ROOTS": json.dumps([str(inputs)]),
        "FACEFARM_DEVICE": "cpu",
        "FACEFARM_MODEL_STORE": str(model_store_path()),
        "FACEFARM_BATCH_FRAMES": str(BATCH_FRAMES),
        "FACEFARM_CHUNK_FRAMES": str(CHUNK_FRAMES),
        "FACEFARM_WARMUP_FRAMES": "2",
        "FACEFARM_HEARTBEAT_INTERVAL_S": "0.5",
        "FACEFARM_STALL_AFTER_S": "60",
        "FACEFARM_TASK_TIME_LIMIT_S": "600",
        "FACEFARM_TASK_SOFT_TIME_LIMIT_S": "570",
        "FACEFARM_VISIBILITY_TIMEOUT_S": "1200",
        "FACEFARM_ENCODER_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def settings_from(values: Mapping[str, str]) -> Settings:
    prefix = "FACEFARM_"
    fields = {k[len(prefix) :].lower(): v for k, v in values.items() if k.startswith(prefix)}
    fields["file_roots"] = json.loads(fields["file_roots"])
    return Settings(**fields)


@contextmanager
def run_farm(
    workdir: Path, storage_url: str, extra_env: Mapping[str, str], *, render_workers: int = 2
) -> Iterator[Farm]:
    """redis-server + ``render_workers`` gpu-queue workers + 1 cpu-queue worker; stopped on exit."""
    inputs = workdir / "inputs"
    inputs.mkdir()
    logs = workdir / "logs"
    logs.mkdir()
    with redis_server(workdir) as redis_url:
        env = farm_values(redis_url, storage_url, inputs, extra_env)
        workers: list[CeleryWorker] = []
        try:
            for i in range(render_workers):
                workers.append(start_celery_worker("worker.celery_app", "gpu", f"render{i}", env, logs))
            cpu = start_celery_worker("dispatcher.celery_app", "cpu", "cpu0", env, logs)
            workers.append(cpu)
            for worker in workers:
                worker.wait_ready()
            for key, value in extra_env.items():
                if key.startswith("AWS_"):
                    os.environ.setdefault(key, value)
            settings = settings_from(env)
            ctx = create_context(settings)
            yield Farm(ctx, settings, env, inputs, workers[:-1], cpu)
        finally:
            for worker in workers:
                worker.stop()


@pytest.fixture(scope="module")
def local_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    workdir = tmp_path_factory.mktemp("farm")
    storage = workdir / "storage"
    storage.mkdir()
    with run_farm(workdir, storage.as_uri(), {}) as farm:
        yield farm


@pytest.fixture(scope="module")
def s3_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    import boto3

    workdir = tmp_path_factory.mktemp("s3farm")
    with moto_s3_server() as endpoint:
        for key, value in S3_TEST_ENV.items():
            os.environ.setdefault(key, value)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="farm-test")
        extra = {**S3_TEST_ENV, "FACEFARM_S3_ENDPOINT_URL": endpoint}
        with run_farm(workdir, "s3://farm-test/facefarm", extra, render_workers=1) as farm:
            yield farm


@pytest.fixture(scope="session")
def multiface_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """45 frames, one keyframe: 3 chunks of 15, each starting between keyframes."""
    return make_multiface_video(tmp_path_factory.mktemp("videos") / "multiface.mp4", 45)


@pytest.fixture(scope="session")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 frames (8 chunks) so a cancel lands mid-render."""
    return make_multiface_video(tmp_path_factory.mktemp("videos") / "long.mp4", 120, gop=60)


@pytest.fixture(scope="session")
def face_image() -> Path:
    return insightface_image("Tom_Hanks_54745.png")
