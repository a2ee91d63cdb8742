"""Chunk throughput through Redis/Celery on 1, 2 and 4 GPUs: the multi-GPU row of issue #5.

    python3 bench/farm_bench.py --out $OUT --store .carry/farm/models-store --images .carry/farm/images \\
        --redis-server .carry/farm/bin/redis-server                      # every GPU count NVML allows
    .venv/bin/python bench/farm_bench.py --smoke --out /tmp/farm-smoke --store models-store   # CPU check

For each GPU count G (1, 2, 4, as many as exist) the harness starts a private redis-server and G
render workers exactly as ``facefarm worker --gpus 0..G-1 --per-gpu 1 --mps off --queues gpu``
builds them (``worker.runtime.mps.build_client_envs`` + ``build_worker_command``: one Celery prefork
worker per GPU, pinned with ``CUDA_VISIBLE_DEVICES``), warms every worker up with short chunks of the
same shape (model load, CUDA context, cuDNN), then records pre-planned jobs in the state store
(``JobStore.record_plan``, as ``plan_job_now`` does) and enqueues their chunks with
``dispatcher.service.enqueue_renders`` (the real task name and queue). The timed region runs from the
first enqueue to the last chunk COMMITTED (the commit time the worker records); merging is excluded:
no cpu-queue worker runs, the merge messages stay queued. Planning uses a ``VideoInfo`` read with PyAV
(the GPU machine has no ffprobe). Workers are fresh processes for every G, so each count pays the
same warm-up outside its timed region.

Raw results go to ``OUT/farm.json`` (rewritten after every G); a short table is printed last.
The harness asserts nothing about speed; targets (issue #5): 2 GPUs >= 1.9x, 4 GPUs >= 3.7x of 1 GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dispatcher.planner import chunk_spec, encoder_settings_for, plan_chunks  # noqa: E402
from dispatcher.service import FarmContext, enqueue_renders  # noqa: E402
from shared.celery_config import GPU_MAX_TASKS_PER_CHILD  # noqa: E402
from shared.cpus import usable_cpus  # noqa: E402
from shared.media import VideoInfo  # noqa: E402
from shared.names import storage_chunk_key  # noqa: E402
from shared.schemas import ChunkStatus, JobOptions, JobStatus  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.state import ChunkRecord, JobStore  # noqa: E402
from shared.storage import Storage, create_storage  # noqa: E402
from worker.runtime.mps import ClientEnv, build_client_envs, build_worker_command  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TARGETS = {2: 1.9, 4: 3.7}  # issue #5: throughput vs 1 GPU, same harness
DEFAULT_COUNTS = (1, 2, 4)
READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 20.0
POLL_S = 0.1
NVML_SAMPLE_S = 0.5
WARMUP_ROUNDS = 3
OWNER = "farm-bench"


# --- pure helpers ------------------------------------------------------------------------------


def parse_counts(spec: str, available: int) -> tuple[list[int], list[int]]:
    """``(counts to run, counts skipped for want of workers)`` from ``1,2,4``; 1 always runs first."""
    try:
        wanted = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise SystemExit(f"--counts {spec!r}: write worker counts like 1,2,4") from None
    if not wanted or wanted[0] < 1:
        raise SystemExit(f"--counts {spec!r}: counts must be positive")
    if wanted[0] != 1:
        wanted.insert(0, 1)  # the baseline every ratio needs
    return [c for c in wanted if c <= available], [c for c in wanted if c > available]


def redis_server_args(binary: str, port: int, workdir: Path) -> list[str]:
    """A private, non-persistent redis-server on localhost (pure)."""
    return [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--maxmemory-policy", "noeviction",
        "--protected-mode", "no",
    ]  # fmt: skip


def cpu_clients(count: int) -> list[ClientEnv]:
    """``count`` CPU render workers named like the launcher's (``cpuN-0@%h``), for the CPU check."""
    return [
        ClientEnv(
            gpu=None,
            slot=0,
            node_name=f"cpu{i}-0@%h",
            mps_mode="off",
            env={"CUDA_VISIBLE_DEVICES": "", "FACEFARM_DEVICE": "cpu"},
        )
        for i in range(count)
    ]


