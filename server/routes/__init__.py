"""The HTTP routes, one module per family: validate, admit, await, shape the reply. No
batching logic here."""

from fastapi import APIRouter
from fastapi.routing import APIRoute

from server.fastlane import direct_routes
from server.routes import (
    admin,
    cohere,
    dashboard,
    embedding_types,
    kserve,
    openai,
    predict,
    probes,
    tei,
    versions,
)

FAMILIES = (
    predict, embedding_types, openai, tei, cohere, kserve, probes, admin, versions, dashboard,
)  # fmt: skip

router = APIRouter()
for family in FAMILIES:
    router.include_router(family.router)


def fast_lane_routes() -> dict[str, APIRoute]:
    """The routes `server.fastlane.FastLane` answers without FastAPI's router: every
    family's POST routes that read their own body."""
    return direct_routes(route for family in FAMILIES for route in family.router.routes)


__all__ = ["fast_lane_routes", "router"]
