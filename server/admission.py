"""The early admission gate: 429 before the body is read or the text tokenized, so that
under overload a refusal costs almost nothing. The engine checks again at submit, for
every item."""

from __future__ import annotations

from starlette.types import Scope

from batcher import QueueFull
from server.errors import Refusal
from server.runtime import Runtime
from server.tenants import Principal


def queue_gate(scope: Scope) -> Refusal | None:
    """A 429 while the engine's queue is full (for the request's tenant: see
    `batcher.queue.PendingQueue.check_room`); None otherwise (and before it runs).
    With several models the body names the model, so only the engine, at submit,
    knows whose queue to check."""
    runtime: Runtime | None = scope.get("state", {}).get("runtime")
    if runtime is None or runtime.status != "ready":  # the route answers 503 itself
        return None
    if len(runtime.models) > 1:
        return None
    engine = runtime.engine
    if engine.state != "running":
        return None
    who: Principal | None = scope["state"].get("principal")
    owner = None if who is None else who.owner
    try:
        engine.check_room(1, owner)
    except QueueFull as exc:
        return Refusal(429, "queue_full", str(exc), {"Retry-After": "1"})
    return None
