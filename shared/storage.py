"""Where inputs, chunk outputs and results live: a local directory or an S3 bucket prefix.

Keys are relative (``jobs/{id}/chunks/00003/output.mp4``, see ``shared.names``); URIs are
``file:///abs/path`` (confined to the storage root plus ``settings.file_roots``; ``..`` and symlink
escapes are refused) or ``s3://bucket/key`` (confined to the configured bucket). Every write is
atomic: a local temp file renamed into place, or one S3 PutObject / CompleteMultipartUpload (S3 never
shows a partial object). Workers get ``local_path_or_url``: a path, or a presigned GET URL that
supports HTTP range reads, so the decoder seeks without downloading the whole video.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

from shared.errors import LimitExceededError, StorageAccessError, StorageUnavailableError
from shared.settings import Settings

COPY_BLOCK_BYTES = 1024 * 1024
MULTIPART_THRESHOLD_BYTES = 64 * 1024 * 1024
MULTIPART_CHUNK_BYTES = 16 * 1024 * 1024
MAX_KEY_CHARS = 900
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9._\-+=@,]+$")


@dataclass(frozen=True)
class StoredObject:
    """What a put wrote: where, how big, and its digest (kept in the job's audit record)."""

    uri: str
    size_bytes: int
    sha256: str


def validate_key(key: str) -> str:
    """Refuse keys that could escape a prefix or confuse a filesystem: ``..``, absolute, odd characters."""
    if not key or len(key) > MAX_KEY_CHARS or key.startswith("/") or key.endswith("/"):
        raise StorageAccessError(
            f"invalid storage key {key!r}: use a relative path like jobs/ID/input/video.mp4"
        )
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _KEY_SEGMENT.match(segment):
            raise StorageAccessError(
                f"invalid storage key {key!r}: segment {segment!r} is empty, '.', '..' or has characters "
                "outside A-Z a-z 0-9 . _ - + = @ ,"
            )
    return key


def validate_prefix(prefix: str) -> str:
    """A prefix is a key that ends with ``/`` (``jobs/ID/``)."""
    if not prefix.endswith("/"):
        raise StorageAccessError(f"invalid storage prefix {prefix!r}: it must end with '/'")
    validate_key(prefix.rstrip("/"))
    return prefix


class _HashingReader:
    """Wraps a stream: counts and hashes what is read, and stops at ``max_bytes``."""

    def __init__(self, fileobj: BinaryIO, max_bytes: int | None, key: str) -> None:
        self._f = fileobj
        self._max = max_bytes
        self._key = key
        self.size_bytes = 0
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size if size is not None and size >= 0 else COPY_BLOCK_BYTES * 8)
        self.size_bytes += len(data)
        if self._max is not None and self.size_bytes > self._max:
            raise LimitExceededError(
                f"upload for {self._key} exceeds the limit of {self._max} bytes (FACEFARM_MAX_UPLOAD_BYTES)",
                limit_bytes=self._max,
            )
        self.digest.update(data)
        return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(COPY_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _within(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _file_uri_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
        raise StorageAccessError(f"not a local file URI: {uri!r}; use file:///absolute/path")
    path = Path(unquote(parsed.path))
    if not path.is_absolute():
        raise StorageAccessError(f"file URI must hold an absolute path: {uri!r}")
    return path


class Storage(ABC):
    """Common API; keys are relative, URIs absolute. Read methods take a key or a URI."""

    def __init__(self, read_roots: Sequence[Path] = ()) -> None:
        self._read_roots = [Path(r).resolve() for r in read_roots]

    # --- naming -------------------------------------------------------------------------------

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """The URI of ``key`` in this storage."""

    @abstractmethod
    def owns(self, uri: str) -> bool:
        """True if ``uri`` is inside this storage (so workers can read it)."""

    # --- writes ---------------------------------------------------------------------------------

    @abstractmethod
    def put_file(self, key: str, path: Path) -> StoredObject:
        """Upload ``path`` to ``key`` atomically."""

    @abstractmethod
    def put_stream(self, key: str, fileobj: BinaryIO, *, max_bytes: int | None = None) -> StoredObject:
        """Store a stream atomically, refusing more than ``max_bytes``."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under ``prefix`` (``jobs/ID/``); returns how many objects went."""

    @abstractmethod
    def expire(self, prefix: str, older_than_s: float, *, now: float | None = None) -> int:
        """Delete objects under ``prefix`` last modified more than ``older_than_s`` ago."""

    # --- reads ----------------------------------------------------------------------------------

    @abstractmethod
    def get_to_path(self, key_or_uri: str, path: Path) -> Path:
        """Copy an object to a local file (written atomically)."""

    @abstractmethod
    def local_path_or_url(self, key_or_uri: str) -> str:
        """What a worker hands its decoder: a local path or a presigned URL with range support."""

    @abstractmethod
    def exists(self, key_or_uri: str) -> bool: ...

    @abstractmethod
    def size(self, key_or_uri: str) -> int: ...

    @abstractmethod
    def open_range(self, key_or_uri: str, start: int, end: int) -> bytes:
        """Bytes ``start``..``end`` inclusive, as an HTTP Range request would return them."""

    @abstractmethod
    def sha256(self, key_or_uri: str) -> str: ...

    # --- inputs from outside the storage --------------------------------------------------------

    def confined_input_path(self, uri: str) -> Path:
        """Resolve a ``file://`` URI that must lie under one of the configured read roots."""
        resolved = _file_uri_path(uri).resolve()
        if not _within(resolved, self._read_roots):
            roots = ", ".join(str(r) for r in self._read_roots) or "(none configured)"
            raise StorageAccessError(
                f"{uri} is outside the allowed roots ({roots}); add its directory to FACEFARM_FILE_ROOTS",
                uri=uri,
            )
        return resolved

    def local_input_path(self, uri: str) -> Path:
        """Like ``confined_input_path``, and the file must exist."""
        resolved = self.confined_input_path(uri)
        if not resolved.is_file():
            raise StorageAccessError(f"{uri} does not exist or is not a regular file", uri=uri)
        return resolved

    def adopt(self, uri: str, key: str) -> StoredObject:
        """Make an existing input available to workers: keep it if this storage holds it, else copy it in."""
        if self.owns(uri):
            return StoredObject(uri=uri, size_bytes=self.size(uri), sha256=self.sha256(uri))
        if uri.startswith("file:"):
            return self.put_file(key, self.local_input_path(uri))
        raise StorageAccessError(
            f"cannot read {uri!r}: use a file:// URI within the allowed roots or {self.uri_for('')}"
        )


class LocalStorage(Storage):
    """A directory tree; URIs are ``file://`` and confined to ``root`` (writes) plus ``extra_roots`` (reads)."""

    def __init__(self, root: Path, extra_roots: Sequence[Path] = ()) -> None:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        super().__init__([self.root, *extra_roots])

    def adopt(self, uri: str, key: str) -> StoredObject:
        """``file://`` inputs under the read roots are used in place: workers share this filesystem."""
        if uri.startswith("file:"):
            path = self.local_input_path(uri)
            return StoredObject(uri=path.as_uri(), size_bytes=path.stat().st_size, sha256=sha256_file(path))
        return super().adopt(uri, key)

    def uri_for(self, key: str) -> str:
        if key == "":
            return self.root.as_uri() + "/"
        return self._key_path(key).as_uri()

    def owns(self, uri: str) -> bool:
        try:
            path = _file_uri_path(uri).resolve()
        except StorageAccessError:
            return False
        return _within(path, [self.root])

    def _key_path(self, key: str) -> Path:
        path = self.root / validate_key(key)
        resolved = path.resolve()
        if not _within(resolved, [self.root]):
            raise StorageAccessError(f"storage key {key!r} resolves outside {self.root} (symlink escape)")
        return path

    def _resolve(self, key_or_uri: str) -> Path:
        """Confine a key or URI to the roots without requiring it to exist."""
        if "://" in key_or_uri or key_or_uri.startswith("file:"):
            return self.confined_input_path(key_or_uri)
        return self._key_path(key_or_uri).resolve()

    def _read_path(self, key_or_uri: str) -> Path:
        path = self._resolve(key_or_uri)
        if not path.is_file():
            raise StorageAccessError(f"{key_or_uri} does not exist in storage", uri=key_or_uri)
        return path

    def _temp_for(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not _within(path.parent.resolve(), [self.root]):
            raise StorageAccessError(f"{path.parent} resolves outside {self.root} (symlink escape)")
        return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")

    def put_file(self, key: str, path: Path) -> StoredObject:
        target = self._key_path(key)
        temp = self._temp_for(target)
        try:
            shutil.copyfile(path, temp)
            os.replace(temp, target)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise StorageUnavailableError(f"could not write {target}: {exc}") from exc
        return StoredObject(uri=target.as_uri(), size_bytes=target.stat().st_size, sha256=sha256_file(target))

    def put_stream(self, key: str, fileobj: BinaryIO, *, max_bytes: int | None = None) -> StoredObject:
        target = self._key_path(key)
        temp = self._temp_for(target)
        reader = _HashingReader(fileobj, max_bytes, key)
        try:
            with temp.open("wb") as out:
                for block in iter(lambda: reader.read(COPY_BLOCK_BYTES), b""):
                    out.write(block)
            os.replace(temp, target)
        except OSError as exc:
            raise StorageUnavailableError(f"could not write {target}: {exc}") from exc
        finally:
            temp.unlink(missing_ok=True)
        return StoredObject(
            uri=target.as_uri(), size_bytes=reader.size_bytes, sha256=reader.digest.hexdigest()
        )

    def delete_prefix(self, prefix: str) -> int:
        directory = self._key_path(validate_prefix(prefix).rstrip("/"))
        if not directory.is_dir():
            return 0
        count = sum(1 for p in directory.rglob("*") if p.is_file())
        shutil.rmtree(directory, ignore_errors=True)
        return count

    def expire(self, prefix: str, older_than_s: float, *, now: float | None = None) -> int:
        directory = self._key_path(validate_prefix(prefix).rstrip("/"))
        cutoff = (time.time() if now is None else now) - older_than_s
        count = 0
        if not directory.is_dir():
            return 0
        for path in sorted(directory.rglob("*"), reverse=True):
            if path.is_symlink() or path.is_file():
                if path.lstat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    count += 1
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        return count

    def get_to_path(self, key_or_uri: str, path: Path) -> Path:
        source = self._read_path(key_or_uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        shutil.copyfile(source, temp)
        os.replace(temp, path)
        return path

    def local_path_or_url(self, key_or_uri: str) -> str:
        return str(self._read_path(key_or_uri))

    def exists(self, key_or_uri: str) -> bool:
        return self._resolve(key_or_uri).is_file()

    def size(self, key_or_uri: str) -> int:
        return self._read_path(key_or_uri).stat().st_size

    def open_range(self, key_or_uri: str, start: int, end: int) -> bytes:
        with self._read_path(key_or_uri).open("rb") as f:
            f.seek(start)
            return f.read(max(end - start + 1, 0))

    def sha256(self, key_or_uri: str) -> str:
        return sha256_file(self._read_path(key_or_uri))


class S3Storage(Storage):
    """A bucket prefix through boto3: multipart uploads, retries, presigned range-readable URLs."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        presign_expiry_s: int = 6 * 3600,
        extra_roots: Sequence[Path] = (),
        client: Any = None,
    ) -> None:
        super().__init__(extra_roots)
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
            raise StorageAccessError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = validate_prefix(prefix.strip("/") + "/") if prefix.strip("/") else ""
        self.presign_expiry_s = presign_expiry_s
        self._client = client or _create_s3_client(endpoint_url, region)

    # --- naming -------------------------------------------------------------------------------

    def _full_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def uri_for(self, key: str) -> str:
        if key == "":
            return f"s3://{self.bucket}/{self.prefix}"
        return f"s3://{self.bucket}/{self._full_key(key)}"

    def owns(self, uri: str) -> bool:
        parsed = urlparse(uri)
        return parsed.scheme == "s3" and parsed.netloc == self.bucket

    def _object_key(self, key_or_uri: str) -> str:
        if "://" not in key_or_uri:
            return self._full_key(key_or_uri)
        parsed = urlparse(key_or_uri)
        if parsed.scheme != "s3" or parsed.netloc != self.bucket:
            raise StorageAccessError(f"{key_or_uri} is not in the bucket s3://{self.bucket}", uri=key_or_uri)
        return validate_key(unquote(parsed.path.lstrip("/")))

    # --- writes ---------------------------------------------------------------------------------

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD_BYTES,
            multipart_chunksize=MULTIPART_CHUNK_BYTES,
            use_threads=True,
            max_concurrency=4,
        )

    def put_file(self, key: str, path: Path) -> StoredObject:
        full = self._full_key(key)
        digest = sha256_file(path)
        with _s3_errors(full):
            self._client.upload_file(
                str(path),
                self.bucket,
                full,
                ExtraArgs={"Metadata": {"sha256": digest}},
                Config=self._transfer_config(),
            )
        return StoredObject(uri=self.uri_for(key), size_bytes=path.stat().st_size, sha256=digest)

    def put_stream(self, key: str, fileobj: BinaryIO, *, max_bytes: int | None = None) -> StoredObject:
        full = self._full_key(key)
        reader = _HashingReader(fileobj, max_bytes, key)
        with _s3_errors(full):
            self._client.upload_fileobj(reader, self.bucket, full, Config=self._transfer_config())
        return StoredObject(
            uri=self.uri_for(key), size_bytes=reader.size_bytes, sha256=reader.digest.hexdigest()
        )

    def _list(self, prefix: str) -> list[dict[str, Any]]:
        full = self.prefix + validate_prefix(prefix)
        objects: list[dict[str, Any]] = []
        with _s3_errors(full):
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                objects.extend(page.get("Contents", []))
        return objects

    def _delete(self, keys: list[str]) -> int:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            with _s3_errors(keys[start]):
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def delete_prefix(self, prefix: str) -> int:
        return self._delete([o["Key"] for o in self._list(prefix)])

    def expire(self, prefix: str, older_than_s: float, *, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - older_than_s
        return self._delete([o["Key"] for o in self._list(prefix) if o["LastModified"].timestamp() < cutoff])

    # --- reads ----------------------------------------------------------------------------------

    def get_to_path(self, key_or_uri: str, path: Path) -> Path:
        full = self._object_key(key_or_uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with _s3_errors(full):
                self._client.download_file(self.bucket, full, str(temp), Config=self._transfer_config())
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        return path

    def local_path_or_url(self, key_or_uri: str) -> str:
        full = self._object_key(key_or_uri)
        with _s3_errors(full):
            return str(
                self._client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": full},
                    ExpiresIn=self.presign_expiry_s,
                )
            )

    def exists(self, key_or_uri: str) -> bool:
        full = self._object_key(key_or_uri)
        try:
            with _s3_errors(full):
                self._client.head_object(Bucket=self.bucket, Key=full)
        except StorageAccessError:
            return False
        return True

    def size(self, key_or_uri: str) -> int:
        full = self._object_key(key_or_uri)
        with _s3_errors(full):
            return int(self._client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])

    def open_range(self, key_or_uri: str, start: int, end: int) -> bytes:
        full = self._object_key(key_or_uri)
        with _s3_errors(full):
            response = self._client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={start}-{end}")
            return bytes(response["Body"].read())

    def sha256(self, key_or_uri: str) -> str:
        full = self._object_key(key_or_uri)
        with _s3_errors(full):
            head = self._client.head_object(Bucket=self.bucket, Key=full)
            stored = head.get("Metadata", {}).get("sha256")
            if stored:
                return str(stored)
            digest = hashlib.sha256()
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
            for block in body.iter_chunks(COPY_BLOCK_BYTES):
                digest.update(block)
        return digest.hexdigest()


class _s3_errors:
    """Translate botocore failures at the boundary: missing/forbidden → permanent, the rest → retryable."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            return
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket") or status == 404:
                raise StorageAccessError(f"S3 object {self.key!r} does not exist", key=self.key) from exc
            if (
                code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
                or status == 403
            ):
                raise StorageAccessError(
                    f"S3 refused access to {self.key!r} ({code}); check the bucket policy and credentials",
                    key=self.key,
                ) from exc
            raise StorageUnavailableError(
                f"S3 request for {self.key!r} failed: {code or exc}", key=self.key
            ) from exc
        if isinstance(exc, BotoCoreError | S3UploadFailedError):
            raise StorageUnavailableError(
                f"S3 is not reachable for {self.key!r}: {exc}", key=self.key
            ) from exc


def _create_s3_client(endpoint_url: str | None, region: str) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def create_storage(settings: Settings) -> Storage:
    """The storage named by ``settings.storage_url`` (``file:///dir`` or ``s3://bucket/prefix``)."""
    url = settings.storage_url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(_file_uri_path(url), extra_roots=settings.file_roots)
    if parsed.scheme == "s3":
        return S3Storage(
            parsed.netloc,
            unquote(parsed.path),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            presign_expiry_s=settings.presign_expiry_s,
            extra_roots=settings.file_roots,
        )
    raise StorageAccessError(f"FACEFARM_STORAGE_URL {url!r} must start with file:/// or s3://")


def ext_of(name: str, default: str = "bin") -> str:
    """A safe lower-case extension from a user's file name (``clip.MP4`` → ``mp4``)."""
    suffix = Path(name).suffix.lower().lstrip(".")
    return suffix if re.fullmatch(r"[a-z0-9]{1,8}", suffix) else default


__all__ = [
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StoredObject",
    "create_storage",
    "ext_of",
    "validate_key",
]
