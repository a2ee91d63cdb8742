"""The bad-input corpus through the client AND the CLI (``facefarm submit``/``wait --api``).

Each case (``corpus.py``) must render or end with one of its allowed permanent errors; a refusal
comes within 10 s and before any chunk exists (so before any GPU task): at submit (API), at the
input check (face detector on a CPU-only worker) or at planning (probe, limits, a full decode on the
CPU). No worker crashes, no job hangs, no temp files remain.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.errors import FaceFarmError
from shared.schemas import JobOptions, JobStatus
from tests.integration.reliability.conftest import OPTIONS, TOKENS, Farm, Recorder, framemd5
from tests.integration.reliability.corpus import COMPLETED, Case, build, corpus

pytestmark = pytest.mark.integration

REFUSAL_S = 10.0
RENDER_TIMEOUT_S = 120.0
CONCURRENT_CASES = 2
CASES = corpus()


@dataclass
class Ending:
    path: str  # "client" | "cli"
    ended: str  # COMPLETED or an error class name ("?" when the CLI refused before a job existed)
    stage: str  # submit | plan | render | done
    seconds: float
    job_id: str | None
    message: str = ""


def _inputs(case: Case, workdir: Path, videos: Path, face_image: Path) -> tuple[Path, Path]:
    made = build(case, workdir)
    return (made, face_image) if case.role == "video" else (videos / "base15.mp4", made)


def _stage(farm: Farm, job_id: str | None, ended: str) -> str:
    if job_id is None:
        return "submit"
    if ended == COMPLETED:
        return "done"
    if farm.ctx.store.get_job(job_id).chunks_total:
        return "render"
    logs = farm.ctx.store.logs(job_id)
    return "check" if any(" input check failed" in line for line in logs) else "plan"


def via_client(farm: Farm, case: Case, video: Path, face: Path) -> Ending:
    options = JobOptions.model_validate({**OPTIONS.model_dump(), **case.options})
    t0 = time.monotonic()
    job_id = None
    with farm.client() as client:
        try:
            job_id = client.submit(str(video), str(face), options)
            client.wait(job_id, timeout_s=RENDER_TIMEOUT_S)
            ended, message = COMPLETED, ""
        except FaceFarmError as exc:
            assert exc.permanent, f"{case.name}: {exc.kind} is not a permanent error: {exc}"
            ended, message = exc.kind, str(exc)
    seconds = time.monotonic() - t0
    return Ending("client", ended, _stage(farm, job_id, ended), seconds, job_id, message)


def _cli(farm: Farm, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "facefarm", *args, "--api", farm.api_url, "--token", TOKENS["alice"]]
    return subprocess.run(command, capture_output=True, text=True, timeout=RENDER_TIMEOUT_S + 30)


def via_cli(farm: Farm, case: Case, video: Path, face: Path) -> Ending:
    flags = {"start_s": "--start", "end_s": "--end", "hdr": "--hdr"}
    extra = [part for key, value in case.options.items() for part in (flags[key], str(value))]
    t0 = time.monotonic()
    submitted = _cli(
        farm, "submit", str(video), "--face", str(face), "--swapper", "classic", "--json", *extra
    )
    job_id = json.loads(submitted.stdout)["job_id"] if submitted.returncode == 0 else None
    result = submitted
    if job_id is not None:
        result = _cli(farm, "wait", job_id, "--json", "--no-progress")
    seconds = time.monotonic() - t0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.returncode == 0:
        return Ending("cli", COMPLETED, "done", seconds, job_id)
    assert len(lines) == 1 and lines[0].startswith("facefarm: error: "), (
        result.stderr
    )  # one line, no traceback
    ended = farm.ctx.store.get_job(job_id).error_kind or "?" if job_id else "?"
    return Ending("cli", ended, _stage(farm, job_id, ended), seconds, job_id, lines[0])


def check_clean(farm: Farm, ending: Ending) -> None:
    """No temp dirs of this job on the worker side, no half-written storage files, no chunks of a refusal.

    (A job that failed at render keeps its committed chunks for ``retry`` until retention.)
    """
    if ending.job_id is None:
        return
    leftovers = list(Path(tempfile.gettempdir()).glob(f"ff-*{ending.job_id}*"))
    assert not leftovers, leftovers
    assert farm.storage_root is not None
    job_dir = farm.storage_root / "jobs" / ending.job_id
    assert not [p for p in job_dir.rglob("*") if ".tmp" in p.name], list(job_dir.rglob("*"))
    if ending.stage in ("submit", "check", "plan"):
        assert not (job_dir / "chunks").exists()  # nothing was rendered for a refusal
    assert farm.ctx.store.get_job(ending.job_id).status.finished  # no hung job


@pytest.fixture(scope="module")
def endings(
    farm: Farm, videos: Path, face_image: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[Ending]]:
    """Every case through the client and the CLI, two cases at a time (both paths side by side)."""
    workdir = tmp_path_factory.mktemp("corpus")

    def run(case: Case) -> list[Ending]:
        video, face = _inputs(case, workdir, videos, face_image)
        with ThreadPoolExecutor(max_workers=2) as pool:
            client_future = pool.submit(via_client, farm, case, video, face)
            cli_future = pool.submit(via_cli, farm, case, video, face)
            return [client_future.result(), cli_future.result()]

    with ThreadPoolExecutor(max_workers=CONCURRENT_CASES) as pool:
        results = dict(zip((c.name for c in CASES), pool.map(run, CASES), strict=True))
    return results


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_renders_or_is_refused_with_a_permanent_error(
    farm: Farm, endings: dict[str, list[Ending]], record: Recorder, case: Case
) -> None:
    client, cli = endings[case.name]
    for ending in (client, cli):
        assert ending.ended in case.allowed or (ending.path == "cli" and ending.ended == "?"), (
            case.name,
            ending,
        )
        if ending.ended != COMPLETED:
            assert ending.seconds <= REFUSAL_S, (case.name, ending)
            assert ending.stage in ("submit", "check", "plan"), (case.name, ending)  # before any GPU task
        else:
            view = farm.ctx.store.view(ending.job_id or "")
            assert view.status is JobStatus.COMPLETED and view.frames_total > 0
            assert len(framemd5(farm.output_path(ending.job_id or ""))) == view.frames_total
        check_clean(farm, ending)
    if cli.ended == "?":  # refused before a job existed: the client said which error it is
        assert client.stage == "submit" and client.ended != COMPLETED, (client, cli)
    for worker in farm.all_workers:
        assert worker.proc.poll() is None, f"{worker.name} crashed"
    record(
        "bad_input",
        case.name,
        "rendered" if client.ended == COMPLETED else f"{client.ended} at {client.stage}",
        client=f"{client.ended} ({client.seconds:.1f} s)",
        cli=f"{cli.ended if cli.ended != '?' else client.ended} ({cli.seconds:.1f} s)",
        role=case.role,
    )
