"""What orchestrators and Prometheus poll: `/health`, `/ready`, `/metrics`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.routes.parsing import RuntimeDep
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
    detail: str | None
    if (problem := runtime.liveness_problem()) is not None:
        status, detail = "failed", problem
    elif runtime.status == "warming":
        warming = runtime.warming
        status = "warming"
        detail = warming.describe() if warming else "loading the model for warm-up"
    elif runtime.status != "ready":
        status, detail = runtime.status, runtime.error
    elif (waiting := runtime.incomplete()) is not None:
        status, detail = "warming", waiting
    elif runtime.saturated:
        status, detail = "saturated", "the queue is nearly full; send traffic elsewhere"
    else:
        return Status(status="ready")
    return JSONResponse(
        {"status": status, "detail": detail}, status_code=503, headers={"Retry-After": "1"}
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(await runtime.metrics_text(), media_type=CONTENT_TYPE_LATEST)