def farm_env(values: Mapping[str, object]) -> dict[str, str]:
    """Settings values as the ``FACEFARM_*`` environment every worker gets (pure)."""
    return {f"FACEFARM_{key.upper()}": str(value) for key, value in values.items()}


def scaling(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Throughput of each worker count relative to 1 worker, with the issue's target where it has one.

    A row without ``frames_per_s`` (it failed or was skipped) gets no ratio; without a 1-worker
    figure nobody does.
    """
    base = next((r.get("frames_per_s") for r in rows if r.get("workers") == 1), None)
    out = []
    for row in rows:
        workers = int(row["workers"])
        fps = row.get("frames_per_s")
        entry: dict[str, Any] = {"workers": workers, "frames_per_s": fps, "target_x": TARGETS.get(workers)}
        if fps and base:
            ratio = fps / base
            entry["x_one"] = round(ratio, 3)
            entry["efficiency"] = round(ratio / workers, 3)
            if workers in TARGETS:
                entry["met"] = ratio >= TARGETS[workers]
        out.append(entry)
    return out


def chunk_summary(records: Sequence[ChunkRecord], t0: float) -> dict[str, Any]:
    """Wall time from ``t0`` (first enqueue) to the last commit, counts per worker, chunk durations."""
    ends: list[float] = []
    durations: list[float] = []
    per_worker: dict[str, int] = {}
    stages: dict[str, float] = {}
    frames = faces = 0
    for rec in records:
        last = rec.attempts[-1] if rec.attempts else None
        if last is not None and last.end is not None:
            end = float(last.end)  # the store keeps it as the JSON the Lua script wrote
            ends.append(end)
            durations.append(end - last.start)
        per_worker[rec.worker] = per_worker.get(rec.worker, 0) + 1
        frames += rec.frame_count
        if rec.stats is not None:
            faces += rec.stats.faces
            for stage, seconds in rec.stats.stage_seconds.items():
                stages[stage] = stages.get(stage, 0.0) + seconds
    wall_s = (max(ends) - t0) if ends else None
    return {
        "chunks": len(records),
        "frames": frames,
        "faces": faces,
        "wall_s": round(wall_s, 3) if wall_s else None,
        "frames_per_s": round(frames / wall_s, 3) if wall_s else None,
        "chunks_per_s": round(len(records) / wall_s, 4) if wall_s else None,
        "chunks_per_worker": dict(sorted(per_worker.items())),
        "chunk_s_median": round(statistics.median(durations), 3) if durations else None,
        "chunk_s_max": round(max(durations), 3) if durations else None,
        "stage_seconds_total": {k: round(v, 2) for k, v in sorted(stages.items())},
    }


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """The table printed last: one line per worker count."""
    lines = [
        f"{'workers':>7} {'chunks':>6} {'frames':>6} {'wall s':>8} {'fps':>8} {'x 1':>6} "
        f"{'target':>6} {'GPU util %':<16} per worker"
    ]
    by_count = {s["workers"]: s for s in report.get("scaling", [])}
    for row in report.get("runs", []):
        workers = row["workers"]
        if "error" in row or "skipped" in row:
            lines.append(f"{workers:>7} {'ERROR ' + row['error'][:90] if 'error' in row else row['skipped']}")
            continue
        s = by_count.get(workers, {})
        util = ",".join(f"{g['util_mean']:.0f}" for g in row.get("gpus", {}).values()) or "-"
        target = f">={s['target_x']}" if s.get("target_x") else "-"
        lines.append(
            f"{workers:>7} {row['chunks']:>6} {row['frames']:>6} {row['wall_s']!s:>8} "
            f"{row['frames_per_s']!s:>8} {s.get('x_one', '')!s:>6} {target:>6} {util:<16} "
            f"{row['chunks_per_worker']}"
        )
    return lines


# --- video and jobs ----------------------------------------------------------------------------


def clip_video_info(path: Path) -> VideoInfo:
    """The ``VideoInfo`` ``shared.media.probe`` would record, read by demuxing with PyAV (no ffprobe).

    Only what planning and the render path read needs to be exact: frame timestamps in
    presentation order, keyframes, size, rate and time base. Good for the constant-rate, unrotated
    SDR clips ``bench/make_clip.py`` writes.
    """
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = sorted(
            (p.pts, bool(p.is_keyframe), p.duration or 0)
            for p in container.demux(stream)
            if p.size and p.pts is not None
        )
        ctx = stream.codec_context
        time_base = Fraction(stream.time_base or Fraction(1, 90000))
        rate = Fraction(stream.average_rate or stream.guessed_rate or 30)
        fmt = container.format.name
        index, codec, pix_fmt = stream.index, ctx.name, ctx.pix_fmt or "yuv420p"
        width, height = ctx.width, ctx.height
        coded = (ctx.coded_width or width, ctx.coded_height or height)
    if not packets:
        raise ValueError(f"{path}: no video packets")
    frame_pts = [p[0] for p in packets]
    keyframes = [i for i, p in enumerate(packets) if p[1]]
    last_duration = packets[-1][2] or round(1 / (rate * time_base))
    end = frame_pts[-1] + last_duration
    return VideoInfo(
        source=str(path),
        container=fmt,
        duration_s=float((end - frame_pts[0]) * time_base),
        start_time_s=float(frame_pts[0] * time_base),
        stream_index=index,
        codec=codec,
        time_base_num=time_base.numerator,
        time_base_den=time_base.denominator,
        avg_fps_num=rate.numerator,
        avg_fps_den=rate.denominator,
        vfr=False,
        frame_count=len(frame_pts),
        frame_pts=frame_pts,
        last_frame_duration=last_duration,
        keyframe_pts=[frame_pts[i] for i in keyframes],
        keyframe_indices=keyframes,
        rotation=0,
        coded_width=coded[0],
        coded_height=coded[1],
        width=width,
        height=height,
        pix_fmt=pix_fmt,
        bit_depth=8,
    )


@dataclass(frozen=True)
class Inputs:
    """The stored clip and face every job of a run renders, and how the clip was planned."""

    info: VideoInfo
    video_uri: str
    face_uri: str
    options: JobOptions


def plan_job(
    store: JobStore,
    storage: Storage,
    settings: Settings,
    inputs: Inputs,
    *,
    chunk_frames: int,
    end_frame: int,
) -> tuple[str, int]:
    """Record a job already planned into chunks (frames ``[0, end_frame)``), as ``plan_job_now`` does.

    Returns ``(job_id, chunks)``; the job is RENDERING with every chunk PENDING and nothing enqueued.
    """
    job_id = uuid.uuid4().hex
    store.create_job(
        job_id,
        owner=OWNER,
        options=inputs.options,
        video_uri=inputs.video_uri,
        face_uri=inputs.face_uri,
        input_names={"video": "bench-clip.mp4", "face": "face.png"},
    )
    if not store.set_status(job_id, JobStatus.PLANNING):
        raise RuntimeError(f"job {job_id} did not move to PLANNING")
    ranges = plan_chunks(
        inputs.info, chunk_frames=chunk_frames, warmup_frames=settings.warmup_frames, end_frame=end_frame
    )
    encoder = encoder_settings_for(inputs.info, inputs.options, settings)
    specs = [
        chunk_spec(
            job_id,
            r,
            source_uri=inputs.video_uri,
            face_uri=inputs.face_uri,
            output_uri=storage.uri_for(storage_chunk_key(job_id, r.index, "mp4")),
            options=inputs.options,
            encoder=encoder,
        )
        for r in ranges
    ]
    if not store.record_plan(
        job_id, specs, frames_total=end_frame, video_info_json=inputs.info.model_dump_json()
    ):
        raise RuntimeError(f"job {job_id}: record_plan refused the plan")
    return job_id, len(specs)


def plan_jobs(
    store: JobStore, storage: Storage, settings: Settings, inputs: Inputs, *, chunks: int, chunk_frames: int
) -> list[str]:
    """Jobs over the clip totalling ``chunks`` chunks of ``chunk_frames`` (the last job may be shorter)."""
    per_job = max(1, inputs.info.frame_count // chunk_frames)
    job_ids, left = [], chunks
    while left > 0:
        take = min(per_job, left)
        job_id, planned = plan_job(
            store, storage, settings, inputs, chunk_frames=chunk_frames, end_frame=take * chunk_frames
        )
        job_ids.append(job_id)
        left -= planned
    return job_ids


# --- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace_s``; its pool children share the group."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)  # also any child left behind by a main that exited
    if proc.poll() is None:
        proc.wait(timeout=10)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def redis_server(binary: str, workdir: Path) -> Iterator[str]:
    """A private redis-server on a free port; yields its URL, stops it on exit."""
    port = free_port()
    log = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(
        redis_server_args(binary, port, workdir), stdout=log, stderr=subprocess.STDOUT, process_group=0
    )
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(port):
            if proc.poll() is not None:
                raise RuntimeError(f"{binary} exited with {proc.returncode}; see {workdir / 'redis.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{binary} did not answer PING on port {port} within 10 s")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc, 5.0)
        log.close()


class RenderWorker:
    """One Celery render worker (its own process group, so the harness can always kill it)."""

    def __init__(self, client: ClientEnv, env: Mapping[str, str], log_dir: Path) -> None:
        self.client = client
        self.node = client.node_name.replace("%h", socket.gethostname())
        self.log_path = log_dir / f"{client.node_name.split('@')[0]}.log"
        command = build_worker_command(client, ["gpu"], python=sys.executable, log_level="INFO")
        with self.log_path.open("wb") as log:
            # process_group, not a new session: if the harness is killed the device still reaps these
            self.proc = subprocess.Popen(
                command,
                cwd=PROJECT_ROOT,
                env={**env, **client.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, deadline: float) -> None:
        while " ready." not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker {self.node} exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.node} not ready in time:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        _stop(self.proc, STOP_GRACE_S)


@contextmanager
def render_workers(
    clients: Sequence[ClientEnv], env: Mapping[str, str], log_dir: Path
) -> Iterator[list[RenderWorker]]:
    """Start every client, wait until all are ready; on exit SIGTERM all, then wait/kill each."""
    workers: list[RenderWorker] = []
    try:
        for client in clients:
            workers.append(RenderWorker(client, env, log_dir))
        deadline = time.monotonic() + READY_TIMEOUT_S
        for worker in workers:
            worker.wait_ready(deadline)
        yield workers
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.stop()


class NvmlSampler:
    """GPU utilisation and memory of the given physical GPUs, sampled in a thread (NVML only)."""

    def __init__(self, indices: Sequence[int], interval_s: float = NVML_SAMPLE_S) -> None:
        self.indices = list(indices)
        self.interval_s = interval_s
        self.samples: dict[int, list[tuple[int, int]]] = {i: [] for i in self.indices}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self.error: str | None = None

    def __enter__(self) -> NvmlSampler:
        if self.indices:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # no driver / no NVML: nothing to sample
            self.error = f"{type(exc).__name__}: {exc}"
            return
        try:
            handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices}
            while not self._stop.wait(self.interval_s):
                for i, handle in handles.items():
                    util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                    used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
                    self.samples[i].append((int(util), int(used)))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            pynvml.nvmlShutdown()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, rows in self.samples.items():
            if rows:
                utils = [u for u, _ in rows]
                out[str(i)] = {
                    "util_mean": round(statistics.fmean(utils), 1),
                    "util_median": statistics.median(utils),
                    "mem_max_gib": round(max(m for _, m in rows) / 2**30, 2),
                    "samples": len(rows),
                }
        return out


def cpu_jiffies() -> tuple[int, int]:
    """``(busy, total)`` jiffies of all CPUs from /proc/stat (zeros where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def discover_gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


# --- one worker count ---------------------------------------------------------------------------


def wait_committed(
    store: JobStore, job_ids: Sequence[str], workers: Sequence[RenderWorker], timeout_s: float
) -> list[ChunkRecord]:
    """Poll until every chunk of ``job_ids`` is COMMITTED; raise on a failed job, a dead worker or timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = [rec for job_id in job_ids for rec in store.chunks(job_id)]
        if all(rec.status is ChunkStatus.COMMITTED for rec in records):
            return records
        for job_id in job_ids:
            job = store.get_job(job_id)
            if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
                logs = "\n".join(store.logs(job_id)[-15:])
                raise RuntimeError(f"job {job_id} {job.status.value}: {job.error}\n{logs}")
        for worker in workers:
            if worker.proc.poll() is not None:
                raise RuntimeError(
                    f"worker {worker.node} exited with {worker.proc.returncode}:\n{worker.log()[-3000:]}"
                )
        if time.monotonic() > deadline:
            done = sum(rec.status is ChunkStatus.COMMITTED for rec in records)
            raise TimeoutError(f"{done}/{len(records)} chunks committed after {timeout_s:.0f} s")
        time.sleep(POLL_S)


def warm_up(
    ctx: FarmContext,
    inputs: Inputs,
    workers: Sequence[RenderWorker],
    *,
    chunk_frames: int,
    timeout_s: float,
) -> dict[str, Any]:
    """Chunks of the timed shape until every worker has committed one (model load, CUDA, cuDNN).

    Two chunks a worker per round; Celery does not promise each worker one, hence the rounds.
    """
    started = time.monotonic()
    seen: dict[str, int] = {}
    rounds = 0
    names = {w.node for w in workers}
    while rounds < WARMUP_ROUNDS and not names <= set(seen):
        rounds += 1
        job_ids = plan_jobs(
            ctx.store, ctx.storage, ctx.settings, inputs, chunks=2 * len(workers), chunk_frames=chunk_frames
        )
        for job_id in job_ids:
            enqueue_renders(ctx, job_id)
        for rec in wait_committed(ctx.store, job_ids, workers, timeout_s):
            seen[rec.worker] = seen.get(rec.worker, 0) + 1
    return {
        "rounds": rounds,
        "chunks_per_worker": dict(sorted(seen.items())),
        "all_warm": names <= set(seen),
        "seconds": round(time.monotonic() - started, 1),
    }


def measure(
    count: int,
    *,
    args: argparse.Namespace,
    base_env: Mapping[str, str],
    settings: Settings,
    inputs: Inputs,
    work: Path,
) -> dict[str, Any]:
    """Fresh workers for ``count`` GPUs (or CPU workers), warm-up, then the timed chunks."""
    row: dict[str, Any] = {"workers": count}
    if args.device == "cuda":
        # as `facefarm worker` does: each GPU client gets its own block of this node's CPUs
        cpus = usable_cpus() if args.cpu_shares else None
        clients = build_client_envs(
            list(range(count)), 1, "off", settings, mps_daemon_running=False, cpus=cpus
        )
    else:
        clients = cpu_clients(count)
    row["clients"] = [{"node": c.node_name, "gpu": c.gpu, "env": c.env} for c in clients]
    log_dir = work / f"logs-{count}"
    log_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore.from_settings(settings)
    ctx = FarmContext(
        settings=settings, store=store, storage=create_storage(settings), send_task=_sender(settings)
    )
    started = time.monotonic()
    try:
        with render_workers(clients, base_env, log_dir) as workers:
            row["start_s"] = round(time.monotonic() - started, 1)
            row["warmup"] = warm_up(
                ctx,
                inputs,
                workers,
                chunk_frames=args.warmup_chunk_frames or args.chunk_frames,
                timeout_s=args.timeout_s,
            )
            job_ids = plan_jobs(
                store, ctx.storage, settings, inputs, chunks=args.chunks, chunk_frames=args.chunk_frames
            )
            gpus = [c.gpu for c in clients if c.gpu is not None]
            busy0, total0 = cpu_jiffies()
            with NvmlSampler(gpus) as sampler:
                t0 = time.time()
                for job_id in job_ids:
                    enqueue_renders(ctx, job_id)
                records = wait_committed(store, job_ids, workers, args.timeout_s)
                observed_s = time.time() - t0
            busy1, total1 = cpu_jiffies()
            row.update(chunk_summary(records, t0))
            row["observed_s"] = round(observed_s, 3)  # includes up to POLL_S of polling lag
            row["jobs"] = len(job_ids)
            row["gpus"] = sampler.summary()
            if sampler.error:
                row["nvml"] = sampler.error
            if total1 > total0:
                row["cpu_cores_busy"] = round((busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1), 1)
            row["devices_reported"] = sorted({r.stats.device for r in records if r.stats is not None})
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        row["traceback"] = traceback.format_exc()[-4000:]
        row["worker_logs"] = {
            p.name: p.read_text(errors="replace")[-2500:] for p in sorted(log_dir.glob("*.log"))
        }
    finally:
        store.close()
        row["total_s"] = round(time.monotonic() - started, 1)
    return row


def _sender(settings: Settings) -> Any:
    from dispatcher.sender import KombuTaskSender

    return KombuTaskSender(settings)


# --- the run ------------------------------------------------------------------------------------


def environment(redis_binary: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "host": socket.gethostname(),
    }
    for package in ("torch", "celery", "kombu", "redis", "av"):
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = None
    for key, command in {
        "redis_server": [redis_binary, "--version"],
        "nvidia_smi": [
            "nvidia-smi",
            "--query-gpu=index,name,driver_version,memory.total",
            "--format=csv,noheader",
        ],
    }.items():
        try:
            env[key] = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env[key] = f"unavailable: {exc}"
    return env


def prepare_inputs(args: argparse.Namespace, storage: Storage, work: Path) -> tuple[Inputs, dict[str, Any]]:
    """Write the test clip with PyAV, store it and the source face, read its ``VideoInfo``."""
    import cv2

    from bench.make_clip import SOURCE_FACE, load_source_images, write_clip

    started = time.monotonic()
    images = load_source_images(args.images)
    clip = write_clip(
        work / "clip.mp4", images, width=args.width, height=args.height, frames=args.clip_frames, crf=18
    )
    face = work / "face.png"
    cv2.imwrite(str(face), cv2.cvtColor(images[SOURCE_FACE], cv2.COLOR_RGB2BGR))
    video = storage.put_file("bench/input/clip.mp4", clip.path)
    face_stored = storage.put_file("bench/input/face.png", face)
    info = clip_video_info(Path(storage.local_path_or_url(video.uri)))
    options = JobOptions(
        swapper=args.swapper, upscale=args.upscale, sr_model=args.sr_model, crf=18, preset=args.preset
    )
    inputs = Inputs(info=info, video_uri=video.uri, face_uri=face_stored.uri, options=options)
    described = {
        "clip": f"{info.width}x{info.height} {float(info.avg_fps):.0f} fps, {info.frame_count} frames, "
        f"{len(info.keyframe_indices)} keyframes (made in {time.monotonic() - started:.1f} s)",
        "options": options.model_dump(mode="json"),
    }
    return inputs, described


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", type=Path, required=True, help="folder for farm.json")
    add("--store", type=Path, default=Path("models-store"), help="model store folder")
    add("--images", type=Path, default=None, help="folder of make_clip.export_source_images")
    add("--work", type=Path, default=None, help="scratch folder (default: a new folder under /tmp)")
    add("--redis-server", default=None, help="redis-server binary (default: on PATH)")
    add("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when NVML lists GPUs")
    add("--counts", default=",".join(map(str, DEFAULT_COUNTS)), help="worker (GPU) counts; 1 always runs")
    add("--chunks", type=int, default=24, help="timed chunks per count")
    add("--chunk-frames", type=int, default=60)
    add("--warmup-chunk-frames", type=int, default=0, help="frames of a warm-up chunk; 0: --chunk-frames")
    add("--clip-frames", type=int, default=240, help="frames of the clip every job renders")
    add("--width", type=int, default=1920)
    add("--height", type=int, default=1080)
    add("--swapper", default="classic")
    add("--upscale", type=int, choices=(1, 2, 4), default=1)
    add("--sr-model", default="realesr-animevideov3")
    add("--preset", default="veryfast")
    add("--encoder-threads", type=int, default=0, help="per worker; 0: CPU cores / the largest count")
    add("--batch-frames", type=int, default=8)
    add("--sr-compile", action="store_true", help="FACEFARM_SR_COMPILE=1 in the workers")
    add(
        "--cpu-shares",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give each GPU worker its own block of CPUs, as `facefarm worker` does",
    )
    add("--timeout-s", type=float, default=300.0, help="per warm-up round and per timed run")
    add("--smoke", action="store_true", help="CPU, 96 px clip, 4 chunks, counts 1,2 (checks the harness)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.width, args.height = "cpu", 96, 96
        args.clip_frames, args.chunk_frames, args.chunks = 24, 6, 4
        if args.counts == ",".join(map(str, DEFAULT_COUNTS)):
            args.counts = "1,2"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.monotonic()
    redis_binary = args.redis_server or shutil.which("redis-server")
    if not redis_binary:
        raise SystemExit(
            "no redis-server: pass --redis-server PATH (bench/prepare_carry.sh puts one in .carry/farm/bin)"
        )
    gpu_count = discover_gpu_count() if args.device != "cpu" else 0
    if args.device == "auto":
        args.device = "cuda" if gpu_count else "cpu"
    available = gpu_count if args.device == "cuda" else (os.cpu_count() or 1)
    counts, skipped = parse_counts(args.counts, available)
    if args.device == "cuda" and not counts:
        raise SystemExit("--device cuda but NVML lists no GPU")
    warmup_chunks = 2 * max(counts) * WARMUP_ROUNDS
    if args.chunks + warmup_chunks > GPU_MAX_TASKS_PER_CHILD:
        raise SystemExit(
            f"--chunks {args.chunks} + up to {warmup_chunks} warm-up chunks exceed the {GPU_MAX_TASKS_PER_CHILD} "
            "tasks after which a render child restarts (and reloads its models) inside the timed run"
        )
    if not args.encoder_threads:
        args.encoder_threads = max(1, (os.cpu_count() or 2) // max(counts))
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "farm.json"
    report: dict[str, Any] = {
        "environment": environment(redis_binary),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "targets_x_one_gpu": {str(k): v for k, v in TARGETS.items()},
        "timed_region": "first enqueue of the timed chunks -> last chunk COMMITTED (worker's commit time); "
        "merge excluded; workers fresh per count, warmed up outside the region",
        "runs": [],
    }
    for count in skipped:
        report["runs"].append(
            {"workers": count, "skipped": f"only {available} {args.device} workers available"}
        )

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(f"stopped by {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    with ExitStack() as stack:
        work = args.work or Path(stack.enter_context(_temp_dir()))
        work.mkdir(parents=True, exist_ok=True)
        redis_url = stack.enter_context(redis_server(redis_binary, work))
        values: dict[str, object] = {
            "redis_url": redis_url,
            "storage_url": f"file://{(work / 'storage').resolve()}",
            "model_store": str(args.store.resolve()),
            "model_cache_dir": str((work / "model-cache").resolve()),
            "batch_frames": args.batch_frames,
            "encoder_threads": args.encoder_threads,
            "sr_compile": int(args.sr_compile),
            "heartbeat_interval_s": 1.0,
            "task_time_limit_s": 1800,
            "task_soft_time_limit_s": 1700,
            "visibility_timeout_s": 3600,
            "log_level": "INFO",
        }
        settings = Settings(**values)  # type: ignore[arg-type]
        base_env = {**os.environ, **farm_env(values)}
        base_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])
        )
        if args.device == "cpu":
            base_env.setdefault("OMP_NUM_THREADS", "1")
        inputs, report["inputs"] = prepare_inputs(args, create_storage(settings), work)
        print(
            f"[farm] {report['inputs']['clip']}; counts {counts}; {args.chunks} chunks of {args.chunk_frames} frames",
            flush=True,
        )
        for count in counts:
            print(f"[farm] {count} worker(s) ...", flush=True)
            row = measure(count, args=args, base_env=base_env, settings=settings, inputs=inputs, work=work)
            report["runs"].append(row)
            report["runs"].sort(key=lambda r: r["workers"])
            report["scaling"] = scaling([r for r in report["runs"] if "skipped" not in r])
            report["total_s"] = round(time.monotonic() - started, 1)
            out_file.write_text(json.dumps(report, indent=1, default=str))
            print(
                f"[farm] {count} worker(s): {row.get('error', '')[:300] or str(row.get('frames_per_s')) + ' fps'}"
                f" in {row['total_s']} s",
                flush=True,
            )
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    report["total_s"] = round(time.monotonic() - started, 1)
    out_file.write_text(json.dumps(report, indent=1, default=str))
    print("\n".join(summary_lines(report)), flush=True)
    return report


@contextmanager
def _temp_dir() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        yield tmp


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any("error" in r for r in result["runs"]) else 0)
