"""Security and safety against the running farm: owners are isolated, inputs confined, the broker
speaks JSON only, Flower needs auth; every output is labelled, the watermark is visible, the audit
record is complete and exportable (API and CLI).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from celery import Celery

from dispatcher.auth import find_owner, hash_token
from shared.celery_config import celery_config
from shared.errors import StorageAccessError
from shared.names import GPU_QUEUE, RENDER_CHUNK
from shared.schemas import JobOptions, JobStatus
from shared.storage import validate_key
from tests.integration.reliability.conftest import OPTIONS, TOKENS, Farm, Recorder

pytestmark = pytest.mark.integration


def _auth(owner: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[owner]}"}


@pytest.fixture(scope="module")
def alice_job(farm: Farm, videos: Path, face_image: Path) -> str:
    """A completed job of alice's, with the visible watermark on."""
    view = farm.submit(videos / "base15.mp4", face_image, name="watermarked.mp4",
                       options=OPTIONS.model_copy(update={"watermark": True}))  # fmt: skip
    assert farm.wait(view.job_id)[-1].status is JobStatus.COMPLETED, farm.ctx.store.logs(view.job_id)
    return view.job_id


def test_tokens_are_stored_hashed_and_compared_in_constant_time(
    farm: Farm, monkeypatch: pytest.MonkeyPatch, record: Recorder
) -> None:
    stored = farm.settings.api_tokens
    assert set(stored) == {hash_token(t) for t in TOKENS.values()}
    dumped = farm.settings.model_dump_json()
    assert not any(token in dumped for token in TOKENS.values())  # only hashes live in settings
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert find_owner(TOKENS["alice"], stored) == "alice"
    assert len(calls) == len(stored)  # every stored hash compared: no early exit on a match
    assert find_owner("wrong", stored) is None and len(calls) == 2 * len(stored)
    record("security", "API tokens stored as sha256, compared with hmac.compare_digest over all", "verified")


