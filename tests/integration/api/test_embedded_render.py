"""``facefarm render`` in embedded mode, as a user runs it: a subprocess that starts a real
redis-server, uvicorn API and Celery workers, and must leave no process behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import av
import pytest

from shared.model_store import ensure_store
from tests.support.services import require_tool

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
STORE = ROOT / "models-store"
IMAGES = Path(__import__("insightface").__file__).parent / "data" / "images"
RENDER_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_tool("redis-server")
    require_tool("ffmpeg")
    ensure_store(STORE)
    d = tmp_path_factory.mktemp("media")
    video = d / "tiny.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-loop", "1", "-i", str(IMAGES / "t1.jpg"),
         "-vf", "scale=160:-2,format=yuv420p", "-frames:v", "30", "-r", "30", "-c:v", "libx264", str(video)],
        check=True,
    )  # fmt: skip
    noface = d / "gray.png"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=gray:s=160x160", "-frames:v", "1", str(noface)],
        check=True,
    )  # fmt: skip
    text = d / "notes.mp4"
    text.write_text("this is a text file, not a video\n")
    face = d / "face.png"
    shutil.copy(IMAGES / "Tom_Hanks_54745.png", face)
    return {"video": video, "face": face, "noface": noface, "text": text}


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Path]:
    """The CLI's TMPDIR: every embedded service runs with its cwd inside it."""
    yield tmp_path
    assert processes_under(tmp_path) == [], "embedded services left running"


def processes_under(root: Path) -> list[int]:
    """Pids whose working directory is (or was, before deletion) inside ``root``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(root)):
            pids.append(int(entry.name))
    return pids


def cli_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEFARM_")}
    env.update(
        TMPDIR=str(tmp),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        FACEFARM_MODEL_STORE=str(STORE),
        FACEFARM_LOG_LEVEL="WARNING",
    )
    return env


def render(tmp: Path, *args: str, timeout_s: float = RENDER_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "facefarm", "render", *args, "--swapper", "classic", "--gpus", "none"],
        cwd=tmp,
        env=cli_env(tmp),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_missing_video_fails_with_one_line_before_starting_anything(
    sandbox: Path, media: dict[str, Path]
) -> None:
    result = render(
        sandbox, str(sandbox / "nope.mp4"), "--face", str(media["face"]), "-o", str(sandbox / "o.mp4")
    )
    assert result.returncode == 1
    assert error_lines(result) == [f"facefarm: error: VIDEO: no such file: {sandbox / 'nope.mp4'}"]
    assert not any(p.name.startswith("facefarm-embedded-") for p in sandbox.iterdir())


def test_text_file_named_mp4_fails_with_one_line(sandbox: Path, media: dict[str, Path]) -> None:
    result = render(sandbox, str(media["text"]), "--face", str(media["face"]), "-o", str(sandbox / "o.mp4"))
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("facefarm: error: ") and "notes.mp4" in lines[0]
    assert not (sandbox / "o.mp4").exists()


def test_face_image_without_a_face_fails_with_one_line(sandbox: Path, media: dict[str, Path]) -> None:
    result = render(
        sandbox, str(media["video"]), "--face", str(media["noface"]), "-o", str(sandbox / "o.mp4")
    )
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("facefarm: error: ") and "no face" in lines[0]


def test_ctrl_c_stops_every_embedded_service(sandbox: Path, media: dict[str, Path]) -> None:
    # each rendered batch sleeps 2 s, so the interrupt lands mid-render however fast the machine is
    env = {**cli_env(sandbox), "FACEFARM_FAULT_INJECTION": "sleep:chunk,s=2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "facefarm", "render", str(media["video"]), "--face", str(media["face"]),
         "-o", str(sandbox / "o.mp4"), "--swapper", "classic", "--gpus", "none"],
        cwd=sandbox, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a suite started in the background (`cmd &`) inherits SIGINT ignored, and so would the CLI
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    started = time.monotonic()
    try:
        deadline = started + 60
        # redis-server, the API, two workers and their pool children: all run in the farm's temp dir
        while len(seen := [p for p in processes_under(sandbox) if p != proc.pid]) < 6:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "embedded services did not start"
            time.sleep(0.2)
        signalled = time.monotonic() - started
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ended = time.monotonic() - started
    assert proc.returncode == 130, (
        f"exit {proc.returncode}: SIGINT at {signalled:.1f} s with {len(seen)} processes up, exit at "
        f"{ended:.1f} s\nstdout: {stdout[-1500:]}\nstderr: {stderr[-1500:]}"
    )
    assert stderr.strip().splitlines() == ["facefarm: error: interrupted"]
    assert processes_under(sandbox) == []
    assert os.listdir(sandbox) == []  # the temp dir is gone too


def test_tiny_render_succeeds_and_keeps_every_frame(sandbox: Path, media: dict[str, Path]) -> None:
    output = sandbox / "out.mp4"
    result = render(sandbox, str(media["video"]), "--face", str(media["face"]), "-o", str(output), "--json")
    assert result.returncode == 0, result.stderr
    assert '"status":"COMPLETED"' in result.stdout
    with av.open(str(output)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 30
    assert [p for p in sandbox.iterdir() if p.name.startswith("facefarm-embedded-")] == []
