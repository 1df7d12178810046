"""The HTTP routes, one module per family: validate, admit, await, shape the reply. No
batching logic here."""

from fastapi import APIRouter

from server.routes import admin, cohere, dashboard, openai, predict, probes, tei

router = APIRouter()
for family in (predict, openai, tei, cohere, probes, admin, dashboard):
    router.include_router(family.router)

__all__ = ["router"]
