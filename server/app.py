"""`create_app(settings, model=None)`: everything is built inside the lifespan."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry, ProcessCollector
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles

from server import errors
from server.access import AccessMiddleware, TokenBuckets
from server.admission import queue_gate
from server.client import EngineClient, RemoteClient
from server.fastlane import FastLane, LaneApp
from server.middleware import RequestContextMiddleware
from server.routes import fast_lane_routes, router
from server.runtime import Runtime, tune_gc
from server.settings import Settings
from server.timeline import MAX_LATENCIES

if TYPE_CHECKING:
    from server.host import ServedModel


def _version() -> str:
    try:
        return version("microbatch")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(
    settings: Settings | None = None,
    model: ServedModel | Sequence[ServedModel] | None = None,
    engine_path: str | None = None,
) -> FastAPI:
    """The ASGI app. `model` replaces the model that `settings` names (tests pass fakes;
    a sequence is one replica each). With `engine_path`, the app is a front-end of the
    engine process serving that socket (`microbatch serve --workers N`, see
    `server.workers`): it imports neither torch nor transformers, encodes with the
    encoder the engine process sends it, and `/metrics` adds every front-end's counters
    from the directory prometheus_client's multiprocess mode writes to.

    Startup loads the model (a load error fails startup), then warms it in the
    background: `/health` answers at once, `/ready` turns 200 once warm. Shutdown
    drains: every admitted request is answered before the engine stops.
    """
    settings = settings if settings is not None else Settings()
    registry = CollectorRegistry()
    if engine_path is None:  # a front-end's are the engine process's, in its /metrics
        ProcessCollector(registry=registry)  # process_resident_memory_bytes and friends
    latencies: deque[float] = deque(maxlen=MAX_LATENCIES)  # middleware -> timeline

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        client: EngineClient
        if engine_path is not None:
            metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            client = RemoteClient.start(
                engine_path, registry, latencies, metrics_dir, settings.drain_timeout_s
            )
            tune_gc()  # as the engine process does once warm: what is loaded now lives on
        else:
            # Only here: the engine side, which imports torch (a front-end never does).
            from server.host import EngineHost, LocalClient

            client = LocalClient(await EngineHost.load(settings, registry, model, latencies))
        runtime = Runtime(settings, client, registry)
        app.state.runtime = runtime  # for `microbatch serve`'s signal handler
        try:
            yield {"runtime": runtime}
        finally:
            await runtime.aclose()

    # The docs pages' scripts and styles come with the package (fastapi-offline), not
    # from a CDN: /docs and /redoc work on a machine without internet.
    app = FastAPIOffline(
        title="microbatch",
        version=_version(),
        summary="Dynamic micro-batching inference server",
        lifespan=lifespan,
    )
    # fastapi-offline builds a plain FastAPI; the lane's entrance is a method of the class.
    app.__class__ = LaneApp
    errors.install(app)
    app.include_router(router)
    # The dashboard's script, styles and chart library (uPlot, MIT) come with the package.
    app.mount("/dashboard/static", StaticFiles(packages=[("server", "static")]), "dashboard-static")
    # Outermost last: ids, timing and size/type checks, then CORS, then access, then the
    # inference routes' way around FastAPI's router.
    app.add_middleware(FastLane, routes=fast_lane_routes(), handlers=app.exception_handlers)
    rate = settings.rate_limit_rps
    buckets = TokenBuckets(rate, settings.rate_limit_burst or max(1, round(rate))) if rate else None
    app.add_middleware(
        AccessMiddleware,
        api_keys=settings.api_key_list(),
        admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
        admin_open=settings.loopback,
        buckets=buckets,
        admission=queue_gate,
        registry=registry,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list(),
            allow_methods=["GET", "POST", "PATCH"],
            allow_headers=["authorization", "content-type", "x-request-id", "x-request-timeout-ms"],
            expose_headers=[
                "x-request-id",
                "x-queue-time-ms",
                "x-inference-time-ms",
                "x-batch-size",
            ],
        )
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        registry=registry,
        latencies=latencies,
    )
    return app
