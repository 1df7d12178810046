"""Model versions while the server runs: load (`POST /admin/models`), unload (`DELETE
/admin/models/NAME@VERSION`), list, and the routes between a model's versions (`GET` and
`PATCH /admin/routes`): a canary's weights and the shadow shares. Behind the admin key,
as every `/admin` route."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.exceptions import RequestValidationError

from server.drift import Reference, VersionDrift
from server.errors import Conflict, UnknownModel
from server.operator_schemas import DriftInfo, ModelLoad, ModelSummary, RouteInfo, Unloaded
from server.routes.admin import summaries
from server.routes.parsing import RuntimeDep
from server.routing import parse_patch
from server.runtime import Runtime
from server.specs import ModelSpec, check_name

router = APIRouter(tags=["admin"])


def _invalid(field: str, msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": msg, "type": "value_error"}])


@router.get("/admin/models", response_model=list[ModelSummary], summary="Every version served")
async def list_versions(runtime: RuntimeDep) -> list[ModelSummary]:
    await runtime.refresh()
    return summaries(runtime)


@router.post(
    "/admin/models",
    response_model=ModelSummary,
    status_code=202,
    summary="Load a model version in the background; traffic moves once it is ready",
)
async def load_version(load: ModelLoad, runtime: RuntimeDep) -> ModelSummary:
    """Starts loading and answers at once (`loading`); `GET /admin/models` or
    `/v1/models` shows it turn `warming`, then `ready`, or `failed` with the reason. It
    takes no traffic until a route gives it some (`PATCH /admin/routes`), or a request
    pins it (`NAME@VERSION`)."""
    try:
        check_name(load.name, load.version, "POST /admin/models")
    except ValueError as exc:
        raise _invalid("name", str(exc)) from None
    from batcher.models import source_problem  # torch-free; a hub id is looked up once

    problem = await asyncio.to_thread(source_problem, load.path)
    if problem is not None:
        raise _invalid("path", problem)
    try:
        served = runtime.add(ModelSpec(load.name, load.path, load.version))
    except ValueError as exc:
        raise Conflict(str(exc)) from None
    return next(s for s in summaries(runtime) if s.name == served.key)


@router.delete(
    "/admin/models/{key:path}",
    response_model=Unloaded,
    summary="Stop routing to a version, drain its queue and free its memory",
)
async def unload_version(key: str, runtime: RuntimeDep) -> Unloaded:
    """Every request it admitted is answered first. The last version of a model that
    takes traffic cannot be removed (409): route the traffic elsewhere first."""
    served = runtime.models.get(key)
    if served is None:
        raise UnknownModel(key, runtime.names())
    if runtime.versions.loader is None:
        raise Conflict("this server unloads no models while it runs (--workers N)")
    problem = runtime.removal_problem(served)
    if problem is not None:
        raise Conflict(problem)
    freed = await runtime.remove(served)
    if freed is None:
        return Unloaded(name=key, freed_bytes=0, measure="not loaded yet")
    return Unloaded(name=key, freed_bytes=freed.bytes, measure=freed.measure)


@router.get("/admin/drift", summary="Each version's recent answers against its reference")
async def get_drift(runtime: RuntimeDep) -> dict[str, DriftInfo]:
    """By version (`NAME@VERSION`): its reference (save it, to `PUT` it back after a
    restart) and its recent window's statistics."""
    return {key: drift_info(d) for key, d in runtime.drift.versions.items()}


def drift_info(drift: VersionDrift, *, centroid: bool = True) -> DriftInfo:
    """One version's drift (`centroid=False`: without the reference's centroid, which
    only a saved reference needs)."""
    reference = None if drift.reference is None else asdict(drift.reference)
    if reference is not None and not centroid:
        reference.pop("centroid", None)
    return DriftInfo(model=drift.model, version=drift.version, task=drift.task,
                     reference=reference, recent=drift.recent())  # fmt: skip


@router.put("/admin/drift/{key:path}", summary="Compare a version with a saved reference")
async def put_drift_reference(
    key: str, reference: Annotated[dict[str, Any], Body()], runtime: RuntimeDep
) -> DriftInfo:
    """`reference` is what `GET /admin/drift` gave as one version's `reference`."""
    served = runtime.models.get(key)
    if served is None:
        raise UnknownModel(key, runtime.names())
    drift = runtime.drift.versions.get(key)
    if drift is None:
        raise Conflict(f"{key} has answered nothing yet (or drift is off: --drift-window 0)")
    try:
        drift.put_reference(Reference.parse(reference))
    except ValueError as exc:
        raise _invalid("reference", str(exc)) from None
    return drift_info(drift)


def _routes(runtime: Runtime) -> dict[str, RouteInfo]:
    versions = runtime.versions
    found = {}
    for name in dict.fromkeys(s.name for s in runtime.models.values()):
        route = versions.route_of(name)
        found[name] = RouteInfo(
            weights=dict(route.weights), shadow=dict(route.shadow), served=versions.shares(name)
        )
    return found


@router.get("/admin/routes", response_model=dict[str, RouteInfo], summary="Every model's route")
async def get_routes(runtime: RuntimeDep) -> dict[str, RouteInfo]:
    await runtime.refresh()
    return _routes(runtime)


ROUTE_EXAMPLE = {"emb": {"v1": 95, "v2": 5, "shadow": {"v3": 0.2}}}


@router.patch(
    "/admin/routes",
    response_model=dict[str, RouteInfo],
    summary="Split a model's traffic between its versions; mirror a share to a shadow",
)
async def patch_routes(
    runtime: RuntimeDep,
    patch: Annotated[dict[str, Any], Body(openapi_examples={"canary": {"value": ROUTE_EXAMPLE}})],
) -> dict[str, RouteInfo]:
    """Per model, the weights of its versions (whole numbers; a version left out gets
    none) and `shadow`: the share of its requests mirrored to a version, in the bulk
    lane, answering no one. A model left out keeps its route; so does a model's
    `shadow` when the entry has none. All of it applies, or none (422)."""
    try:
        patches = {name: parse_patch(entry, name) for name, entry in patch.items()}
        runtime.set_routes(patches)
    except ValueError as exc:
        raise _invalid("routes", str(exc)) from None
    return _routes(runtime)
