"""Render one chunk: decode → detect/swap (→ enhance) → super-resolve → encode, as plain Python.

No Celery, Redis or storage here: the task shell passes in where to read and write, and callables
for progress, cancellation and logs. Decode and encode run in their own threads behind bounded
queues so the device never waits on the CPU codec (and memory stays bounded to a few batches).
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import InvalidVideoError, JobCancelledError
from shared.schemas import ChunkSpec, ChunkStats, JobOptions
from shared.settings import Settings
from worker.frames import FrameBatch, count_frames, decode_range, open_encoder
from worker.frames.watermark import apply_watermark
from worker.models.engine import FaceEngine, SwapWork
from worker.models.faces import Face
from worker.models.source_face import decode_image
from worker.session import RenderSession, get_session

_QUEUE_BATCHES = 3
_SENTINEL: Any = object()


@dataclass
class _StageClock:
    """Per-stage wall seconds, summed over batches, and the CPU seconds of the thread that ran them
    (``cpu.<stage>``): wall well above CPU means the stage waited (on the device, or on the GIL)."""

    seconds: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the block's wall and thread-CPU seconds to ``stage`` (summed over the threads that
        run it, so a stage of a thread pool can exceed the chunk's wall time)."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            with self._lock:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + wall
                self.seconds[f"cpu.{stage}"] = self.seconds.get(f"cpu.{stage}", 0.0) + cpu


def render_chunk(
    spec: ChunkSpec,
    *,
    source: str,
    face_path: Path,
    output_path: Path,
    settings: Settings,
    on_progress: Callable[[int], None],
    should_stop: Callable[[], bool],
    log: Callable[[str], None],
    reference_path: Path | None = None,
) -> ChunkStats:
    """Render ``spec``'s frame range of ``source`` into ``output_path`` (a complete, validated file).

    Raises ``JobCancelledError`` when ``should_stop()`` turns true between batches, and
    ``InvalidVideoError`` when the decoded or encoded frame count differs from the plan.
    """
    session = get_session(settings)
    # process-wide, and idempotent: this process's stage threads are what contend for the GIL
    sys.setswitchinterval(session.gil_switch_interval_s)
    clock = _StageClock()
    engine = create_face_engine(spec.options, face_path, reference_path, session)
    sr_step = session.super_resolver(spec.options) if spec.options.upscale > 1 else None
    if sr_step is not None:
        log(session.describe_super_resolution(spec.options, spec.encoder.width, spec.encoder.height))

    def finish(item: tuple[Future[np.ndarray], list[int], list[int]]) -> tuple[np.ndarray, list[int]]:
        blended, keep, pts = item
        frames = blended.result()  # re-raises the blend's error here, in this stage
        if len(keep) != len(frames):
            frames = frames[keep]  # a batch whose frames are all kept is passed on as it is (50 MB)
        if sr_step is not None:
            with clock.timed("super_res"):
                frames = sr_step(frames)
        if spec.options.watermark:  # after SR: the label is the same size in every output
            frames = apply_watermark(frames)
        return frames, pts

    frames_done = 0
    output_path.parent.mkdir(parents=True, exist_ok=True)
    errors: list[BaseException] = []
    with open_encoder(output_path, spec.encoder) as encoder, _blend_pool(session, clock, spec.index) as blend:

        def encode(item: tuple[np.ndarray, list[int]]) -> None:
            with clock.timed("encode"):
                encoder.write(np.ascontiguousarray(item[0]), item[1])

        # decode, detect (own threads) -> track (this thread) -> blend (pool) -> super-resolution, encode
        encode_stage = _Stage(f"encode-{spec.index}", encode, errors)
        finish_stage = _Stage(f"finish-{spec.index}", lambda item: encode_stage.put(finish(item)), errors)
        try:
            with closing(_faces_found(spec, source, engine, session, clock)) as found:
                for batch, faces in found:
                    if should_stop():
                        raise JobCancelledError(f"job {spec.job_id} was cancelled", job_id=spec.job_id)
                    if errors:
                        raise errors[0]
                    with clock.timed("faces"), session.face_stream_context("swap"):
                        # the decoded batch is not read again: the swap may write into it
                        work = engine.plan_swap(batch.frames, faces, batch.output_mask, in_place=True)
                    keep = [i for i, out in enumerate(batch.output_mask) if out]
                    if not keep:  # warm-up frames: tracked above, never blended
                        continue
                    # the chunk's last batch goes down in halves: its blend, SR and encode then overlap
                    last = batch.indices[-1] >= spec.end_frame - 1
                    start = 0
                    for part in work.split(2) if last and session.blend_threads >= 2 else [work]:
                        kept = [i - start for i in keep if start <= i < start + len(part.frames)]
                        if kept:
                            finish_stage.put(
                                (blend(engine.finish_swap, part), kept, [batch.pts[start + i] for i in kept])
                            )
                        start += len(part.frames)
                    frames_done += len(keep)
                    on_progress(frames_done)
            faces_done_at = time.perf_counter()
        finally:
            finish_stage.close()
            encode_stage.close()
        if errors:
            raise errors[0]
    # the pipeline's tail after the face thread's last batch: that batch's blend, SR and encode, and
    # the encoder's flush of the frames it still held
    clock.seconds["drain"] = time.perf_counter() - faces_done_at
    clock.seconds["encode.flush"] = encoder.flush_s

    if frames_done != spec.frame_count:
        raise InvalidVideoError(
            f"chunk {spec.index} decoded {frames_done} frames but the plan expects {spec.frame_count} "
            f"(frames {spec.start_frame}..{spec.end_frame - 1}); the source may be truncated or corrupt",
            job_id=spec.job_id,
            chunk_index=spec.index,
        )
    written = count_frames(output_path)
    if written != spec.frame_count:
        raise InvalidVideoError(
            f"chunk {spec.index} output has {written} frames, expected {spec.frame_count}",
            job_id=spec.job_id,
            chunk_index=spec.index,
        )
    engine_stats = engine.stats
    stage_seconds = {
        **clock.seconds,
        **{f"faces.{k}": v for k, v in engine_stats.get("stage_seconds", {}).items()},
    }
    return ChunkStats(
        frames=frames_done,
        faces=int(engine_stats.get("faces", 0)),
        faces_by_path=dict(engine_stats.get("faces_by_path", {})),
        stage_seconds={k: round(v, 4) for k, v in stage_seconds.items()},
        device=str(session.device),
    )


def create_face_engine(
    options: JobOptions, face_path: Path, reference_path: Path | None, session: RenderSession
) -> FaceEngine:
    """The per-job face engine: the source identity is computed once per chunk."""
    reference = decode_image(reference_path, label="reference image") if reference_path is not None else None
    return FaceEngine(
        swapper_name=options.swapper,
        source_image=decode_image(face_path, label="face image"),
        store=session.store,
        device=session.device,
        selector=options.face_selector,
        reference_image=reference,
        reference_distance=options.reference_distance,
        enhance_crops=session.face_enhancer(options),
        mesh_compositor=session.settings.mesh_compositor,
        detector_cuda_graph=session.settings.detect_cuda_graph,
    )


def _decode(spec: ChunkSpec, source: str, batch_frames: int) -> Iterator[FrameBatch]:
    return decode_range(
        source,
        start_frame=spec.start_frame,
        end_frame=spec.end_frame,
        warmup_frames=spec.warmup_frames,
        seek_pts=spec.seek_pts,
        seek_frame=spec.seek_frame,
        batch_frames=batch_frames,
    )


def _uploaded(
    batches: Iterator[FrameBatch], engine: FaceEngine, session: RenderSession
) -> Iterator[FrameBatch]:
    """Each decoded batch, its upload to the device already queued (in the decoding thread, on a
    stream of its own); detection and the mesh landmarks then read that one copy."""
    try:
        for batch in batches:
            with session.face_stream_context("upload"):
                engine.upload_ahead(batch.frames)
            yield batch
    finally:  # the decoder's file is closed with the pipeline, not at garbage collection
        close = getattr(batches, "close", None)
        if close is not None:
            close()


@contextmanager
def _blend_pool(
    session: RenderSession, clock: _StageClock, chunk: int
) -> Iterator[Callable[[Callable[[SwapWork], np.ndarray], SwapWork], Future[np.ndarray]]]:
    """``blend(fn, work) -> Future``: runs ``fn(work)`` (``FaceEngine.finish_swap``) in one of
    ``session.blend_threads`` threads, each on a CUDA stream of its own, or at once in the caller's
    thread when there are none. The futures go down the pipeline in frame order."""
    threads = session.blend_threads
    role = threading.local()
    slots = itertools.count()

    def run(fn: Callable[[SwapWork], np.ndarray], work: SwapWork) -> np.ndarray:
        with clock.timed("blend"), session.face_stream_context(getattr(role, "name", "swap")):
            return fn(work)

    if threads == 0:

        def inline(fn: Callable[[SwapWork], np.ndarray], work: SwapWork) -> Future[np.ndarray]:
            done: Future[np.ndarray] = Future()
            done.set_result(run(fn, work))
            return done

        yield inline
        return

    def name_slot() -> None:  # one stream per slot, so a worker's streams do not grow with its chunks
        role.name = f"blend{next(slots)}"

    pool = ThreadPoolExecutor(threads, thread_name_prefix=f"blend-{chunk}", initializer=name_slot)
    try:
        yield lambda fn, work: pool.submit(run, fn, work)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _faces_found(
    spec: ChunkSpec, source: str, engine: FaceEngine, session: RenderSession, clock: _StageClock
) -> Generator[tuple[FrameBatch, list[list[Face]]], None, None]:
    """Decoded batches with their faces. Decoding runs ahead in its thread; with detect-ahead so
    does detection (on its own CUDA stream), one batch ahead of the swap, else the caller detects."""
    decoded = _prefetched(_uploaded(_decode(spec, source, session.batch_frames(spec.options)), engine, session),
                          clock, "decode")  # fmt: skip
    if not session.detect_ahead:
        with closing(decoded):
            for batch in decoded:
                with clock.timed("faces"), session.face_stream_context("swap"):
                    faces = engine.find_faces(batch.frames)
                yield batch, faces
        return

    def detect() -> Iterator[tuple[FrameBatch, list[list[Face]]]]:
        with closing(decoded):
            for batch in decoded:
                with session.face_stream_context("detect"):
                    faces = engine.find_faces(batch.frames)
                yield batch, faces

    with closing(_prefetched(detect(), clock, "detect")) as found:
        yield from found


def _prefetched(batches: Iterator[Any], clock: _StageClock, stage: str) -> Generator[Any, None, None]:
    """Run ``batches`` ahead in a thread (bounded), so that stage overlaps the device work; the time
    spent producing each item is added to ``stage``."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=_QUEUE_BATCHES)
    stop = threading.Event()

    def produce() -> None:
        try:
            while not stop.is_set():
                try:
                    with clock.timed(stage):
                        batch = next(batches)
                except StopIteration:
                    break
                while not stop.is_set():
                    with suppress(queue.Full):
                        ready.put(batch, timeout=0.1)
                        break
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put(exc)
            return
        ready.put(_SENTINEL)

    thread = threading.Thread(target=produce, daemon=True, name=stage)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _SENTINEL:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with suppress(queue.Empty):
            while True:
                ready.get_nowait()
        thread.join(timeout=10)
        close = getattr(batches, "close", None)
        if close is not None and not thread.is_alive():
            close()


class _Stage:
    """One pipeline stage in its own thread behind a bounded queue; the first error stops it and is
    kept in ``errors`` for the producer to raise (later items are drained so nobody blocks)."""

    def __init__(self, name: str, work: Callable[[Any], None], errors: list[BaseException]) -> None:
        self._work = work
        self._errors = errors
        self._inbox: queue.Queue[Any] = queue.Queue(maxsize=_QUEUE_BATCHES)
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def put(self, item: Any) -> None:
        """Bounded put that gives up waiting once any stage has failed."""
        while True:
            try:
                self._inbox.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._errors:
                    raise self._errors[0] from None

    def close(self) -> None:
        """Finish the queued items (or drain them after a failure) and stop the thread."""
        while self._thread.is_alive():
            try:
                self._inbox.put(_SENTINEL, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _SENTINEL:
                return
            if self._errors:
                continue
            try:
                self._work(item)
            except BaseException as exc:
                self._errors.append(exc)
