"""A farm of real processes for the reliability tests, and the outcome recorder behind RELIABILITY.md.

The farm: a restartable redis-server (AOF and a password optional), N render workers and a CPU worker
(Celery subprocesses running the real pipeline on the CPU), the reconciler in a thread, and the API
(uvicorn in a thread) with a token per owner. Timings are shortened (stall after 6 s, reconcile every
second) so recoveries happen within a test's seconds. Test faults are chosen per uploaded video name
through ``FACEFARM_FAULT_INJECTION`` (shared.faults), so one farm serves every fault test.

The recorder: each test calls ``record(category, case, outcome, **details)``; the lines go to
``$FACEFARM_RELIABILITY_OUT`` (default: the session's temp dir) and
``scripts/make_reliability_table.py`` turns them into ``tests/RELIABILITY.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from dispatcher import service
from dispatcher.app import create_app
from dispatcher.auth import hash_token
from dispatcher.reconciler import run_reconciler
from dispatcher.service import FarmContext, create_context
from shared.schemas import JobOptions, JobView
from shared.settings import Settings
from tests.integration.reliability.corpus import CORPUS_LIMITS
from tests.support.farm import farm_env, settings_from
from tests.support.services import CeleryWorker, free_port, require_tool, serve_app, start_celery_worker

RESULTS_ENV = "FACEFARM_RELIABILITY_OUT"
TOKENS = {"alice": "alice-reliability-token-5f1c9a", "bob": "bob-reliability-token-77d2e0"}
VIDEO_W, VIDEO_H, VIDEO_FPS = 160, 96, 15
OPTIONS = JobOptions(swapper="classic", upscale=1, face_selector="all")

# One farm, many faults: each applies only to jobs whose uploaded video has the given name.
FAULTS = ";".join(
    [
        "sleep:chunk,video=slow*.mp4,s=0.3",
        "raise:chunk,index=1,video=poison_raise.mp4",
        "exit:chunk,index=1,video=poison_exit.mp4",
        "exit:merge,video=merge_kill.mp4,times=1",
        "raise:chunk,worker=render2,video=blockme*.mp4",
    ]
)
FAST_RECOVERY = {
    "FACEFARM_STALL_AFTER_S": "6",
    "FACEFARM_RECONCILE_INTERVAL_S": "1",
    "FACEFARM_WORKER_SEEN_TTL_S": "5",
    "FACEFARM_MAX_ATTEMPTS": "3",
    "FACEFARM_WORKER_BLOCK_AFTER_FAILURES": "5",
    "FACEFARM_WORKER_BLOCK_TTL_S": "600",
    **CORPUS_LIMITS,
}


# --- outcome recorder ------------------------------------------------------------------------------


def results_path(tmp_root: Path) -> Path:
    configured = os.environ.get(RESULTS_ENV)
    return Path(configured) if configured else tmp_root / "reliability-outcomes.jsonl"


@pytest.fixture(scope="session")
def outcomes_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = results_path(tmp_path_factory.getbasetemp())
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


Recorder = Callable[..., None]


@pytest.fixture
def record(outcomes_file: Path, request: pytest.FixtureRequest) -> Recorder:
    """``record(category, case, outcome, **details)``: one JSON line per proven (or failed) case."""
    lock = threading.Lock()

    def write(category: str, case: str, outcome: str, **details: Any) -> None:
        line = {"category": category, "case": case, "outcome": outcome, "test": request.node.name, **details}
        with lock, outcomes_file.open("a") as f:
            f.write(json.dumps(line, sort_keys=True, default=str) + "\n")

    return write


# --- media -------------------------------------------------------------------------------------------


def insightface_image(name: str) -> Path:
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / name


def make_face_video(path: Path, frames: int, *, gop: int = 1000, audio: bool = True) -> Path:
    """Real faces (insightface's t1.jpg) panning slowly; one keyframe unless ``gop`` says otherwise."""
    require_tool("ffmpeg")
    photo = cv2.imread(str(insightface_image("t1.jpg")))
    crop = photo[120:620, 0:830]
    args = ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24"]
    args += ["-s", f"{VIDEO_W}x{VIDEO_H}", "-r", str(VIDEO_FPS), "-i", "-"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={frames / VIDEO_FPS:.3f}"]
    args += ["-c:v", "libx264", "-preset", "veryfast", "-g", str(gop), "-keyint_min", str(gop)]
    args += ["-sc_threshold", "0", "-pix_fmt", "yuv420p", "-threads", "1"]
    if audio:
        args += ["-c:a", "aac", "-shortest"]
    args += [str(path)]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    for i in range(frames):
        x0 = (i * 2) % 40
        frame = cv2.resize(crop[:, x0 : x0 + 790], (VIDEO_W, VIDEO_H), interpolation=cv2.INTER_AREA)
        proc.stdin.write(np.ascontiguousarray(frame).tobytes())
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    return path


def framemd5(path_or_url: str) -> list[str]:
    """Per-frame MD5s of the decoded video (``ffmpeg -f framemd5``), comment lines dropped."""
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-threads", "1", "-i", path_or_url, "-map", "0:v:0", "-f", "framemd5", "-"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return [line for line in out.stdout.splitlines() if line and not line.startswith("#")]


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the shared test clips: 45, 30 and 15 frames (3, 2 and 1 chunks)."""
    root = tmp_path_factory.mktemp("rel-videos")
    make_face_video(root / "base45.mp4", 45)
    make_face_video(root / "base30.mp4", 30)
    make_face_video(root / "base15.mp4", 15)
    return root


@pytest.fixture(scope="session")
def face_image() -> Path:
    return insightface_image("Tom_Hanks_54745.png")


# --- redis -----------------------------------------------------------------------------------------


class RedisProcess:
    """A redis-server that can be killed and restarted on the same port and directory."""

    def __init__(self, workdir: Path, *, aof: bool = False, password: str | None = None) -> None:
        require_tool("redis-server")
        self.workdir = workdir
        self.port = free_port()
        self.aof = aof
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "redis.log"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        args += ["--save", "", "--maxmemory-policy", "noeviction", "--logfile", str(self.log_path)]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not self.answers():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def answers(self) -> bool:
        cmd = ["redis-cli", "-p", str(self.port), "--no-auth-warning"]
        if self.password:
            cmd += ["-a", self.password]
        try:
            out = subprocess.run([*cmd, "ping"], capture_output=True, text=True, timeout=2)
        except subprocess.TimeoutExpired:
            return False
        return out.stdout.strip() == "PONG"

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what AOF already has survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


# --- the farm ----------------------------------------------------------------------------------------


@dataclass
class Farm:
    ctx: FarmContext
    settings: Settings
    env: dict[str, str]
    inputs: Path
    storage_root: Path | None
    redis: RedisProcess
    render_workers: list[CeleryWorker]
    cpu_worker: CeleryWorker
    api_url: str
    logs_dir: Path
    reconciler_stop: threading.Event = field(default_factory=threading.Event)
    check_worker: CeleryWorker | None = None

    @property
    def all_workers(self) -> list[CeleryWorker]:
        extra = [self.check_worker] if self.check_worker is not None else []
        return [*self.render_workers, self.cpu_worker, *extra]

    def worker(self, name: str) -> CeleryWorker:
        node = name.split("@")[0]
        return next(w for w in self.all_workers if w.name == node)

    def worker_logs(self, tail_chars: int = 3000) -> str:
        return "\n".join(f"--- {w.name} ---\n{w.log()[-tail_chars:]}" for w in self.all_workers)

    def node(self, name: str) -> str:
        """The Celery node name of worker ``name`` (``render0@host``)."""
        import socket

        return f"{name}@{socket.gethostname()}"

    def client(self, owner: str = "alice") -> Any:
        from facefarm.client import FarmClient

        return FarmClient(self.api_url, TOKENS[owner])

    def submit(
        self,
        video: Path,
        face: Path,
        *,
        name: str | None = None,
        owner: str = "alice",
        options: JobOptions = OPTIONS,
    ) -> JobView:
        """Submit ``video`` under the upload name ``name`` (that is what test faults match)."""
        name = name or video.name
        local = self.inputs / name
        if not local.exists():
            shutil.copyfile(video, local)
        with face.open("rb") as f:
            return service.submit_job(
                self.ctx,
                owner=owner,
                video=local.as_uri(),
                video_name=name,
                face=f,
                face_name=face.name,
                options=options,
            )

    def wait(
        self, job_id: str, done: Callable[[JobView], bool] | None = None, *, timeout_s: float = 180.0,
        owner: str = "alice", poll_s: float = 0.1,
    ) -> list[JobView]:  # fmt: skip
        """Poll until ``done(view)`` (default: finished); every view seen, or AssertionError with logs."""
        done = done or (lambda v: v.status.finished)
        seen: list[JobView] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                view = service.get_job(self.ctx, owner, job_id)
            except Exception:  # noqa: BLE001 - Redis restarting: keep polling
                time.sleep(poll_s)
                continue
            seen.append(view)
            if done(view):
                return seen
            time.sleep(poll_s)
        logs = "\n".join(self.ctx.store.logs(job_id))
        raise AssertionError(
            f"job {job_id} stuck at {seen[-1] if seen else None}\n{logs}\n{self.worker_logs()}"
        )

    def output_path(self, job_id: str, owner: str = "alice") -> str:
        return service.output_location(self.ctx, owner, job_id)


@contextmanager
def run_reliability_farm(
    workdir: Path,
    *,
    render_workers: int = 3,
    overrides: Mapping[str, str] | None = None,
    aof: bool = False,
    password: str | None = None,
    storage_url: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Farm]:
    """Start everything; stop everything (also when the test fails)."""
    inputs, logs = workdir / "inputs", workdir / "logs"
    inputs.mkdir()
    logs.mkdir()
    storage_root = None
    if storage_url is None:
        storage_root = workdir / "storage"
        storage_root.mkdir()
        storage_url = storage_root.as_uri()
    redis = RedisProcess(workdir, aof=aof, password=password)
    with ExitStack() as stack:
        redis.start()
        stack.callback(redis.stop)
        values = {**FAST_RECOVERY, "FACEFARM_FAULT_INJECTION": FAULTS, **(overrides or {})}
        env = {**farm_env(redis.url, storage_url, inputs, values), **(extra_env or {})}
        workers: list[CeleryWorker] = []
        stack.callback(lambda: [w.stop() for w in workers])
        for i in range(render_workers):
            workers.append(start_celery_worker("worker.celery_app", "gpu", f"render{i}", env, logs))
        workers.append(start_celery_worker("dispatcher.celery_app", "cpu", "cpu0", env, logs))
        checker = start_celery_worker("worker.celery_app", "check", "check0", env, logs)
        workers.append(checker)
        for worker in workers:
            worker.wait_ready()
        settings = settings_from(
            env, api_tokens={hash_token(token): owner for owner, token in TOKENS.items()}
        )
        ctx = create_context(settings)
        stop = threading.Event()
        reconciler = threading.Thread(
            target=run_reconciler, args=(settings, stop), kwargs={"ctx": ctx}, daemon=True, name="reconciler"
        )
        reconciler.start()
        stack.callback(reconciler.join, 10)
        stack.callback(stop.set)
        api_url = stack.enter_context(serve_app(create_app(settings)))
        farm = Farm(
            ctx,
            settings,
            env,
            inputs,
            storage_root,
            redis,
            workers[:-2],
            workers[-2],
            api_url,
            logs,
            stop,
            check_worker=checker,
        )
        _wait_for_live_workers(farm, render_workers)
        yield farm


def _wait_for_live_workers(farm: Farm, count: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(farm.ctx.store.live_workers(farm.settings.worker_seen_ttl_s)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"render workers never heartbeat:\n{farm.worker_logs()}")
        time.sleep(0.1)


@pytest.fixture(scope="package")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    """The shared farm: 3 render workers (so 3 attempts can land on 3 distinct workers)."""
    with run_reliability_farm(tmp_path_factory.mktemp("relfarm")) as running:
        yield running
