"""The render pipeline on a real-face clip: identity moves, nothing else changes, timing is exact."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from dispatcher.planner import encoder_settings_for, plan_chunks
from shared.errors import JobCancelledError, NoFaceError
from shared.media import probe
from shared.schemas import ChunkSpec, JobOptions
from shared.settings import Settings
from worker.frames import decode_range, open_encoder
from worker.models.align import warp_face
from worker.models.detect_mtcnn import MtcnnDetector
from worker.models.engine import FaceEngine
from worker.models.source_face import decode_image, load_source_face
from worker.pipeline import render_chunk

from .conftest import Clip

FACE_FRAMES = [*range(0, 8), *range(12, 20)]
NO_FACE_FRAMES = [8, 9, 10, 11]


def chunk_specs(
    video: Path, settings: Settings, options: JobOptions, *, chunk_frames: int
) -> list[ChunkSpec]:
    info = probe(str(video))
    encoder = encoder_settings_for(info, options, settings)
    return [
        ChunkSpec(
            job_id="pipeline-test",
            index=c.index,
            start_frame=c.start_frame,
            end_frame=c.end_frame,
            warmup_frames=c.warmup_frames,
            seek_pts=c.seek_pts,
            seek_frame=c.seek_frame,
            source_uri=video.as_uri(),
            face_uri="unused",
            output_uri="unused",
            options=options,
            encoder=encoder,
        )
        for c in plan_chunks(info, chunk_frames=chunk_frames, warmup_frames=3)
    ]


def render_all(specs: list[ChunkSpec], video: Path, face: Path, settings: Settings, out: Path) -> list[Path]:
    paths = []
    for spec in specs:
        path = out / f"chunk{spec.index}.mp4"
        stats = render_chunk(
            spec,
            source=str(video),
            face_path=face,
            output_path=path,
            settings=settings,
            on_progress=lambda n: None,
            should_stop=lambda: False,
            log=lambda line: None,
        )
        assert stats.frames == spec.frame_count
        # the tail after the face thread's last batch holds the encoder's flush
        assert stats.stage_seconds["drain"] >= stats.stage_seconds["encode.flush"] > 0
        paths.append(path)
    return paths


def render_whole_clip(clip: Clip, settings: Settings, options: JobOptions, out: Path) -> None:
    """Render the clip's 20 frames as one chunk into ``out/c.mp4``."""
    spec = chunk_specs(clip.video, settings, options, chunk_frames=20)[0]
    render_chunk(
        spec,
        source=str(clip.video),
        face_path=clip.face,
        output_path=out / "c.mp4",
        settings=settings,
        on_progress=lambda n: None,
        should_stop=lambda: False,
        log=lambda line: None,
    )


def decode_all(paths: list[Path]) -> np.ndarray:
    frames = []
    for path in paths:
        cap = cv2.VideoCapture(str(path))
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return np.stack(frames)


def packet_pts(path: Path) -> list[int]:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "packet=pts",
            "-of",
            "csv=p=0",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(int(x) for x in out.split())


