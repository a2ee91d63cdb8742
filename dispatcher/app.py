"""The FastAPI application factory: settings in, app out; nothing is built at import time.

The lifespan creates the ``FarmContext`` (state store, storage, task sender) once per app, so tests
can build apps with different settings, or hand in a context of their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from dispatcher.http_errors import install_error_handlers
from dispatcher.metrics import create_registry
from dispatcher.routes import router
from dispatcher.service import FarmContext, create_context
from shared.settings import Settings

TITLE = "FaceFarm API"


def create_app(settings: Settings, *, context: FarmContext | None = None) -> FastAPI:
    """The API for ``settings``; ``context`` replaces the one the lifespan would create."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = context if context is not None else create_context(settings)
        app.state.ctx = ctx
        try:
            yield
        finally:
            app.state.ctx = None
            if context is None:
                ctx.store.close()

    app = FastAPI(title=TITLE, version="1", lifespan=lifespan)
    app.state.settings = settings
    app.state.ctx = None
    app.state.metrics = create_registry(lambda: app.state.ctx.store if app.state.ctx else None)
    install_error_handlers(app)
    app.include_router(router)
    return app


def serve_api(settings: Settings) -> None:
    """Run the API with uvicorn on ``settings.api_host:api_port`` until stopped."""
    import uvicorn

    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        proxy_headers=True,
    )
