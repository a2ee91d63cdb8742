"""FarmClient: the Python face of the HTTP API (submit, watch, download), sync and small.

HTTP failures become the project's own errors once, here: the server's body names the error class
(``{"error": ..., "kind": ...}``) and :func:`shared.errors.error_from_kind` rebuilds it, so callers
branch on classes, never on status codes or message text. Tests inject ``transport=``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO

import httpx

from shared.errors import (
    ApiUnavailableError,
    AuthError,
    BadInputError,
    FaceFarmError,
    JobCancelledError,
    NotFoundError,
    error_from_kind,
)
from shared.schemas import JobOptions, JobStatus, JobView

URI_SCHEMES = ("file://", "s3://")
DOWNLOAD_CHUNK_BYTES = 1 << 20

Source = str | os.PathLike[str] | BinaryIO


def is_uri(value: object) -> bool:
    """True for a storage URI the API opens itself (sent as JSON, not uploaded)."""
    return isinstance(value, str) and value.startswith(URI_SCHEMES)


def error_from_response(response: httpx.Response) -> FaceFarmError:
    """The project error an HTTP error response stands for."""
    message, kind = _read_error_body(response)
    if response.status_code == 401:
        return AuthError(message or "invalid or missing API token")
    if response.status_code == 404 and kind in (None, "FaceFarmError"):
        return NotFoundError(message or f"not found: {response.request.url.path}")
    if kind:
        return error_from_kind(kind, message)
    return FaceFarmError(f"API error {response.status_code}: {message}")


def _read_error_body(response: httpx.Response) -> tuple[str, str | None]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return (response.text.strip().splitlines() or [response.reason_phrase])[0], None
    if isinstance(body, dict) and "error" in body:
        kind = body.get("kind")
        return str(body["error"]), str(kind) if kind else None
    return str(body), None


class RedactPresignedUrls(logging.Filter):
    """Drop the query of presigned URLs from httpx's request log: it is a download credential.

    Downloads follow the API's redirect to a presigned S3 URL, whose query carries the access key
    id and a signature valid for hours; httpx logs every request URL at INFO.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(a) for a in record.args)
        return True


def _redacted(value: object) -> object:
    text = str(value) if isinstance(value, httpx.URL | str) else None
    if text is None or "X-Amz-" not in text:
        return value
    return text.split("?", 1)[0] + "?<presigned query redacted>"


def install_presigned_url_redaction() -> None:
    """Attach ``RedactPresignedUrls`` to httpx's logger once (idempotent)."""
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, RedactPresignedUrls) for f in logger.filters):
        logger.addFilter(RedactPresignedUrls())


class FarmClient:
    """A FaceFarm API client bound to one URL and one token."""

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {token}"},
            transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            follow_redirects=True,
        )
        install_presigned_url_redaction()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FarmClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- requests --------------------------------------------------------------------------

    @contextmanager
    def _translate_transport_errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException as exc:
            raise ApiUnavailableError(
                f"FaceFarm API at {self.api_url} did not answer in time ({type(exc).__name__}); retry later",
                api_url=self.api_url,
            ) from exc
        except httpx.TransportError as exc:
            raise ApiUnavailableError(
                f"cannot reach the FaceFarm API at {self.api_url} ({exc}); is `facefarm api` running?",
                api_url=self.api_url,
            ) from exc

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._translate_transport_errors():
            response = self._http.request(method, path, **kwargs)
        if response.is_error:
            raise error_from_response(response)
        return response

    # --- jobs ------------------------------------------------------------------------------

    def submit(
        self,
        video: Source,
        face: Source,
        options: JobOptions | Mapping[str, Any] | None = None,
        reference: Source | None = None,
    ) -> str:
        """Upload (or name by URI) the inputs and start a job; returns its id at once."""
        opts = options if isinstance(options, JobOptions) else JobOptions.model_validate(options or {})
        options_json = opts.model_dump(mode="json")
        sources = {"video": video, "face": face, "reference": reference}
        if all(is_uri(v) for v in sources.values() if v is not None):
            body = {f"{k}_uri": v for k, v in sources.items() if v is not None}
            response = self._request("POST", "/jobs", json={**body, "options": options_json})
        else:
            with ExitStack() as stack:
                files = {
                    name: _upload_part(stack, source)
                    for name, source in sources.items()
                    if source is not None
                }
                response = self._request(
                    "POST", "/jobs", files=files, data={"options": json.dumps(options_json)}
                )
        return str(response.json()["job_id"])

    def status(self, job_id: str) -> JobView:
        return JobView.model_validate(self._request("GET", f"/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> JobView:
        return JobView.model_validate(self._request("POST", f"/jobs/{job_id}/cancel").json())

    def retry(self, job_id: str) -> JobView:
        return JobView.model_validate(self._request("POST", f"/jobs/{job_id}/retry").json())

    def logs(self, job_id: str) -> list[str]:
        return [str(line) for line in self._request("GET", f"/jobs/{job_id}/logs").json()]

    def audit(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/jobs/{job_id}/audit").json())

    def wait(
        self,
        job_id: str,
        *,
        progress: Callable[[JobView], None] | None = None,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
    ) -> JobView:
        """Poll until the job finishes; returns it when COMPLETED, raises its error otherwise.

        A FAILED job raises the error class the farm recorded (e.g. ``NoFaceError``);
        a CANCELLED job raises ``JobCancelledError``; running past ``timeout_s`` raises TimeoutError.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            view = self.status(job_id)
            if progress is not None:
                progress(view)
            if view.status is JobStatus.COMPLETED:
                return view
            if view.status is JobStatus.FAILED:
                raise error_from_kind(
                    view.error_kind or "FaceFarmError", view.error or f"job {job_id} failed"
                )
            if view.status is JobStatus.CANCELLED:
                raise JobCancelledError(f"job {job_id} was cancelled", job_id=job_id)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {view.status} after {timeout_s:g} s")
            time.sleep(poll_s)

    def download(self, job_id: str, path: str | os.PathLike[str]) -> Path:
        """Write the job's output to ``path`` (atomically: a ``.part`` file renamed at the end)."""
        target = Path(path)
        partial = target.with_name(target.name + ".part")
        try:
            with self._translate_transport_errors():
                with self._http.stream("GET", f"/jobs/{job_id}/output") as response:
                    if response.is_error:
                        response.read()
                        raise error_from_response(response)
                    with partial.open("wb") as out:
                        for block in response.iter_bytes(DOWNLOAD_CHUNK_BYTES):
                            out.write(block)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    # Last in the class: below this line ``list`` names the method, not the builtin.
    def list(self) -> list[JobView]:
        """The caller's jobs, newest first."""
        return [JobView.model_validate(j) for j in self._request("GET", "/jobs").json()]


def _upload_part(stack: ExitStack, source: Source) -> tuple[str, IO[bytes]]:
    """A multipart file tuple: local paths are opened (and closed by ``stack``)."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            handle = stack.enter_context(path.open("rb"))
        except OSError as exc:
            raise BadInputError(f"cannot read {path}: {exc.strerror or exc}", path=str(path)) from exc
        return path.name, handle
    name = Path(str(getattr(source, "name", "upload"))).name
    return name, source