def inner_face(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    crop, _ = warp_face(image, landmarks, 112)
    gray = crop.astype(np.float64).mean(axis=2)[36:100, 30:82]
    return (gray - gray.mean()) / (gray.std() + 1e-6)


@pytest.fixture(scope="module")
def lossless_options() -> JobOptions:
    return JobOptions(swapper="classic", crf=0, preset="ultrafast")


@pytest.fixture(scope="module")
def rendered(clip: Clip, pipeline_store: Path, lossless_options: JobOptions, tmp_path_factory) -> dict:
    settings = Settings(device="cpu", model_store=str(pipeline_store), batch_frames=4, encoder_threads=1)
    out = tmp_path_factory.mktemp("rendered")
    specs = chunk_specs(clip.video, settings, lossless_options, chunk_frames=7)
    swapped = render_all(specs, clip.video, clip.face, settings, out)
    # The no-swap reference: the same decode and the same encoder settings, no face engine.
    reference = []
    for spec in specs:
        path = out / f"ref{spec.index}.mp4"
        with open_encoder(path, spec.encoder) as enc:
            for batch in decode_range(
                str(clip.video),
                start_frame=spec.start_frame,
                end_frame=spec.end_frame,
                warmup_frames=0,
                seek_pts=spec.seek_pts,
                seek_frame=spec.seek_frame,
                batch_frames=4,
            ):
                enc.write(batch.frames, batch.pts)
        reference.append(path)
    return {"specs": specs, "swapped": swapped, "reference": reference}


@pytest.fixture(scope="module")
def decoded(rendered: dict, face_detector: MtcnnDetector) -> dict:
    """Both renders decoded, and the faces of the reference frames detected once (as one batch)."""
    reference = decode_all(rendered["reference"])
    return {
        "swapped": decode_all(rendered["swapped"]),
        "reference": reference,
        "faces": face_detector.detect(reference),
    }


def test_chunks_start_between_keyframes_and_keep_every_frame_and_timestamp(
    clip: Clip, rendered: dict
) -> None:
    specs = rendered["specs"]
    assert len(specs) >= 3 and any(s.start_frame != s.seek_frame for s in specs)
    source_pts = packet_pts(clip.video)
    out_pts = [pts for path in rendered["swapped"] for pts in packet_pts(path)]
    assert out_pts == source_pts
    assert len(decode_all(rendered["swapped"])) == len(clip.frames)


def test_faceless_frames_and_pixels_away_from_faces_are_bit_identical(decoded: dict) -> None:
    swapped, reference = decoded["swapped"], decoded["reference"]
    for i in NO_FACE_FRAMES:
        assert np.array_equal(swapped[i], reference[i]), f"face-free frame {i} changed"
    for i in FACE_FRAMES:
        faces = decoded["faces"][i]
        assert faces, f"no face detected in reference frame {i}"
        allowed = np.zeros(reference[i].shape[:2], bool)
        for face in faces:
            x1, y1, x2, y2 = face.box
            pad_x, pad_y = 0.35 * (x2 - x1), 0.35 * (y2 - y1)
            allowed[
                max(0, int(y1 - pad_y)) : int(y2 + pad_y) + 1, max(0, int(x1 - pad_x)) : int(x2 + pad_x) + 1
            ] = True
        changed = np.any(swapped[i] != reference[i], axis=2)
        assert changed.any(), f"frame {i} was not swapped"
        assert not changed[~allowed].any(), f"frame {i} changed outside its faces"


def test_every_output_face_looks_more_like_the_source_than_the_target(
    clip: Clip, decoded: dict, face_detector: MtcnnDetector
) -> None:
    source = load_source_face(decode_image(clip.face), face_detector)
    source_inner = inner_face(source.image, source.face.landmarks)
    swapped, reference = decoded["swapped"], decoded["reference"]
    for i in FACE_FRAMES:
        face = decoded["faces"][i][0]
        out = inner_face(swapped[i], face.landmarks)
        to_source = np.linalg.norm(out - source_inner)
        to_target = np.linalg.norm(out - inner_face(reference[i], face.landmarks))
        assert to_source < to_target, (i, to_source, to_target)


def test_a_rotated_input_comes_out_upright(
    clip: Clip, pipeline_store: Path, lossless_options, tmp_path
) -> None:
    settings = Settings(device="cpu", model_store=str(pipeline_store), batch_frames=4, encoder_threads=1)
    specs = chunk_specs(clip.rotated, settings, lossless_options, chunk_frames=10)
    out = decode_all(render_all(specs, clip.rotated, clip.face, settings, tmp_path))
    upright = subprocess.run(  # the ffmpeg CLI autorotates: the reference for "upright"
        ["ffmpeg", "-v", "error", "-i", str(clip.rotated), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        check=True,
    ).stdout
    expected = np.frombuffer(upright, np.uint8).reshape(out.shape)
    for i in NO_FACE_FRAMES:
        # 4:2:0 re-encoding of a 4:4:4 source costs ~2-3 levels; a wrong orientation costs tens.
        upright_diff = np.abs(out[i].astype(int) - expected[i].astype(int)).mean()
        for turns in (1, 2, 3):
            wrong = np.abs(np.rot90(out[i], turns).astype(int) - expected[i].astype(int)).mean()
            assert upright_diff * 4 < wrong, (i, turns, upright_diff, wrong)
        assert upright_diff < 4.0, f"frame {i} differs from the upright reference by {upright_diff:.1f}"


def test_cancel_stops_between_batches(clip: Clip, cpu_settings: Settings, lossless_options, tmp_path) -> None:
    spec = chunk_specs(clip.video, cpu_settings, lossless_options, chunk_frames=20)[0]
    progress: list[int] = []
    with pytest.raises(JobCancelledError):
        render_chunk(
            spec,
            source=str(clip.video),
            face_path=clip.face,
            output_path=tmp_path / "c.mp4",
            settings=cpu_settings,
            on_progress=progress.append,
            should_stop=lambda: bool(progress),
            log=lambda line: None,
        )
    assert progress == [cpu_settings.batch_frames - spec.warmup_frames] or len(progress) == 1


def test_a_face_image_without_a_face_fails_the_chunk_clearly(
    clip: Clip, cpu_settings, lossless_options, tmp_path
) -> None:
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 127, np.uint8))
    spec = chunk_specs(clip.video, cpu_settings, lossless_options, chunk_frames=20)[0]
    with pytest.raises(NoFaceError, match="face"):
        render_chunk(
            spec,
            source=str(clip.video),
            face_path=blank,
            output_path=tmp_path / "c.mp4",
            settings=cpu_settings,
            on_progress=lambda n: None,
            should_stop=lambda: False,
            log=lambda line: None,
        )


