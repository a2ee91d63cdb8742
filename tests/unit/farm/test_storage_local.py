"""LocalStorage: atomic writes, confinement to the root and the configured read roots."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from shared.errors import LimitExceededError, StorageAccessError
from shared.settings import Settings
from shared.storage import LocalStorage, create_storage, validate_key


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    root, inputs, outside = tmp_path / "storage", tmp_path / "inputs", tmp_path / "outside"
    for d in (root, inputs, outside):
        d.mkdir()
    return root, inputs, outside


def test_put_and_read_back_with_digest(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, inputs, _ = roots
    storage = LocalStorage(root, [inputs])
    src = tmp_path / "src.bin"
    src.write_bytes(b"0123456789")
    stored = storage.put_file("jobs/j1/input/video.mp4", src)
    assert stored.uri == (root / "jobs/j1/input/video.mp4").as_uri() and stored.size_bytes == 10
    assert stored.sha256 == "84d89877f0d4041efb6bf91a16f0248f2fd573e6af05c19f96bedb9f882f7882"
    assert storage.exists(stored.uri) and storage.exists("jobs/j1/input/video.mp4")
    assert storage.size(stored.uri) == 10
    assert storage.open_range(stored.uri, 2, 5) == b"2345"
    assert storage.local_path_or_url(stored.uri) == str(root / "jobs/j1/input/video.mp4")
    copy = storage.get_to_path(stored.uri, tmp_path / "copy" / "v.mp4")
    assert copy.read_bytes() == b"0123456789"
    assert not list(root.rglob("*.tmp"))  # no temp files left behind


def test_stream_upload_over_the_limit_leaves_nothing(roots: tuple[Path, Path, Path]) -> None:
    storage = LocalStorage(roots[0])
    with pytest.raises(LimitExceededError, match="exceeds the limit of 100 bytes"):
        storage.put_stream("jobs/j1/input/video.mp4", io.BytesIO(b"x" * 5000), max_bytes=100)
    assert not storage.exists("jobs/j1/input/video.mp4")
    assert not [p for p in roots[0].rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    "key",
    [
        "../etc/passwd",
        "jobs/../../x",
        "/abs/key",
        "jobs//x",
        "jobs/./x",
        "jobs/x/",
        "",
        "jobs/a b",
        "jobs/\x00",
    ],
)
def test_keys_that_could_escape_are_refused(key: str) -> None:
    with pytest.raises(StorageAccessError):
        validate_key(key)


def test_uris_outside_the_roots_are_refused(roots: tuple[Path, Path, Path]) -> None:
    root, inputs, outside = roots
    (outside / "secret.mp4").write_bytes(b"s")
    (inputs / "ok.mp4").write_bytes(b"ok")
    storage = LocalStorage(root, [inputs])
    assert storage.local_path_or_url((inputs / "ok.mp4").as_uri()) == str(inputs / "ok.mp4")
    for uri in [
        (outside / "secret.mp4").as_uri(),
        (inputs / ".." / "outside" / "secret.mp4").as_uri(),
        f"file://{inputs}/%2e%2e/outside/secret.mp4",
        "file://evil.example/etc/passwd",
        "s3://bucket/key",
    ]:
        with pytest.raises(StorageAccessError):
            storage.local_path_or_url(uri)


def test_symlink_escapes_are_refused_for_reads_and_writes(
    roots: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, inputs, outside = roots
    (outside / "secret.mp4").write_bytes(b"s")
    os.symlink(outside / "secret.mp4", inputs / "link.mp4")
    os.symlink(outside, root / "jobs")
    storage = LocalStorage(root, [inputs])
    with pytest.raises(StorageAccessError, match="outside the allowed roots"):
        storage.local_path_or_url((inputs / "link.mp4").as_uri())
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StorageAccessError, match="symlink escape"):
        storage.put_file("jobs/j1/output.mp4", src)
    assert not (outside / "j1").exists()


def test_adopt_uses_inputs_in_place_and_copies_nothing(roots: tuple[Path, Path, Path]) -> None:
    root, inputs, _ = roots
    (inputs / "clip.mp4").write_bytes(b"video")
    storage = LocalStorage(root, [inputs])
    stored = storage.adopt((inputs / "clip.mp4").as_uri(), "jobs/j/input/video.mp4")
    assert stored.uri == (inputs / "clip.mp4").as_uri() and stored.size_bytes == 5
    assert not (root / "jobs").exists()


def test_delete_prefix_and_expire(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    storage = LocalStorage(roots[0])
    src = tmp_path / "f"
    src.write_bytes(b"x")
    for key in ["jobs/a/input/v.mp4", "jobs/a/chunks/00000/output.mp4", "jobs/b/input/v.mp4"]:
        storage.put_file(key, src)
    old = time.time() - 1000
    os.utime(roots[0] / "jobs/b/input/v.mp4", (old, old))
    assert storage.expire("jobs/", older_than_s=500) == 1
    assert not storage.exists("jobs/b/input/v.mp4") and storage.exists("jobs/a/input/v.mp4")
    assert storage.delete_prefix("jobs/a/") == 2
    assert not storage.exists("jobs/a/input/v.mp4")
    with pytest.raises(StorageAccessError):
        storage.delete_prefix("jobs/a")  # a prefix must end with '/'


def test_create_storage_reads_the_url(tmp_path: Path) -> None:
    storage = create_storage(Settings(storage_url=(tmp_path / "s").as_uri(), file_roots=[tmp_path / "in"]))
    assert isinstance(storage, LocalStorage) and storage.root == (tmp_path / "s").resolve()
    with pytest.raises(StorageAccessError, match="must start with"):
        create_storage(Settings(storage_url="ftp://host/x"))
