"""What a request's headers ask of its items: a deadline (`X-Request-Timeout-Ms`) and a
lane (`X-Priority`), each checked once, with a 422 that names the header."""

from __future__ import annotations

import math

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from batcher import Lane
from server.client import EngineHandle
from server.runtime import Runtime
from server.tenants import Principal

TIMEOUT_HEADER = "x-request-timeout-ms"


def invalid_timeout(msg: str, kind: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("header", TIMEOUT_HEADER), "msg": msg, "type": kind}])


def deadline_of(engine: EngineHandle, runtime: Runtime, request: Request) -> float:
    settings = runtime.settings
    timeout_s = settings.request_timeout_s
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            timeout_ms = float(header)
        except ValueError:
            raise invalid_timeout("must be a number of milliseconds", "float_parsing") from None
        if not timeout_ms > 0:
            raise invalid_timeout("must be greater than 0", "greater_than")
        if not math.isfinite(timeout_ms) or timeout_ms / 1000 > settings.max_request_timeout_s:
            limit = settings.max_request_timeout_s * 1000
            raise invalid_timeout(
                f"must be at most {limit:g} (--max-request-timeout-s)", "less_than_equal"
            )
        timeout_s = timeout_ms / 1000
    return engine.clock() + timeout_s


ROUTE_KEY_HEADER = "x-route-key"


def route_key(request: Request) -> str | None:
    """What keeps a user on one version of a model: its `X-Route-Key`, else its API
    key's id (set by `server.access`), else nothing (each request drawn at random)."""
    key = request.headers.get(ROUTE_KEY_HEADER)
    if key:
        return key
    state: dict[str, object] = request.scope.get("state", {})
    client = state.get("route_key")
    return client if isinstance(client, str) else None


PRIORITY_HEADER = "x-priority"


def lane_of(request: Request, runtime: Runtime, inputs: int, *, by_size: bool = True) -> Lane:
    """The lane a request's items go to: `bulk` for a tenant whose lane is bulk
    (`server.tenants`); else its `X-Priority` (`interactive` or `bulk`); else `bulk` for
    a call of at least `--bulk-inputs` inputs (`by_size`: a rerank's documents are one
    user's query, never bulk by size); else `interactive`."""
    asked = request.headers.get(PRIORITY_HEADER)
    who: Principal | None = getattr(request.state, "principal", None)
    bulk_tenant = who is not None and who.limits.lane == "bulk"
    if asked is not None:
        lane = asked.strip().lower()
        if lane == "bulk":
            return "bulk"
        if lane == "interactive":
            return "bulk" if bulk_tenant else "interactive"
        raise RequestValidationError([{
            "loc": ("header", "X-Priority"),
            "msg": f"must be interactive or bulk, got {asked[:40]!r}",
            "type": "literal_error",
        }])  # fmt: skip
    if bulk_tenant:
        return "bulk"
    threshold = runtime.settings.bulk_inputs
    return "bulk" if by_size and threshold and inputs >= threshold else "interactive"
