"""The farm end to end, as a user drives it: ``FarmClient`` → HTTP API → Celery workers → merge.

One redis-server, one API (real uvicorn, real tokens), two render worker processes on the ``gpu``
queue (``FACEFARM_DEVICE=cpu``) and one CPU worker, local storage; a second, smaller farm on moto's
S3 server for the S3 test. Every action goes through ``FarmClient``; the checks read the outputs
with ffprobe/ffmpeg and, where the client shows no such detail (attempts, chunk states), the job
store. Videos are tiny (160x120, tens of frames) so the module runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import boto3
import numpy as np
import pytest
from celery import Celery

from dispatcher.app import create_app
from dispatcher.auth import hash_token
from facefarm.client import FarmClient
from shared.errors import FaceFarmError, InvalidVideoError, NotFoundError
from shared.schemas import ChunkStatus, EncoderSettings, JobOptions, JobStatus, JobView
from shared.state import JobStore
from tests.support.farm import FarmProcesses, run_farm
from tests.support.media import (
    NTSC,
    PHONE_VFR_SETPTS,
    VFR_OUTPUT,
    audio_packet_hashes,
    cli_decode,
    count_frames,
    insightface_image,
    keyframe_count,
    make_audio_only,
    packet_times_s,
    psnr,
    remux,
    rotation_degrees,
    start_time_s,
    storyboard,
    stream_fields,
    write_video,
)
from tests.support.services import S3_TEST_ENV, moto_s3_server, serve_app, use_s3_test_credentials

pytestmark = pytest.mark.e2e

TOKENS = {"alice": "alice-e2e-token-5f0c2a9d7b", "bob": "bob-e2e-token-81d3e6c4a2"}
WIDTH, HEIGHT = 160, 120
BATCH_FRAMES = 4
CHUNK_FRAMES = 12
OPTIONS = JobOptions(swapper="classic", upscale=1, face_selector="all", chunk_frames=CHUNK_FRAMES)
FARM_OVERRIDES = {
    "FACEFARM_BATCH_FRAMES": str(BATCH_FRAMES),
    "FACEFARM_API_TOKENS": json.dumps({hash_token(t): owner for owner, t in TOKENS.items()}),
}
JOB_TIMEOUT_S = 240.0
POLL_S = 0.2
# The main video: four scenes of one chunk each; the last one has no face.
MAIN_SCENES = [("astronaut", 12), ("group", 12), ("camera", 12), ("coffee", 12)]
MAIN_FRAMES = 48
FACE_FREE = range(36, 48)


# --- the farm ------------------------------------------------------------------------------------


@dataclass
class E2EFarm:
    procs: FarmProcesses
    api_url: str
    store: JobStore  # read-only inspection of what the client does not show (attempts, chunk states)

    def client(self, owner: str = "alice") -> FarmClient:
        return FarmClient(self.api_url, TOKENS[owner], timeout_s=60)

    def diagnostics(self, job_id: str) -> str:
        try:
            lines = self.store.logs(job_id)
        except FaceFarmError as exc:
            lines = [f"(no job log: {exc})"]
        return "job log:\n" + "\n".join(lines) + "\nworkers:\n" + self.procs.worker_logs()

    def active_render_tasks(self) -> list[dict[str, object]]:
        """Render tasks the Celery workers report as executing right now."""
        app = Celery(broker=self.procs.settings.redis_url, set_as_current=False)
        try:
            replies = app.control.inspect(timeout=1.0).active() or {}
        finally:
            app.close()
        return [t for tasks in replies.values() for t in tasks if t.get("name") == "facefarm.render_chunk"]


@contextmanager
def e2e_farm(
    workdir: Path, storage_url: str, overrides: Mapping[str, str], *, render_workers: int
) -> Iterator[E2EFarm]:
    """Workers (``run_farm``) plus the API served by uvicorn with the same settings."""
    with run_farm(
        workdir, storage_url, {**FARM_OVERRIDES, **overrides}, render_workers=render_workers
    ) as procs:
        with serve_app(create_app(procs.settings)) as api_url:
            store = JobStore.from_settings(procs.settings)
            try:
                yield E2EFarm(procs, api_url, store)
            finally:
                store.close()


@pytest.fixture(scope="module")  # one farm for the module, stopped before the next module runs
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EFarm]:
    workdir = tmp_path_factory.mktemp("e2e-farm")
    storage = workdir / "storage"
    storage.mkdir()
    with e2e_farm(workdir, storage.as_uri(), {}, render_workers=2) as running:
        yield running


@pytest.fixture(scope="module")
def s3_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[E2EFarm, str]]:
    """A second API and set of workers on moto's S3 server; yields the farm and the endpoint."""
    workdir = tmp_path_factory.mktemp("e2e-s3farm")
    with moto_s3_server() as endpoint:
        use_s3_test_credentials()
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="e2e-farm")
        overrides = {**S3_TEST_ENV, "FACEFARM_S3_ENDPOINT_URL": endpoint}
        with e2e_farm(workdir, "s3://e2e-farm/facefarm", overrides, render_workers=1) as running:
            yield running, endpoint


