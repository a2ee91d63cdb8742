"""The HTTP API over a real redis-server and real local storage (no workers: jobs stay queued)."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from dispatcher.app import create_app
from dispatcher.service import FarmContext
from shared.names import storage_output_key
from shared.schemas import ChunkSpec, EncoderSettings, JobOptions, JobStatus
from shared.settings import Settings
from shared.state import JobStore
from shared.storage import create_storage

from .conftest import auth, serve_in_thread

pytestmark = pytest.mark.integration


def submit(api: httpx.Client, owner: str, options: dict[str, object] | None = None) -> str:
    response = api.post(
        "/jobs",
        headers=auth(owner),
        files={
            "video": ("clip.mp4", io.BytesIO(b"not really a video"), "video/mp4"),
            "face": ("face.png", io.BytesIO(b"not really an image"), "image/png"),
        },
        data={"options": json.dumps(options or {"swapper": "classic"})},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["job_id"])


def complete_job_with_output(settings: Settings, job_id: str, payload: bytes) -> None:
    """Drive the real store through plan → merge → complete, with ``payload`` as the output file."""
    store = JobStore.from_settings(settings)
    storage = create_storage(settings)
    job = store.get_job(job_id)
    encoder = EncoderSettings(width=64, height=64, time_base_num=1, time_base_den=25, fps_num=25, fps_den=1)
    spec = ChunkSpec(
        job_id=job_id,
        index=0,
        start_frame=0,
        end_frame=10,
        seek_pts=0,
        seek_frame=0,
        source_uri=job.video_uri,
        face_uri=job.face_uri,
        output_uri=storage.uri_for(f"jobs/{job_id}/chunks/00000/output.mp4"),
        options=JobOptions(swapper="classic"),
        encoder=encoder,
    )
    assert store.set_status(job_id, JobStatus.PLANNING)
    assert store.record_plan(job_id, [spec], frames_total=10, video_info_json="{}")
    assert store.set_status(job_id, JobStatus.MERGING)
    stored = storage.put_stream(storage_output_key(job_id, "mp4"), io.BytesIO(payload))
    assert store.complete_job(job_id, output_uri=stored.uri, output_sha256=stored.sha256)
    store.close()


def test_submit_then_status_list_logs_and_audit_for_the_owner(api: httpx.Client) -> None:
    job_id = submit(api, "alice")
    view = api.get(f"/jobs/{job_id}", headers=auth("alice")).json()
    assert view["status"] == "QUEUED" and view["owner"] == "alice"
    assert [j["job_id"] for j in api.get("/jobs", headers=auth("alice")).json()] == [job_id]
    assert any("submitted" in line for line in api.get(f"/jobs/{job_id}/logs", headers=auth("alice")).json())
    assert api.get(f"/jobs/{job_id}/audit", headers=auth("alice")).json()["owner"] == "alice"


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", ""),
        ("POST", "/cancel"),
        ("POST", "/retry"),
        ("GET", "/output"),
        ("GET", "/logs"),
        ("GET", "/audit"),
    ],
)
def test_another_owners_job_is_not_found(api: httpx.Client, method: str, suffix: str) -> None:
    job_id = submit(api, "alice")
    response = api.request(method, f"/jobs/{job_id}{suffix}", headers=auth("bob"))
    assert response.status_code == 404
    assert response.json()["kind"] == "NotFoundError"
    assert (
        api.get(f"/jobs/{job_id}", headers=auth("alice")).json()["status"] == "QUEUED"
    )  # bob changed nothing
    assert api.get("/jobs", headers=auth("bob")).json() == []


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
def test_job_routes_refuse_missing_or_wrong_tokens(api: httpx.Client, headers: dict[str, str]) -> None:
    response = api.get("/jobs", headers=headers)
    assert response.status_code == 401
    assert response.json()["kind"] == "AuthError"
    assert response.headers["www-authenticate"] == "Bearer"


def test_healthz_and_metrics_need_no_token_and_show_no_job_data(api: httpx.Client) -> None:
    job_id = submit(api, "alice")
    assert api.get("/healthz").json() == {"status": "ok"}
    metrics = api.get("/metrics")
    assert metrics.status_code == 200
    assert job_id not in metrics.text and "alice" not in metrics.text
    assert 'facefarm_jobs{status="QUEUED"}' in metrics.text
    assert "facefarm_store_up 1.0" in metrics.text
    # the job's first message (the input check) sits in the check queue: no worker is running
    assert 'facefarm_queue_length{queue="cpu"}' in metrics.text
    check_line = next(
        ln for ln in metrics.text.splitlines() if ln.startswith('facefarm_queue_length{queue="check"}')
    )
    assert float(check_line.split()[-1]) >= 1


def test_bad_options_are_a_422_naming_the_field(api: httpx.Client) -> None:
    response = api.post(
        "/jobs",
        headers=auth("alice"),
        files={"video": ("a.mp4", io.BytesIO(b"x")), "face": ("f.png", io.BytesIO(b"y"))},
        data={"options": json.dumps({"upscale": 3})},
    )
    assert response.status_code == 422
    assert response.json()["kind"] == "BadInputError"
    assert "upscale" in response.json()["error"]


def test_missing_face_upload_is_a_clear_422(api: httpx.Client) -> None:
    response = api.post("/jobs", headers=auth("alice"), files={"video": ("a.mp4", io.BytesIO(b"x"))})
    assert response.status_code == 422
    assert "face" in response.json()["error"]


def test_uri_outside_the_storage_roots_is_refused(api: httpx.Client) -> None:
    response = api.post(
        "/jobs",
        headers=auth("alice"),
        json={"video_uri": "file:///etc/passwd", "face_uri": "file:///etc/hostname", "options": {}},
    )
    assert response.status_code == 403
    assert response.json()["kind"] == "StorageAccessError"


def test_output_before_completion_is_a_conflict(api: httpx.Client) -> None:
    job_id = submit(api, "alice")
    response = api.get(f"/jobs/{job_id}/output", headers=auth("alice"))
    assert response.status_code == 409
    assert "QUEUED" in response.json()["error"]


def test_output_download_supports_http_range(api: httpx.Client, api_settings: Settings) -> None:
    job_id = submit(api, "alice")
    payload = bytes(range(256)) * 64
    complete_job_with_output(api_settings, job_id, payload)

    full = api.get(f"/jobs/{job_id}/output", headers=auth("alice"))
    assert full.status_code == 200 and full.content == payload
    assert full.headers["accept-ranges"] == "bytes"

    part = api.get(f"/jobs/{job_id}/output", headers={**auth("alice"), "Range": "bytes=100-1099"})
    assert part.status_code == 206
    assert part.content == payload[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(payload)}"

    tail = api.get(f"/jobs/{job_id}/output", headers={**auth("alice"), "Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == payload[-10:]


def test_cancel_then_retry_requeues_the_job(api: httpx.Client) -> None:
    job_id = submit(api, "alice")
    assert api.post(f"/jobs/{job_id}/cancel", headers=auth("alice")).json()["status"] == "CANCELLED"
    assert api.post(f"/jobs/{job_id}/retry", headers=auth("alice")).json()["status"] == "QUEUED"


def test_retry_of_a_queued_job_is_a_conflict(api: httpx.Client) -> None:
    job_id = submit(api, "alice")
    response = api.post(f"/jobs/{job_id}/retry", headers=auth("alice"))
    assert response.status_code == 409
    assert response.json()["kind"] == "PermanentError"


def test_openapi_lists_the_job_routes(api: httpx.Client) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    for path in ("/jobs", "/jobs/{job_id}", "/jobs/{job_id}/output", "/healthz", "/metrics"):
        assert path in paths


def test_an_injected_context_is_used_as_is(api_settings: Settings) -> None:
    from dispatcher.service import create_context

    sent: list[tuple[object, ...]] = []
    base = create_context(api_settings)
    ctx = FarmContext(
        settings=api_settings,
        store=base.store,
        storage=base.storage,
        send_task=lambda *args, **kwargs: sent.append(args),
    )
    with serve_in_thread(create_app(api_settings, context=ctx)) as client:
        submit(client, "bob")
    assert [args[0] for args in sent] == ["facefarm.check_inputs"]  # the face check comes first


def test_json_submit_adopts_file_uris_inside_the_configured_roots(api_settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "clip.mp4").write_bytes(b"video bytes")
    (inputs / "face.png").write_bytes(b"face bytes")
    settings = api_settings.model_copy(update={"file_roots": [inputs]})
    with serve_in_thread(create_app(settings)) as client:
        response = client.post(
            "/jobs",
            headers=auth("alice"),
            json={
                "video_uri": (inputs / "clip.mp4").as_uri(),
                "face_uri": (inputs / "face.png").as_uri(),
                "options": {"swapper": "classic", "crf": 20},
            },
        )
        assert response.status_code == 201, response.text
        job = client.get(f"/jobs/{response.json()['job_id']}", headers=auth("alice")).json()
    assert job["options"]["crf"] == 20
