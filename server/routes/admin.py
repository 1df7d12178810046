"""What operators read and change: `/model` and `/admin/batching`."""

from __future__ import annotations

from typing import cast

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError

from server.operator_schemas import (
    Batching,
    BatchingPatch,
    ConfiguredLimits,
    LearnedCost,
    ModelInfo,
    ModelSummary,
    ReplicaInfo,
    SloChange,
    SloInfo,
    SloWindow,
)
from server.routes.parsing import ModelQuery, RuntimeDep
from server.runtime import Runtime
from server.served import Served

router = APIRouter(tags=["admin"])


LIMITS_SHOWN = (
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


def batching_of(served: Served) -> Batching:
    """A model's live batching settings, with the SLO controller's state when one is set."""
    stats = served.engine.stats()
    batching = Batching.model_validate(stats.config, from_attributes=True)
    slo = stats.slo
    if slo is None:
        return batching
    return batching.model_copy(
        update={
            "configured": ConfiguredLimits.model_validate(stats.configured, from_attributes=True),
            "slo": SloInfo(
                target_p99_ms=slo.target_p99_ms,
                step=slo.index,
                steps=slo.rungs,
                last_window=slo.judged
                and SloWindow.model_validate(slo.judged, from_attributes=True),
                last_change=slo.last and SloChange.model_validate(slo.last, from_attributes=True),
                changes=slo.adjustments,
            ),
        }
    )


def summaries(runtime: Runtime) -> list[ModelSummary]:
    """Every served version: name, task, pooling, state, its share of the traffic; the
    default first."""
    found = []
    versions = runtime.versions
    default = runtime.default
    for name, served in zip(runtime.names(), runtime.models.values(), strict=True):
        described = served.describe()
        pooling = described.get("pooling")
        route = versions.route_of(served.name)
        found.append(
            ModelSummary(
                name=name,
                model=served.name or name,
                version=served.version,
                task=cast("str | None", described.get("task")),
                pooling=cast("list[str]", pooling) if pooling is not None else None,
                status=served.state,
                default=served is default,
                traffic=versions.shares(served.name).get(served.version, 0.0),
                shadow=dict(route.shadow).get(served.version, 0.0),
                error=served.error,
            )
        )
    return found


@router.get("/model", response_model=ModelInfo, summary="Model, task, compile state, batching")
async def model_info(runtime: RuntimeDep, model: ModelQuery = None) -> ModelInfo:
    await runtime.refresh()
    served = runtime.model(model)
    stats = served.engine.stats()
    cost = stats.learned_cost
    report = served.report()
    devices = list(report.devices) if report is not None else []
    return ModelInfo.model_validate(
        {
            **served.describe(),
            "status": served.state if len(runtime.models) > 1 else runtime.status,
            "batching": batching_of(served),
            "learned_cost": cost
            and LearnedCost(overhead_ms=cost.overhead_s * 1e3, per_token_us=cost.per_token_s * 1e6),
            "memory_cap_tokens": stats.memory_cap_tokens,
            "replicas": [
                ReplicaInfo(index=r.index, device=devices[r.index], alive=r.alive)
                for r in stats.replicas
            ],
            "limits": {name: getattr(runtime.settings, name) for name in LIMITS_SHOWN},
            "threads": runtime.threads,
            "models": summaries(runtime),
        }
    )


@router.get("/admin/batching", response_model=Batching, summary="Live batching settings")
async def get_batching(runtime: RuntimeDep, model: ModelQuery = None) -> Batching:
    await runtime.refresh()
    return batching_of(runtime.model(model))


@router.patch(
    "/admin/batching",
    response_model=Batching,
    summary="Change batching at run time (a larger max_batch_size is warmed first)",
)
async def patch_batching(
    patch: BatchingPatch, runtime: RuntimeDep, model: ModelQuery = None
) -> Batching:
    served = runtime.model(model)
    try:
        await runtime.reconfigure(patch.changes(), served.name)
    except ValueError as exc:
        raise RequestValidationError(
            [{"loc": ("body",), "msg": str(exc), "type": "value_error"}]
        ) from None
    return batching_of(served)
