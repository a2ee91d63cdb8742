"""One place that turns FaceFarm errors into HTTP responses: status code plus a small JSON body.

The body is ``{"error": message, "kind": ClassName}``; the client rebuilds the same error class
from ``kind`` with ``shared.errors.error_from_kind``, so nobody parses message text.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import (
    AuthError,
    BadInputError,
    ConfigError,
    FaceFarmError,
    JobCancelledError,
    LimitExceededError,
    NotFoundError,
    PermanentError,
    RetryableError,
    StorageAccessError,
    UnknownModelError,
)

# Most specific class first: the first isinstance match wins.
STATUS_BY_ERROR: tuple[tuple[type[FaceFarmError], int], ...] = (
    (AuthError, 401),
    (NotFoundError, 404),
    (LimitExceededError, 413),
    (BadInputError, 422),
    (UnknownModelError, 422),
    (StorageAccessError, 403),
    (ConfigError, 500),
    (JobCancelledError, 409),
    (PermanentError, 409),
    (RetryableError, 503),
)
RETRY_AFTER_S = 5


def status_for(error: FaceFarmError) -> int:
    """The HTTP status for a FaceFarm error (500 for anything unlisted)."""
    for cls, status in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return status
    return 500


def error_body(message: str, kind: str) -> dict[str, str]:
    return {"error": message, "kind": kind}


def error_response(error: FaceFarmError) -> JSONResponse:
    status = status_for(error)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(error, RetryableError):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return JSONResponse(error_body(error.message, error.kind), status_code=status, headers=headers)


async def _on_farm_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FaceFarmError)
    return error_response(exc)


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(error_body(describe_validation(exc.errors()), "BadInputError"), status_code=422)


async def _on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = "NotFoundError" if exc.status_code == 404 else "FaceFarmError"
    return JSONResponse(
        error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers or None
    )


def describe_validation(errors: object) -> str:
    """One line from pydantic's error list: ``field: problem; field: problem``."""
    parts: list[str] = []
    for item in errors if isinstance(errors, list | tuple) else []:
        loc = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{loc or 'request'}: {item.get('msg', 'invalid')}")
    return "invalid request: " + ("; ".join(parts) or "malformed input")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app`` (called once by create_app)."""
    app.add_exception_handler(FaceFarmError, _on_farm_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
