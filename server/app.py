"""`create_app(settings, model=None)`: everything is built inside the lifespan."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from prometheus_client import CollectorRegistry, ProcessCollector
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles

from server import errors
from server.access import AccessMiddleware, TokenBuckets, tenancy_for
from server.admission import queue_gate
from server.client import EngineClient, RemoteClient
from server.fastlane import LaneApp
from server.middleware import RequestContextMiddleware
from server.routes import fast_lane_routes, router
from server.runtime import Runtime
from server.served import ModelLoader
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
    model: ServedModel | Sequence[ServedModel] | Mapping[str, ServedModel] | None = None,
    engine_path: str | None = None,
) -> FastAPI:
    """The ASGI app. `model` replaces the model that `settings` names (tests pass fakes;
    a sequence is one replica each, a mapping several models or versions by served key,
    `NAME@VERSION`). With `engine_path`, the app is a front-end of the
    engine process serving that socket (`microbatch serve --workers N`, see
    `server.workers`): it loads no model and imports neither torch nor transformers; it
    encodes with the encoder the engine process sends it once connected, and `/metrics`
    adds every front-end's counters from the directory prometheus_client's multiprocess
    mode writes to. Giving both raises ValueError (the engine process has the model).

    Startup loads the model in this process (a load error fails startup), or connects
    to the engine process in the background; then the model warms up: `/health` answers
    at once, `/ready` turns 200 once warm. Shutdown drains: every admitted request is
    answered before the engine stops.
    """
    if model is not None and engine_path is not None:
        raise ValueError("a front-end (engine_path) takes its model from the engine process")
    settings = settings if settings is not None else Settings()
    registry = CollectorRegistry()
    if engine_path is None:  # a front-end's are the engine process's, in its /metrics
        ProcessCollector(registry=registry)  # process_resident_memory_bytes and friends
    latencies: deque[float] = deque(maxlen=MAX_LATENCIES)  # middleware -> timeline
    tenancy = tenancy_for(settings, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        clients: Mapping[str, EngineClient]
        loader: ModelLoader | None = None
        if engine_path is not None:
            metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            clients = {"": RemoteClient.start(
                engine_path, registry, latencies, metrics_dir, settings.drain_timeout_s
            )}  # fmt: skip
        else:
            # Only here: the engine side, which imports torch (a front-end never does).
            from server.fleet import Fleet

            fleet = Fleet(settings, registry, latencies)
            clients = await fleet.start(model)
            loader = fleet
        runtime = Runtime(settings, clients, registry, loader)
        app.state.runtime = runtime  # for `microbatch serve`'s signal handler
        unwatch = tenancy.watch()
        state = {"runtime": runtime, "tenancy": tenancy}
        grpc_server = None
        try:
            await tenancy.start()
            await runtime.start()
            if settings.grpc_port is not None:
                from server.kserve.grpc_server import GrpcServer

                grpc_server = GrpcServer(app, state, settings, registry)
                app.state.grpc_port = await grpc_server.start()
            yield state
        finally:
            unwatch()
            if grpc_server is not None:  # its calls' items answered first, then it stops
                await runtime.drain()
                await grpc_server.stop()
            await runtime.aclose()

    app = LaneApp(
        title="microbatch",
        version=_version(),
        summary="Dynamic micro-batching inference server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    _offline_docs(app)
    errors.install(app)
    app.include_router(router)
    # The dashboard's script, styles and chart library (uPlot, MIT) come with the package.
    app.mount("/dashboard/static", StaticFiles(packages=[("server", "static")]), "dashboard-static")
    # Outermost last: ids, timing and size/type checks, then CORS, then access, then the
    # inference routes' way around FastAPI's router.
    app.add_fast_lane(fast_lane_routes())
    rate = settings.rate_limit_rps
    buckets = TokenBuckets(rate, settings.rate_limit_burst or max(1, round(rate))) if rate else None
    app.add_middleware(
        AccessMiddleware,
        tenancy=tenancy,
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
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=[
                "authorization",
                "content-type",
                "x-request-id",
                "x-request-timeout-ms",
                "x-priority",
                "x-route-key",
            ],
            expose_headers=[
                "x-request-id",
                "x-queue-time-ms",
                "x-inference-time-ms",
                "x-batch-size",
                "x-model-version",
            ],
        )
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        image_body_bytes=settings.image_body_bytes(),
        registry=registry,
        latencies=latencies,
    )
    return app


DOCS_STATIC = "/static-offline-docs"


def _offline_docs(app: FastAPI) -> None:
    """`/docs` (Swagger UI) and `/redoc` with their scripts and styles served from the
    files fastapi-offline packages, not from a CDN: they work on a machine without
    internet. FastAPI's own page builders make the pages."""
    static = resources.files("fastapi_offline") / "static"
    app.mount(DOCS_STATIC, StaticFiles(directory=str(static)), name="static-offline-docs")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{redirect_url}",
            swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_STATIC}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_STATIC}/favicon.png",
            with_google_fonts=False,
        )