# --- media -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def face_image() -> Path:
    return insightface_image("Tom_Hanks_54745.png")


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-videos")


@pytest.fixture(scope="session")
def main_video(videos: Path) -> Path:
    """48 frames at 30000/1001 with real faces (1, 3, 1, then none), one keyframe, AAC audio."""
    frames = storyboard(MAIN_SCENES, WIDTH, HEIGHT)
    return write_video(frames, videos / "party.mp4", fps=NTSC, keyint=250, audio=True)


# --- helpers ---------------------------------------------------------------------------------------


@dataclass
class FinishedJob:
    job_id: str
    source: Path
    output: Path
    views: list[JobView]  # every view ``wait`` reported, in order


def run_job(
    farm: E2EFarm, video: Path, face: Path, output: Path, options: JobOptions = OPTIONS
) -> FinishedJob:
    """Submit through the client, wait (recording progress), download; fails with the job log."""
    views: list[JobView] = []
    with farm.client() as client:
        job_id = client.submit(video, face, options)
        try:
            client.wait(job_id, progress=views.append, poll_s=POLL_S, timeout_s=JOB_TIMEOUT_S)
        except (FaceFarmError, TimeoutError) as exc:
            raise AssertionError(
                f"job {job_id} did not complete: {exc!r}\n{farm.diagnostics(job_id)}"
            ) from exc
        client.download(job_id, output)
    return FinishedJob(job_id, video, output, views)


def reference_chunks(farm: E2EFarm, job: FinishedJob, workdir: Path) -> dict[int, np.ndarray]:
    """Each chunk's source frames, decoded and encoded like a render with no swap; decoded again.

    Uses the job's own chunk specs and encoder settings (the job record), the worker's decoder and
    ``open_encoder``, so a chunk whose frames the farm left untouched comes out the same.
    """
    from worker.frames.decode import decode_range
    from worker.frames.encode import open_encoder

    encoder = EncoderSettings.model_validate(farm.store.get_job(job.job_id).encoder)
    decoded: dict[int, np.ndarray] = {}
    for chunk in farm.store.chunks(job.job_id):
        spec = chunk.spec
        path = workdir / f"reference-{spec.index:05d}.mp4"
        with open_encoder(path, encoder) as out:
            for batch in decode_range(
                str(job.source),
                start_frame=spec.start_frame,
                end_frame=spec.end_frame,
                warmup_frames=spec.warmup_frames,
                seek_pts=spec.seek_pts,
                seek_frame=spec.seek_frame,
                batch_frames=BATCH_FRAMES,
            ):
                keep = [i for i, output in enumerate(batch.output_mask) if output]
                if keep:
                    out.write(batch.frames[keep], [batch.pts[i] for i in keep])
        decoded[spec.start_frame] = cli_decode(path)
    return decoded


def assert_same_timestamps(source: Path, output: Path) -> None:
    """Every output video frame at its source time, within one tick of the source time base."""
    tick = Fraction(stream_fields(source, "v:0")["time_base"])
    before, after = packet_times_s(source, "v:0"), packet_times_s(output, "v:0")
    assert len(after) == len(before), (len(after), len(before))
    worst = max(abs(a - b) for a, b in zip(after, before, strict=True))
    assert worst <= tick, f"output timestamps differ from the source by up to {float(worst) * 1000:.3f} ms"


