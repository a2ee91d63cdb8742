"""FaceFarm errors become one status code and a ``{"error", "kind"}`` body, in one place."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from dispatcher.http_errors import install_error_handlers, status_for
from shared import errors as e


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (e.AuthError("x"), 401),
        (e.NotFoundError("x"), 404),
        (e.LimitExceededError("x"), 413),
        (e.NoFaceError("x"), 422),
        (e.InvalidVideoError("x"), 422),
        (e.HdrRefusedError("x"), 422),
        (e.UnknownModelError("x"), 422),
        (e.StorageAccessError("x"), 403),
        (e.ConfigError("x"), 500),
        (e.PermanentError("x"), 409),
        (e.JobCancelledError("x"), 409),
        (e.BrokerUnavailableError("x"), 503),
        (e.StorageUnavailableError("x"), 503),
        (e.FaceFarmError("x"), 500),
    ],
)
def test_status_codes_follow_the_error_tree(error: e.FaceFarmError, status: int) -> None:
    assert status_for(error) == status


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/no-face")
    def no_face() -> None:
        raise e.NoFaceError("no face found in face.png: use a photo with one clear face")

    @app.get("/broker")
    def broker() -> None:
        raise e.BrokerUnavailableError("redis down")

    @app.get("/typed/{n}")
    def typed(n: int) -> int:
        return n

    return app


def _get(path: str) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(path)

    return asyncio.run(go())


def test_error_body_names_message_and_class() -> None:
    response = _get("/no-face")
    assert response.status_code == 422
    assert response.json() == {
        "error": "no face found in face.png: use a photo with one clear face",
        "kind": "NoFaceError",
    }


def test_retryable_errors_tell_the_client_when_to_come_back() -> None:
    response = _get("/broker")
    assert response.status_code == 503
    assert response.headers["retry-after"].isdigit()


def test_request_validation_errors_use_the_same_body() -> None:
    response = _get("/typed/abc")
    assert response.status_code == 422
    assert response.json()["kind"] == "BadInputError"
    assert response.json()["error"].startswith("invalid request: n:")


def test_unknown_routes_are_not_found_errors() -> None:
    response = _get("/nowhere")
    assert response.status_code == 404
    assert response.json()["kind"] == "NotFoundError"
