"""S3Storage against moto's real HTTP server: uploads, presigned range reads, deletes, confinement."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from shared.errors import LimitExceededError, StorageAccessError
from shared.storage import S3Storage
from tests.integration.farm.services import S3_TEST_ENV, moto_s3_server


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    saved = {k: os.environ.get(k) for k in S3_TEST_ENV}
    os.environ.update(S3_TEST_ENV)
    try:
        with moto_s3_server() as url:
            boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="unit-bucket")
            yield url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def storage(endpoint: str, tmp_path: Path) -> S3Storage:
    (tmp_path / "inputs").mkdir()
    return S3Storage(
        "unit-bucket", f"p-{tmp_path.name}", endpoint_url=endpoint, extra_roots=[tmp_path / "inputs"]
    )


def test_put_file_then_presigned_url_serves_byte_ranges(storage: S3Storage, tmp_path: Path) -> None:
    src = tmp_path / "v.bin"
    src.write_bytes(bytes(range(256)) * 40)
    stored = storage.put_file("jobs/j1/input/video.mp4", src)
    assert stored.uri == f"s3://unit-bucket/{storage.prefix}jobs/j1/input/video.mp4"
    assert storage.exists(stored.uri) and storage.size(stored.uri) == 10240
    assert storage.sha256(stored.uri) == stored.sha256
    url = storage.local_path_or_url(stored.uri)
    response = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert response.status_code == 206 and response.content == (bytes(range(256)) * 40)[100:200]
    assert storage.open_range(stored.uri, 0, 3) == b"\x00\x01\x02\x03"
    out = storage.get_to_path(stored.uri, tmp_path / "dl" / "v.bin")
    assert out.read_bytes() == src.read_bytes()


def test_multipart_upload_of_a_large_file(
    storage: S3Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shared.storage as module

    monkeypatch.setattr(module, "MULTIPART_THRESHOLD_BYTES", 5 * 1024 * 1024)
    monkeypatch.setattr(module, "MULTIPART_CHUNK_BYTES", 5 * 1024 * 1024)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * 1024 * 1024))
    stored = storage.put_file("jobs/j1/output.mp4", src)
    assert storage.size(stored.uri) == src.stat().st_size
    assert storage.sha256(stored.uri) == stored.sha256


def test_stream_upload_is_capped(storage: S3Storage) -> None:
    with pytest.raises(LimitExceededError):
        storage.put_stream("jobs/j2/input/video.mp4", io.BytesIO(b"x" * 4096), max_bytes=1000)
    assert not storage.exists("jobs/j2/input/video.mp4")
    stored = storage.put_stream("jobs/j2/input/face.png", io.BytesIO(b"png"), max_bytes=1000)
    assert stored.size_bytes == 3 and storage.open_range(stored.uri, 0, 2) == b"png"


def test_delete_prefix_and_missing_objects(storage: S3Storage, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    for i in range(3):
        storage.put_file(f"jobs/j3/chunks/{i:05d}/output.mp4", src)
    storage.put_file("jobs/j4/output.mp4", src)
    assert storage.delete_prefix("jobs/j3/") == 3
    assert not storage.exists("jobs/j3/chunks/00000/output.mp4") and storage.exists("jobs/j4/output.mp4")
    assert storage.expire("jobs/", older_than_s=3600) == 0
    assert storage.expire("jobs/", older_than_s=-60) == 1
    with pytest.raises(StorageAccessError, match="does not exist"):
        storage.get_to_path("jobs/nope/x.mp4", tmp_path / "x")


def test_other_buckets_and_bad_keys_are_refused(storage: S3Storage, tmp_path: Path) -> None:
    for uri in ["s3://other-bucket/jobs/x.mp4", "s3://unit-bucket/../x", "https://example.com/x.mp4"]:
        with pytest.raises(StorageAccessError):
            storage.local_path_or_url(uri)
    with pytest.raises(StorageAccessError):
        storage.put_file("../escape", tmp_path)


def test_adopt_uploads_local_inputs_from_allowed_roots_only(storage: S3Storage, tmp_path: Path) -> None:
    (tmp_path / "inputs" / "clip.mp4").write_bytes(b"clip")
    stored = storage.adopt((tmp_path / "inputs" / "clip.mp4").as_uri(), "jobs/j5/input/video.mp4")
    assert stored.uri.startswith("s3://unit-bucket/") and storage.open_range(stored.uri, 0, 3) == b"clip"
    (tmp_path / "secret.mp4").write_bytes(b"s")
    with pytest.raises(StorageAccessError, match="outside the allowed roots"):
        storage.adopt((tmp_path / "secret.mp4").as_uri(), "jobs/j5/input/x.mp4")