def test_detecting_ahead_in_its_own_thread_changes_no_pixel(
    clip: Clip, pipeline_store: Path, lossless_options, tmp_path
) -> None:
    outputs = {}
    for ahead in ("on", "off"):
        settings = Settings(
            device="cpu",
            model_store=str(pipeline_store),
            batch_frames=4,
            encoder_threads=1,
            detect_ahead=ahead,
        )
        specs = chunk_specs(clip.video, settings, lossless_options, chunk_frames=10)
        outputs[ahead] = decode_all(render_all(specs, clip.video, clip.face, settings, tmp_path / str(ahead)))
    assert np.array_equal(outputs["on"], outputs["off"])
    assert not [t.name for t in threading.enumerate() if t.name in ("detect", "decode")]


def test_a_detection_error_in_the_detect_thread_fails_the_chunk_and_stops_its_threads(
    clip: Clip, cpu_settings: Settings, lossless_options, tmp_path, monkeypatch
) -> None:
    calls = []
    real = FaceEngine.find_faces

    def failing(self: FaceEngine, frames: np.ndarray) -> list:
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise RuntimeError("detector exploded on batch 2")
        return real(self, frames)

    monkeypatch.setattr(FaceEngine, "find_faces", failing)
    with pytest.raises(RuntimeError, match="batch 2"):
        render_whole_clip(
            clip, cpu_settings.model_copy(update={"detect_ahead": "on"}), lossless_options, tmp_path
        )
    assert calls == ["detect", "detect"]  # one batch ahead of the swap, in its own thread
    assert not [t.name for t in threading.enumerate() if t.name in ("detect", "decode")]


def test_blending_in_a_thread_pool_changes_no_pixel(clip: Clip, pipeline_store: Path, tmp_path) -> None:
    """The mesh swapper tracks in the face thread and blends in the pool: same frames as inline."""
    options = JobOptions(swapper="mesh", crf=0, preset="ultrafast")
    outputs = {}
    for threads in (0, 2):
        settings = Settings(
            device="cpu",
            model_store=str(pipeline_store),
            batch_frames=4,
            encoder_threads=1,
            mesh_compositor="batched",  # the device compositor, as CUDA workers run it
            blend_threads=threads,
        )
        specs = chunk_specs(clip.video, settings, options, chunk_frames=10)
        outputs[threads] = decode_all(
            render_all(specs, clip.video, clip.face, settings, tmp_path / str(threads))
        )
    assert np.array_equal(outputs[0], outputs[2])
    source = decode_all([clip.video])
    assert not np.array_equal(outputs[0][FACE_FRAMES], source[FACE_FRAMES])  # faces were swapped
    assert not [t.name for t in threading.enumerate() if t.name.startswith("blend-")]


def test_the_last_batch_goes_down_in_halves_with_a_pool_and_changes_no_pixel(
    clip: Clip, pipeline_store: Path, tmp_path, monkeypatch
) -> None:
    """With 2 blend threads the chunk's last batch is finished as two halves (its blend, SR and encode
    overlap); the video is the one an unsplit render gives."""
    sizes: list[int] = []
    real = FaceEngine.finish_swap

    def counting(self: FaceEngine, work) -> np.ndarray:
        sizes.append(len(work.frames))
        return real(self, work)

    monkeypatch.setattr(FaceEngine, "finish_swap", counting)
    options = JobOptions(swapper="mesh", crf=0, preset="ultrafast")
    outputs = {}
    for threads in (0, 2):
        sizes.clear()
        settings = Settings(
            device="cpu",
            model_store=str(pipeline_store),
            batch_frames=8,
            encoder_threads=1,
            mesh_compositor="batched",
            blend_threads=threads,
        )
        render_whole_clip(clip, settings, options, tmp_path / str(threads))
        outputs[threads] = decode_all([tmp_path / str(threads) / "c.mp4"])
        assert sizes == ([8, 8, 4] if threads == 0 else [8, 8, 2, 2]), sizes
    assert len(outputs[0]) == 20 and np.array_equal(outputs[0], outputs[2])


def test_a_blend_error_in_the_pool_fails_the_chunk_and_stops_its_threads(
    clip: Clip, cpu_settings: Settings, lossless_options, tmp_path, monkeypatch
) -> None:
    calls = []
    real = FaceEngine.finish_swap

    def failing(self: FaceEngine, work) -> np.ndarray:
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise RuntimeError("blend exploded on batch 2")
        return real(self, work)

    monkeypatch.setattr(FaceEngine, "finish_swap", failing)
    with pytest.raises(RuntimeError, match="batch 2"):
        render_whole_clip(
            clip, cpu_settings.model_copy(update={"blend_threads": 2}), lossless_options, tmp_path
        )
    assert len(calls) >= 2 and all(name.startswith("blend-") for name in calls)
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("blend-", "detect", "decode"))]
