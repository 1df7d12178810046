"""What operators read and change: `/model` and `/admin/batching`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError

from server.errors import NotReady
from server.routes.parsing import RuntimeDep
from server.runtime import Runtime
from server.schemas import (
    Batching,
    BatchingPatch,
)

router = APIRouter()


def _batching(runtime: Runtime) -> Batching:
    config = runtime.engine.config if runtime.engine else runtime.settings.engine_config()
    return Batching.model_validate(config, from_attributes=True)


def _learned_cost(runtime: Runtime) -> dict[str, float] | None:
    cost = runtime.engine.cost_model.estimate() if runtime.engine else None
    if cost is None:
        return None
    return {"overhead_ms": cost.overhead_s * 1e3, "per_token_us": cost.per_token_s * 1e6}


@router.get("/model", summary="Model, device, compile state and batching settings")
async def model_info(runtime: RuntimeDep) -> dict[str, Any]:
    described = runtime.model.describe() if runtime.model else {}
    return {
        **described,
        "status": runtime.status,
        "batching": _batching(runtime).model_dump(),
        "learned_cost": _learned_cost(runtime),
        "memory_cap_tokens": runtime.engine.memory_cap if runtime.engine else None,
        "replicas": [
            {"index": r.index, "device": str(m.describe().get("device")), "alive": r.alive}
            for r, m in zip(
                runtime.engine.replicas if runtime.engine else [], runtime.models, strict=False
            )
        ],
        "limits": {
            name: getattr(runtime.settings, name)
            for name in (
                "max_text_chars",
                "truncate",
                "max_client_batch",
                "max_body_bytes",
                "request_timeout_s",
                "max_request_timeout_s",
                "watchdog_s",
                "rate_limit_rps",
                "rate_limit_burst",
            )
        },
    }


@router.get("/admin/batching", response_model=Batching, summary="Live batching settings")
async def get_batching(runtime: RuntimeDep) -> Batching:
    return _batching(runtime)


@router.patch(
    "/admin/batching",
    response_model=Batching,
    summary="Change batching at run time (a larger max_batch_size is warmed first)",
)
async def patch_batching(patch: BatchingPatch, runtime: RuntimeDep) -> Batching:
    if runtime.engine is None:
        raise NotReady(f"the server is {runtime.status}")
    try:
        await runtime.reconfigure(patch.changes())
    except ValueError as exc:
        raise RequestValidationError(
            [{"loc": ("body",), "msg": str(exc), "type": "value_error"}]
        ) from None
    return _batching(runtime)