def wait_for_status(
    client: FarmClient, job_id: str, done: object, timeout_s: float = JOB_TIMEOUT_S
) -> JobView:
    deadline = time.monotonic() + timeout_s
    while True:
        view = client.status(job_id)
        if done(view):  # type: ignore[operator]
            return view
        if view.status.finished or time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never reached the awaited state: {view}")
        time.sleep(0.1)


# --- the main job: multi-face, long GOP, audio, NTSC rate ------------------------------------------


@pytest.fixture(scope="module")
def main_job(
    farm: E2EFarm, main_video: Path, face_image: Path, tmp_path_factory: pytest.TempPathFactory
) -> FinishedJob:
    output = tmp_path_factory.mktemp("e2e-main") / "party-swapped.mp4"
    return run_job(farm, main_video, face_image, output)


def test_multiface_long_gop_job_completes_with_every_frame_at_its_source_time(
    farm: E2EFarm, main_job: FinishedJob
) -> None:
    assert keyframe_count(main_job.source) == 1  # chunks 1..3 start between keyframes
    final = main_job.views[-1]
    assert final.status is JobStatus.COMPLETED
    assert final.chunks_total == final.chunks_done == 4
    assert count_frames(main_job.output) == count_frames(main_job.source) == MAIN_FRAMES
    assert_same_timestamps(main_job.source, main_job.output)
    chunks = farm.store.chunks(main_job.job_id)
    faces = {c.index: c.stats.faces if c.stats else 0 for c in chunks}
    assert faces[0] > 0 and faces[1] > faces[0] and faces[3] == 0, faces  # 1 face, 3 faces, none


def test_render_workers_publish_their_runtime_telemetry(farm: E2EFarm, main_job: FinishedJob) -> None:
    workers = {a.worker for c in farm.store.chunks(main_job.job_id) for a in c.attempts}
    assert workers
    for name in workers:
        status = farm.store.worker_status(name)
        assert status.get("runtime_device") == "cpu", (name, status)
        assert "runtime_oom_recoveries" in status


def test_audio_is_copied_byte_for_byte_and_stays_in_sync(main_job: FinishedJob) -> None:
    source_audio = audio_packet_hashes(main_job.source)
    assert source_audio, "the source must have audio packets"
    assert audio_packet_hashes(main_job.output) == source_audio
    frame_s = 1 / Fraction(NTSC)

    def av_offset(path: Path) -> Fraction:
        return start_time_s(path, "v:0") - start_time_s(path, "a:0")

    drift = abs(av_offset(main_job.output) - av_offset(main_job.source))
    assert drift <= frame_s, f"A/V start offset moved by {float(drift) * 1000:.1f} ms"


def test_face_free_frames_match_a_no_swap_encode_and_face_frames_do_not(
    farm: E2EFarm, main_job: FinishedJob, tmp_path: Path
) -> None:
    output = cli_decode(main_job.output)
    reference = np.concatenate(
        [frames for _, frames in sorted(reference_chunks(farm, main_job, tmp_path).items())]
    )
    assert output.shape == reference.shape == (MAIN_FRAMES, HEIGHT, WIDTH, 3)
    for index in FACE_FREE:
        assert psnr(output[index], reference[index]) >= 50.0, f"face-free frame {index} was altered"
    swapped = [psnr(output[i], reference[i]) for i in range(FACE_FREE.start)]
    assert max(swapped) < 45.0, f"some frames with faces look unswapped: {sorted(swapped)[-3:]}"


def test_ntsc_frame_rate_is_kept(main_job: FinishedJob) -> None:
    assert stream_fields(main_job.source, "v:0")["r_frame_rate"] == NTSC
    fields = stream_fields(main_job.output, "v:0")
    assert (fields["r_frame_rate"], fields["avg_frame_rate"]) == (NTSC, NTSC)


def test_progress_never_decreases_and_reaches_the_total(main_job: FinishedJob) -> None:
    done = [v.frames_done for v in main_job.views]
    assert done == sorted(done), done
    assert main_job.views[-1].frames_done == main_job.views[-1].frames_total == MAIN_FRAMES
    assert len(set(done)) >= 3, f"progress was not reported along the way: {done}"


