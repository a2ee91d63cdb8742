"""A whole farm per test module: redis-server, storage, 2 render workers + 1 cpu worker (Celery subprocesses).

Workers run on the CPU (``FACEFARM_DEVICE=cpu``) with the real pipeline, real ffmpeg and the shipped
weights from the test model store; videos are tiny (160x96, tens of frames) so a job takes seconds.
The processes come from ``tests.support``; this module adds the in-process ``FarmContext``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from dispatcher.service import FarmContext, create_context
from shared.settings import Settings
from tests.support.farm import FarmProcesses, run_farm
from tests.support.media import insightface_image, make_multiface_video
from tests.support.services import (
    S3_TEST_ENV,
    CeleryWorker,
    moto_s3_server,
    use_s3_test_credentials,
)

VIDEO_W, VIDEO_H, VIDEO_FPS = 160, 96, 15
BATCH_FRAMES = 4
CHUNK_FRAMES = 15
STALL_VIDEO = "stall-multiface.mp4"  # rendered slowly (test fault hook), so a chunk can be frozen mid-way
FARM_OVERRIDES = {
    "FACEFARM_BATCH_FRAMES": str(BATCH_FRAMES),
    "FACEFARM_CHUNK_FRAMES": str(CHUNK_FRAMES),
    "FACEFARM_FAULT_INJECTION": f"sleep:chunk,video={STALL_VIDEO},s=0.5",
}


@dataclass
class Farm:
    ctx: FarmContext
    settings: Settings
    env: dict[str, str]
    inputs: Path
    render_workers: list[CeleryWorker]
    cpu_worker: CeleryWorker
    check_worker: CeleryWorker

    def worker_logs(self) -> str:
        return "\n".join(w.log()[-3000:] for w in [*self.render_workers, self.cpu_worker, self.check_worker])


@contextmanager
def farm_with_context(
    workdir: Path, storage_url: str, extra_env: Mapping[str, str], *, render_workers: int = 2
) -> Iterator[Farm]:
    """The processes of ``run_farm`` plus a ``FarmContext`` for calling the service in-process."""
    with run_farm(
        workdir, storage_url, {**FARM_OVERRIDES, **extra_env}, render_workers=render_workers
    ) as procs:
        yield _farm(procs)


def _farm(procs: FarmProcesses) -> Farm:
    ctx = create_context(procs.settings)
    return Farm(
        ctx,
        procs.settings,
        procs.env,
        procs.inputs,
        procs.render_workers,
        procs.cpu_worker,
        procs.check_worker,
    )


@pytest.fixture(scope="module")
def local_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    workdir = tmp_path_factory.mktemp("farm")
    storage = workdir / "storage"
    storage.mkdir()
    with farm_with_context(workdir, storage.as_uri(), {}) as farm:
        yield farm


@pytest.fixture(scope="module")
def s3_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    workdir = tmp_path_factory.mktemp("s3farm")
    with moto_s3_server() as endpoint:
        use_s3_test_credentials()
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="farm-test")
        extra = {**S3_TEST_ENV, "FACEFARM_S3_ENDPOINT_URL": endpoint}
        with farm_with_context(workdir, "s3://farm-test/facefarm", extra, render_workers=1) as farm:
            yield farm


@pytest.fixture(scope="session")
def multiface_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """45 frames, one keyframe: 3 chunks of 15, each starting between keyframes."""
    return make_multiface_video(
        tmp_path_factory.mktemp("videos") / "multiface.mp4", 45, width=VIDEO_W, height=VIDEO_H, fps=VIDEO_FPS
    )


@pytest.fixture(scope="session")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 frames (8 chunks) so a cancel lands mid-render."""
    return make_multiface_video(
        tmp_path_factory.mktemp("videos") / "long.mp4",
        120,
        gop=60,
        width=VIDEO_W,
        height=VIDEO_H,
        fps=VIDEO_FPS,
    )


@pytest.fixture(scope="session")
def face_image() -> Path:
    return insightface_image("Tom_Hanks_54745.png")
