"""`GET /dashboard`: a live page of the last minutes, served whole by this server (its
chart library included, under `/dashboard/static/`), and the data it polls."""

from __future__ import annotations

from dataclasses import asdict
from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from server.operator_schemas import DashboardData, ShadowAgreement, TenantSummary
from server.quotas import TenantMetrics
from server.routes.admin import batching_of, summaries
from server.routes.parsing import ModelQuery, RuntimeDep
from server.routes.versions import drift_info

router = APIRouter(tags=["dashboard"])


@cache
def _page() -> str:
    return (files("server") / "static" / "dashboard.html").read_text(encoding="utf-8")


@router.get("/dashboard", response_class=HTMLResponse, summary="Live page: load, latency, batches")
async def dashboard() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/data", response_model=DashboardData, summary="The dashboard's samples")
async def dashboard_data(
    request: Request,
    runtime: RuntimeDep,
    since: float = Query(0.0, description="Only samples taken after this Unix time."),
    model: ModelQuery = None,
) -> DashboardData:
    await runtime.refresh()
    served = runtime.model(model)
    recent = await served.client.recent(since)
    described = served.describe()
    drift = runtime.drift.versions
    return DashboardData(
        status=served.state if len(runtime.models) > 1 else runtime.status,
        model=served.key or served.encoder.name,
        models=runtime.names(),
        device=str(described.get("device", "")),
        dtype=str(described.get("dtype", "")),
        interval_s=recent.interval_s,
        history_s=recent.history_s,
        batching=batching_of(served),
        samples=recent.samples,
        events=recent.events,
        versions=[v for v in summaries(runtime) if v.model == (served.name or v.model)],
        shadows=[
            ShadowAgreement(model=p.model, primary=p.primary, shadow=p.shadow, items=p.items,
                            **p.means())
            for p in runtime.shadows.pairs.values()
            if p.model == served.name
        ],
        drift={d.version: drift_info(d, centroid=False)
               for d in drift.values() if d.model == served.name},
        tenants=tenant_summaries(request.state.tenancy.metrics),
    )  # fmt: skip


def tenant_summaries(metrics: TenantMetrics) -> list[TenantSummary]:
    total_s = sum(t.device_s for t in metrics.totals.values()) or 1.0
    found = [
        TenantSummary(tenant=label, device_share=t.device_s / total_s, **asdict(t))
        for label, t in metrics.totals.items()
    ]
    return sorted(found, key=lambda t: (-t.device_s, t.tenant))
