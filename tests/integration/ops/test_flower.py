"""Flower as the compose file runs it (``facefarm flower``), against the farm's real Redis and workers:
nothing without auth, and with auth a real browser (headless Chromium) shows the workers and the
job's render tasks with their job id and chunk index."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from shared.schemas import JobStatus
from tests.integration.ops.conftest import (
    ComposeFarm,
    FinishedJob,
    artifacts_dir,
    chromium,
    flower_get,
)

pytestmark = pytest.mark.integration

PAGES = ("/", "/workers", "/tasks", "/broker", "/api/workers", "/api/tasks")
BROWSER_TIMEOUT_S = 90


def browser_args(user_data_dir: Path) -> list[str]:
    return [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={user_data_dir}", "--window-size=1600,1000", "--virtual-time-budget=10000",
    ]  # fmt: skip


def authed_url(farm: ComposeFarm, path: str) -> str:
    """Basic auth in the URL: Chromium answers Flower's 401 challenge with it."""
    host = farm.flower_url.removeprefix("http://")
    return f"http://{quote(farm.flower_user)}:{quote(farm.flower_password)}@{host}{path}"


def dump_dom(farm: ComposeFarm, path: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (Flower fills its tables with XHRs)."""
    done = subprocess.run(
        [*browser_args(profile), "--dump-dom", authed_url(farm, path)],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def screenshot(farm: ComposeFarm, path: str, profile: Path, out: Path) -> Path:
    done = subprocess.run(
        [*browser_args(profile), f"--screenshot={out}", authed_url(farm, path)],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT_S,
    )
    assert done.returncode == 0 and out.is_file(), done.stderr[-3000:]
    return out


def test_every_flower_page_and_api_answers_401_without_auth(compose_farm: ComposeFarm) -> None:
    for path in PAGES:
        response = flower_get(compose_farm, path, auth=False)
        assert response.status_code == 401, (path, response.status_code)
        if not path.startswith("/api/"):  # pages challenge browsers; the JSON API only refuses
            assert response.headers.get("www-authenticate", "").lower().startswith("basic")
    wrong = compose_farm.flower_password[::-1]
    import httpx

    response = httpx.get(
        f"{compose_farm.flower_url}/workers", auth=(compose_farm.flower_user, wrong), timeout=10
    )
    assert response.status_code == 401
    for path in PAGES:
        assert flower_get(compose_farm, path, auth=True).status_code == 200, path


def test_flower_api_lists_the_render_tasks_with_job_and_chunk(
    compose_farm: ComposeFarm, completed_job: FinishedJob
) -> None:
    assert completed_job.views[-1].status is JobStatus.COMPLETED
    tasks = flower_get(compose_farm, "/api/tasks", auth=True).json()
    renders = [t for t in tasks.values() if t.get("name") == "facefarm.render_chunk"]
    mine = {t["args"] for t in renders if completed_job.job_id in (t.get("args") or "")}
    assert mine == {f"job={completed_job.job_id} chunk={i}" for i in (0, 1)}, renders
    assert {t["worker"] for t in renders if t["args"] in mine} == {f"cpu0-0@{compose_farm.hostname}"}
    assert all(t["state"] == "SUCCESS" for t in renders if t["args"] in mine)


def test_chromium_sees_workers_and_job_tasks_in_flower(
    compose_farm: ComposeFarm, completed_job: FinishedJob, tmp_path: Path
) -> None:
    host = compose_farm.hostname
    workers_dom = dump_dom(compose_farm, "/workers", tmp_path / "profile-workers")
    for worker in (f"dispatch-0@{host}", f"cpu0-0@{host}"):
        assert worker in workers_dom, workers_dom[-3000:]

    tasks_dom = dump_dom(compose_farm, "/tasks", tmp_path / "profile-tasks")
    job_id = completed_job.job_id
    assert "facefarm.render_chunk" in tasks_dom, tasks_dom[-3000:]
    for task in ("facefarm.plan_job", "facefarm.merge_job"):
        assert task in tasks_dom
    for index in (0, 1):
        assert f"job={job_id} chunk={index}" in tasks_dom, tasks_dom[-3000:]

    shot = screenshot(compose_farm, "/tasks", tmp_path / "profile-shot", artifacts_dir() / "flower-tasks.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
