"""FarmClient's own behaviour against a scripted server (httpx.MockTransport): requests and errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from facefarm.client import FarmClient
from facefarm.embedded import free_port
from shared import errors as e
from shared.schemas import JobStatus, JobView

Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler) -> FarmClient:
    return FarmClient("http://farm.test/", "tok", transport=httpx.MockTransport(handler))


def view(status: JobStatus, **extra: object) -> dict[str, object]:
    return JobView(job_id="j1", owner="alice", status=status, **extra).model_dump(mode="json")  # type: ignore[arg-type]


def test_submit_uploads_files_and_options_as_multipart(tmp_path: Path) -> None:
    (tmp_path / "v.mp4").write_bytes(b"VIDEO")
    (tmp_path / "f.png").write_bytes(b"FACE")
    seen: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["auth"] = request.headers["authorization"]
        seen["type"] = request.headers["content-type"]
        seen["body"] = request.read()
        return httpx.Response(201, json={"job_id": "j1", "status": "QUEUED"})

    job_id = client(handler).submit(
        tmp_path / "v.mp4", str(tmp_path / "f.png"), {"swapper": "classic", "upscale": 2}
    )
    assert job_id == "j1"
    assert seen["auth"] == "Bearer tok"
    assert str(seen["type"]).startswith("multipart/form-data")
    body = bytes(seen["body"])  # type: ignore[arg-type]
    assert b'filename="v.mp4"' in body and b"VIDEO" in body and b"FACE" in body
    assert b'"upscale": 2' in body and b'"swapper": "classic"' in body


def test_submit_with_uris_sends_json() -> None:
    seen: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.read()))
        return httpx.Response(201, json={"job_id": "j2", "status": "QUEUED"})

    assert client(handler).submit("s3://b/v.mp4", "s3://b/f.png") == "j2"
    assert seen["video_uri"] == "s3://b/v.mp4" and seen["face_uri"] == "s3://b/f.png"
    assert "reference_uri" not in seen


def test_unreadable_local_input_is_a_bad_input_error(tmp_path: Path) -> None:
    with pytest.raises(e.BadInputError, match="missing.mp4"):
        client(lambda r: httpx.Response(500)).submit(tmp_path / "missing.mp4", tmp_path / "f.png")


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (401, {"error": "invalid API token", "kind": "AuthError"}, e.AuthError),
        (401, None, e.AuthError),
        (404, {"error": "no job 'x'", "kind": "NotFoundError"}, e.NotFoundError),
        (404, None, e.NotFoundError),
        (422, {"error": "no face in face.png", "kind": "NoFaceError"}, e.NoFaceError),
        (413, {"error": "too big", "kind": "LimitExceededError"}, e.LimitExceededError),
        (503, {"error": "redis down", "kind": "BrokerUnavailableError"}, e.BrokerUnavailableError),
        (500, None, e.FaceFarmError),
    ],
)
def test_http_errors_become_the_projects_error_classes(
    status: int, body: dict[str, str] | None, expected: type[e.FaceFarmError]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body) if body else httpx.Response(status, text="boom")

    with pytest.raises(expected) as info:
        client(handler).status("j1")
    assert type(info.value) is expected
    if body:
        assert str(info.value) == body["error"]


def test_connection_refused_is_a_retryable_error_naming_the_api() -> None:
    port = free_port()  # nothing listens there
    with FarmClient(f"http://127.0.0.1:{port}", "tok", timeout_s=2) as farm:
        with pytest.raises(e.ApiUnavailableError, match=f"127.0.0.1:{port}") as info:
            farm.status("j1")
    assert isinstance(info.value, e.RetryableError)


def test_wait_reports_progress_and_returns_the_completed_job() -> None:
    states = iter(
        [view(JobStatus.PLANNING), view(JobStatus.RENDERING, frames_done=5), view(JobStatus.COMPLETED)]
    )
    seen: list[JobStatus] = []
    result = client(lambda r: httpx.Response(200, json=next(states))).wait(
        "j1", progress=lambda v: seen.append(v.status), poll_s=0
    )
    assert result.status is JobStatus.COMPLETED
    assert seen == [JobStatus.PLANNING, JobStatus.RENDERING, JobStatus.COMPLETED]


def test_wait_raises_the_recorded_error_class_of_a_failed_job() -> None:
    failed = view(JobStatus.FAILED, error="no face found in face.png", error_kind="NoFaceError")
    with pytest.raises(e.NoFaceError, match="no face found in face.png"):
        client(lambda r: httpx.Response(200, json=failed)).wait("j1", poll_s=0)


def test_wait_raises_cancelled_and_times_out() -> None:
    with pytest.raises(e.JobCancelledError):
        client(lambda r: httpx.Response(200, json=view(JobStatus.CANCELLED))).wait("j1", poll_s=0)
    with pytest.raises(TimeoutError, match="RENDERING"):
        client(lambda r: httpx.Response(200, json=view(JobStatus.RENDERING))).wait(
            "j1", poll_s=0.01, timeout_s=0.05
        )


def test_download_writes_the_file_and_leaves_no_partial_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    ok = client(lambda r: httpx.Response(200, content=b"MP4DATA" * 1000))
    assert ok.download("j1", target) == target
    assert target.read_bytes() == b"MP4DATA" * 1000

    missing = tmp_path / "missing.mp4"
    gone = client(
        lambda r: httpx.Response(409, json={"error": "job j1 is RENDERING", "kind": "PermanentError"})
    )
    with pytest.raises(e.PermanentError, match="RENDERING"):
        gone.download("j1", missing)
    assert list(tmp_path.iterdir()) == [target]


def test_download_follows_a_redirect_without_leaking_the_token(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "farm.test":
            return httpx.Response(
                307, headers={"location": "https://s3.test/bucket/out.mp4?X-Amz-Signature=s"}
            )
        assert "authorization" not in request.headers
        return httpx.Response(200, content=b"FROM-S3")

    target = client(handler).download("j1", tmp_path / "o.mp4")
    assert target.read_bytes() == b"FROM-S3"


def test_cancel_retry_logs_audit_and_list_hit_their_routes() -> None:
    routes: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        routes.append(f"{request.method} {request.url.path}")
        path = request.url.path
        if path.endswith("/logs"):
            return httpx.Response(200, json=["a", "b"])
        if path.endswith("/audit"):
            return httpx.Response(200, json={"job_id": "j1"})
        if path == "/jobs":
            return httpx.Response(200, json=[view(JobStatus.QUEUED)])
        return httpx.Response(200, json=view(JobStatus.CANCELLED))

    farm = client(handler)
    assert farm.cancel("j1").status is JobStatus.CANCELLED
    farm.retry("j1")
    assert farm.logs("j1") == ["a", "b"]
    assert farm.audit("j1") == {"job_id": "j1"}
    assert [v.job_id for v in farm.list()] == ["j1"]
    assert routes == [
        "POST /jobs/j1/cancel",
        "POST /jobs/j1/retry",
        "GET /jobs/j1/logs",
        "GET /jobs/j1/audit",
        "GET /jobs",
    ]
