"""`create_app(settings, model=None)`: everything is built inside the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from server import errors
from server.middleware import RequestContextMiddleware
from server.routes import router
from server.runtime import Runtime, ServedModel
from server.settings import Settings


def _version() -> str:
    try:
        return version("microbatch")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(settings: Settings | None = None, model: ServedModel | None = None) -> FastAPI:
    """The ASGI app. `model` replaces the model that `settings` names (tests pass fakes).

    Startup loads the model (a load error fails startup), then warms it in the
    background: `/health` answers at once, `/ready` turns 200 once warm. Shutdown
    drains: every admitted request is answered before the engine stops.
    """
    settings = settings if settings is not None else Settings()
    registry = CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        runtime = Runtime(settings, registry)
        await runtime.load(model)
        try:
            yield {"runtime": runtime}
        finally:
            await runtime.aclose()

    app = FastAPI(
        title="microbatch",
        version=_version(),
        summary="Dynamic micro-batching inference server",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(router)
    app.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, registry=registry
    )
    return app