def test_another_token_cannot_see_cancel_retry_or_download_the_job(
    farm: E2EFarm, main_job: FinishedJob, tmp_path: Path
) -> None:
    job_id = main_job.job_id
    with farm.client("bob") as bob:
        for action in (bob.status, bob.cancel, bob.retry, bob.logs, bob.audit):
            with pytest.raises(NotFoundError):
                action(job_id)
        with pytest.raises(NotFoundError):
            bob.download(job_id, tmp_path / "stolen.mp4")
        assert job_id not in [v.job_id for v in bob.list()]
    assert list(tmp_path.iterdir()) == []
    with farm.client("alice") as alice:
        assert alice.status(job_id).status is JobStatus.COMPLETED  # bob's cancel changed nothing
        assert job_id in [v.job_id for v in alice.list()]


# --- timing and orientation --------------------------------------------------------------------------


def test_vfr_input_keeps_every_frame_timestamp(
    farm: E2EFarm, videos: Path, face_image: Path, tmp_path: Path
) -> None:
    frames = storyboard([("astronaut", 18), ("coffee", 6), ("group", 12)], WIDTH, HEIGHT)
    source = write_video(
        frames, videos / "phone-vfr.mp4", keyint=250, extra_output=["-vf", PHONE_VFR_SETPTS, *VFR_OUTPUT]
    )
    gaps = np.diff([float(t) for t in packet_times_s(source, "v:0")])
    assert gaps.max() - gaps.min() > 0.05, f"the source must really be VFR: {gaps}"
    job = run_job(farm, source, face_image, tmp_path / "vfr-out.mp4")
    assert count_frames(job.output) == len(frames)
    assert_same_timestamps(source, job.output)


def test_rotated_input_plays_upright_without_a_rotation_tag(
    farm: E2EFarm, videos: Path, face_image: Path, tmp_path: Path
) -> None:
    upright = storyboard([("coffee", 12), ("astronaut", 12)], WIDTH, HEIGHT)
    stored = np.ascontiguousarray(np.rot90(upright, k=-1, axes=(1, 2)))  # portrait on disk
    plain = write_video(stored, tmp_path / "stored.mp4", keyint=250)
    source = remux(plain, videos / "rotated.mp4", "-metadata:s:v:0", "rotate=90")
    assert rotation_degrees(source) != 0
    displayed = cli_decode(source)  # what a player shows: the ffmpeg CLI autorotates
    assert displayed.shape[1:3] == (HEIGHT, WIDTH)
    assert psnr(displayed, upright) > 25.0, "the test video is not upright when autorotated"

    job = run_job(farm, source, face_image, tmp_path / "rotated-out.mp4")
    assert rotation_degrees(job.output) == 0
    fields = stream_fields(job.output, "v:0")
    assert (int(fields["width"]), int(fields["height"])) == (WIDTH, HEIGHT)
    rendered = cli_decode(job.output)
    assert rendered.shape == displayed.shape
    face_free = slice(0, 12)
    assert psnr(rendered[face_free], displayed[face_free]) >= 30.0  # CRF 18 over a CRF 23 source
    upside_down = np.rot90(displayed[face_free], k=2, axes=(1, 2))
    assert psnr(rendered[face_free], displayed[face_free]) > psnr(rendered[face_free], upside_down) + 10
    faces = [c.stats.faces for c in farm.store.chunks(job.job_id) if c.stats]
    assert sum(faces) > 0, "the astronaut was not found: frames were not decoded upright"


# --- cancel and retry ----------------------------------------------------------------------------------


