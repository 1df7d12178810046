"""What orchestrators and Prometheus poll: `/health`, `/ready`, `/metrics`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.routes.parsing import RuntimeDep
from server.runtime import Runtime
from server.schemas import Status

router = APIRouter(tags=["probes"])


@router.get(
    "/health",
    response_model=Status,
    summary="Liveness: 503 when the engine died or a forward pass is stuck (restart me)",
)
async def health(runtime: RuntimeDep) -> Any:
    problem = runtime.liveness_problem()
    if problem is None:
        return Status(status="ok")
    return JSONResponse({"status": "failed", "detail": problem}, status_code=503)


@router.get(
    "/ready",
    response_model=Status,
    summary="Readiness: loaded, warmed, not draining and not saturated",
)
async def ready(runtime: RuntimeDep) -> Any:
    unready = not_ready(runtime)
    if unready is None:
        return Status(status="ready")
    status, detail = unready
    return JSONResponse(
        {"status": status, "detail": detail}, status_code=503, headers={"Retry-After": "1"}
    )


def not_ready(runtime: Runtime) -> tuple[str, str | None] | None:
    """Why the server should take no traffic now (its status and the detail), or None
    when it is ready: `/ready`'s answer, and the Open Inference Protocol's."""
    if (problem := runtime.liveness_problem()) is not None:
        return "failed", problem
    if runtime.status == "warming":
        warming = runtime.warming
        return "warming", warming.describe() if warming else "loading the model for warm-up"
    if runtime.status != "ready":
        return runtime.status, runtime.error
    if (waiting := runtime.incomplete()) is not None:
        return "warming", waiting
    if runtime.saturated:
        return "saturated", "the queue is nearly full; send traffic elsewhere"
    return None


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(await runtime.metrics_text(), media_type=CONTENT_TYPE_LATEST)