def test_a_token_cannot_touch_another_owners_job(farm: Farm, alice_job: str, record: Recorder) -> None:
    with httpx.Client(base_url=farm.api_url, timeout=30) as http:
        for method, path in [
            ("GET", f"/jobs/{alice_job}"),
            ("POST", f"/jobs/{alice_job}/cancel"),
            ("POST", f"/jobs/{alice_job}/retry"),
            ("GET", f"/jobs/{alice_job}/output"),
            ("GET", f"/jobs/{alice_job}/logs"),
            ("GET", f"/jobs/{alice_job}/audit"),
        ]:
            response = http.request(method, path, headers=_auth("bob"))
            assert response.status_code == 404, (method, path, response.text)
            assert alice_job not in [j["job_id"] for j in http.get("/jobs", headers=_auth("bob")).json()]
            assert http.request(method, path).status_code == 401  # no token at all
            assert http.request(method, path, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert http.get(f"/jobs/{alice_job}", headers=_auth("alice")).json()["status"] == "COMPLETED"
    record(
        "security",
        "bob's token on alice's job: read, cancel, retry, download, logs, audit",
        "404 each; no token 401",
    )


def test_file_uris_are_confined_to_the_configured_roots(
    farm: Farm, face_image: Path, record: Recorder
) -> None:
    outside = farm.inputs.parent / "outside.mp4"
    outside.write_bytes(b"secret")
    link = farm.inputs / "escape.mp4"
    if not link.exists():
        link.symlink_to(outside)
    face = farm.inputs / "face.png"
    face.write_bytes(face_image.read_bytes())
    attempts = {
        "absolute path outside the roots": "file:///etc/passwd",
        "path traversal": f"file://{farm.inputs}/../outside.mp4",
        "encoded traversal": f"file://{farm.inputs}/%2e%2e/outside.mp4",
        "symlink escaping a root": link.as_uri(),
        "remote host": "file://evil.example.com/etc/passwd",
        "foreign s3 bucket": "s3://someone-elses-bucket/video.mp4",
    }
    with httpx.Client(base_url=farm.api_url, timeout=30) as http:
        for what, uri in attempts.items():
            body = {"video_uri": uri, "face_uri": face.as_uri(), "options": {"swapper": "classic"}}
            response = http.post("/jobs", json=body, headers=_auth("alice"))
            assert 400 <= response.status_code < 500, (what, response.text)
            assert response.json().get("kind") == "StorageAccessError", (what, response.text)
            record("security", f"file input: {what}", f"refused ({response.status_code} StorageAccessError)")


@pytest.mark.parametrize(
    "key", ["../etc/passwd", "/abs/key", "jobs/../../x", "jobs//x", "jobs/a b", "jobs/x/", "", "jobs/\x00"]
)
def test_storage_keys_are_validated(key: str) -> None:
    with pytest.raises(StorageAccessError):
        validate_key(key)


def test_broker_is_json_only_and_a_pickle_message_is_refused(farm: Farm, record: Recorder) -> None:
    for role in ("cpu", "gpu"):
        config = celery_config(farm.settings, role=role)  # type: ignore[arg-type]
        assert config["accept_content"] == ["json"] and config["task_serializer"] == "json"
        assert config["result_accept_content"] == ["json"]
    sender = Celery(broker=farm.settings.redis_url, set_as_current=False)
    sender.conf.task_serializer = "pickle"
    sender.conf.accept_content = ["pickle", "json"]
    try:
        sender.send_task(RENDER_CHUNK, args=["pickled-job", 0], queue=GPU_QUEUE, serializer="pickle")
    finally:
        sender.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        logs = "".join(w.log() for w in farm.render_workers)
        if "pickle" in logs and "untrusted content" in logs.lower():
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no worker refused the pickle message:\n{farm.worker_logs()}")
    assert "pickled-job" not in "".join(farm.ctx.store.active_job_ids())
    record(
        "security",
        "pickle-serialised task sent to the gpu queue",
        "refused by the worker (ContentDisallowed)",
    )


def test_flower_refuses_to_start_without_auth(farm: Farm, record: Recorder) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FACEFARM_", "FLOWER_"))}
    env["FACEFARM_REDIS_URL"] = farm.settings.redis_url
    result = subprocess.run([sys.executable, "-m", "facefarm", "flower"], env=env, capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[3])  # fmt: skip
    assert result.returncode != 0
    assert "refusing to start Flower without auth" in result.stderr
    record("security", "facefarm flower without FACEFARM_FLOWER_BASIC_AUTH", "refused, exit 1")


def _ffprobe_tags(path: str) -> dict[str, str]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format_tags", "-of", "json", path],
                         capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    return {k.lower(): v for k, v in json.loads(out.stdout).get("format", {}).get("tags", {}).items()}


def test_video_output_is_labelled_and_the_watermark_is_visible(
    farm: Farm, alice_job: str, record: Recorder
) -> None:
    output = farm.output_path(alice_job)
    tags = _ffprobe_tags(output)
    assert farm.settings.synthetic_label in (tags.get("comment"), tags.get("description")), tags
    capture = cv2.VideoCapture(output)
    ok, frame = capture.read()
    capture.release()
    assert ok
    from worker.frames.watermark import watermark_box

    h, w = frame.shape[:2]
    x0, y0, x1, y1, _, _ = watermark_box(w, h)
    box = cv2.cvtColor(frame[y0:y1, x0:x1], cv2.COLOR_BGR2GRAY)
    dark, bright = (box < 50).mean(), (box > 150).mean()
    assert dark > 0.5 and bright > 0.03, (dark, bright)  # a black box with white text in the corner
    record(
        "safety", "video output metadata carries the synthetic-media label", "present (comment, description)"
    )
    record("safety", "--watermark burns a visible AI-GENERATED box into every frame", "visible in the output")


def _png_text_chunks(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"tEXt":
            key, _, value = data[pos + 8 : pos + 8 + length].partition(b"\x00")
            chunks[key.decode()] = value.decode("latin-1")
        pos += 12 + length
    return chunks


def test_swap_image_output_is_labelled(
    farm: Farm, face_image: Path, tmp_path: Path, record: Recorder
) -> None:
    import insightface

    target = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    out = tmp_path / "swapped.png"
    env = {**os.environ, **farm.env}
    result = subprocess.run(
        [sys.executable, "-m", "facefarm", "swap-image", "--face", str(face_image), str(target), "-o", str(out),
         "--swapper", "classic", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[3],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert farm.settings.synthetic_label in _png_text_chunks(out).values()
    record("safety", "swap-image output carries the synthetic-media label", "present (PNG tEXt Comment)")


def test_audit_record_is_complete_and_exportable(
    farm: Farm, alice_job: str, videos: Path, face_image: Path, tmp_path: Path, record: Recorder
) -> None:
    with farm.client() as client:
        audit = client.audit(alice_job)
        downloaded = client.download(alice_job, tmp_path / "out.mp4")
    assert audit["owner"] == "alice" and audit["job_id"] == alice_job
    assert audit["input_sha256"]["video"] == hashlib.sha256((videos / "base15.mp4").read_bytes()).hexdigest()
    assert audit["input_sha256"]["face"] == hashlib.sha256(face_image.read_bytes()).hexdigest()
    assert audit["output_sha256"] == hashlib.sha256(Path(downloaded).read_bytes()).hexdigest()
    assert JobOptions.model_validate(audit["options"]).watermark is True
    assert audit["created_at"] <= audit["finished_at"] and audit["status"] == "COMPLETED"
    assert audit["label"] == farm.settings.synthetic_label
    cli = subprocess.run(
        [sys.executable, "-m", "facefarm", "audit", alice_job, "--json", "--api", farm.api_url, "--token", TOKENS["alice"]],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[3],
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == audit
    record(
        "safety",
        "audit record: owner, input sha256s, options, times, output sha256",
        "complete; GET /jobs/ID/audit = facefarm audit",
    )


def test_watermark_is_deterministic_and_only_touches_its_corner() -> None:
    from worker.frames.watermark import apply_watermark, watermark_box

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(3, 96, 160, 3), dtype=np.uint8)
    first, second = apply_watermark(frames), apply_watermark(frames)
    assert np.array_equal(first, second)
    x0, y0, x1, y1, _, _ = watermark_box(160, 96)
    changed = np.argwhere((first != frames).any(axis=(0, -1)))
    assert changed[:, 0].min() >= y0 and changed[:, 1].min() >= x0
    assert changed[:, 0].max() < y1 and changed[:, 1].max() < x1
