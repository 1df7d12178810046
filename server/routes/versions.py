"""Model versions while the server runs: load (`POST /admin/models`), unload (`DELETE
/admin/models/NAME@VERSION`), list, and the routes between a model's versions (`GET` and
`PATCH /admin/routes`): a canary's weights and the shadow shares. Behind the admin key,
as every `/admin` route."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.exceptions import RequestValidationError

from server.errors import Conflict, UnknownModel
from server.operator_schemas import ModelLoad, ModelSummary, RouteInfo, Unloaded
from server.routes.admin import summaries
from server.routes.parsing import RuntimeDep
from server.routing import parse_patch
from server.runtime import Runtime
from server.settings import ModelSpec, check_name

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