def test_cancel_stops_rendering_and_retry_renders_only_the_missing_chunks(
    farm: E2EFarm, videos: Path, face_image: Path, tmp_path: Path
) -> None:
    frames = storyboard([("group", 48), ("astronaut", 48)], WIDTH, HEIGHT)
    source = write_video(frames, videos / "long.mp4", keyint=250)
    with farm.client() as client:
        job_id = client.submit(source, face_image, OPTIONS)
        wait_for_status(client, job_id, lambda v: v.status is JobStatus.RENDERING and v.chunks_done >= 1)
        cancelled = client.cancel(job_id)
        assert cancelled.status is JobStatus.CANCELLED
        at_cancel = cancelled.frames_done

        deadline = time.monotonic() + 10.0
        while True:
            running = [c.index for c in farm.store.chunks(job_id) if c.status is ChunkStatus.RUNNING]
            active = farm.active_render_tasks()
            if not running and not active:
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"10 s after cancel: chunks {running} RUNNING, tasks {active}\n{farm.diagnostics(job_id)}"
                )
            time.sleep(0.25)
        after = client.status(job_id)
        assert after.status is JobStatus.CANCELLED
        assert at_cancel <= after.frames_done <= at_cancel + BATCH_FRAMES, (at_cancel, after.frames_done)
        with pytest.raises(FaceFarmError, match="cancelled"):
            client.wait(job_id, timeout_s=5)

        before = {c.index: c for c in farm.store.chunks(job_id)}
        committed = {i for i, c in before.items() if c.status is ChunkStatus.COMMITTED}
        assert committed and len(committed) < len(before) == 8, {i: c.status for i, c in before.items()}

        retried = client.retry(job_id)
        assert retried.status is JobStatus.RENDERING
        seen: list[JobView] = []
        try:
            client.wait(job_id, progress=seen.append, poll_s=POLL_S, timeout_s=JOB_TIMEOUT_S)
        except (FaceFarmError, TimeoutError) as exc:
            raise AssertionError(f"retry did not complete: {exc!r}\n{farm.diagnostics(job_id)}") from exc
        output = client.download(job_id, tmp_path / "long-out.mp4")

    done = [v.frames_done for v in seen]
    assert done == sorted(done) and done[-1] == len(frames)
    after_retry = {c.index: c for c in farm.store.chunks(job_id)}
    for index in committed:  # committed chunks were not rendered again
        assert after_retry[index].attempts == before[index].attempts, index
    for index in set(before) - committed:
        assert after_retry[index].status is ChunkStatus.COMMITTED
        assert len(after_retry[index].attempts) > len(before[index].attempts), index
    assert count_frames(output) == len(frames)


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("text", "holiday.mp4"), ("audio-only", "no video stream")],
)
def test_bad_input_fails_within_seconds_before_any_render(
    farm: E2EFarm, face_image: Path, tmp_path: Path, kind: str, expected: str
) -> None:
    video = tmp_path / "holiday.mp4"
    if kind == "text":
        video.write_text("this is a shopping list, not a video\n" * 20)
    else:
        make_audio_only(video)
    t0 = time.monotonic()
    with farm.client() as client:
        job_id = client.submit(video, face_image, OPTIONS)
        with pytest.raises(InvalidVideoError) as raised:
            client.wait(job_id, poll_s=POLL_S, timeout_s=10.0)
        elapsed = time.monotonic() - t0
        view = client.status(job_id)
    assert elapsed < 10.0
    assert view.status is JobStatus.FAILED
    assert view.error and expected in view.error, view.error
    assert str(raised.value) == view.error
    assert view.chunks_total == 0  # refused at planning: nothing was sent to the gpu queue
    assert job_id not in "".join(w.log() for w in farm.procs.render_workers)


# --- S3 (moto's server): inputs and output in the bucket, workers read presigned URLs ------------------


def test_job_with_inputs_and_output_on_s3_completes(
    s3_farm: tuple[E2EFarm, str], main_video: Path, face_image: Path, tmp_path: Path
) -> None:
    farm, endpoint = s3_farm
    job = run_job(farm, main_video, face_image, tmp_path / "s3-out.mp4")
    record = farm.store.get_job(job.job_id)
    assert record.video_uri.startswith("s3://e2e-farm/facefarm/jobs/")
    assert (record.output_uri or "").startswith("s3://e2e-farm/facefarm/jobs/")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="e2e-farm", Prefix="facefarm/jobs/")["Contents"]}
    assert record.output_uri.removeprefix("s3://e2e-farm/") in keys  # type: ignore[union-attr]
    assert count_frames(job.output) == MAIN_FRAMES
    assert_same_timestamps(main_video, job.output)
    assert audio_packet_hashes(job.output) == audio_packet_hashes(main_video)
