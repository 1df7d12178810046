"""The objects that travel between the engine's stages."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar, get_args

from batcher.fairness import Owner

InT = TypeVar("InT")
OutT = TypeVar("OutT")

Lane = Literal["interactive", "bulk"]
"""Whose work an item is: someone waiting for it (`interactive`), or a job that only
needs it done (`bulk`, e.g. re-indexing). Interactive items go first; bulk keeps a share
of the device (`batcher.lanes`)."""
LANES: tuple[Lane, ...] = get_args(Lane)


@dataclass(frozen=True, slots=True)
class Result(Generic[OutT]):
    """One item's output, with where its time went."""

    value: OutT
    queue_time_s: float
    """From submit until its batch reached the device."""
    inference_time_s: float
    """Device time of the forward pass that computed it."""
    batch_size: int
    """Items in that forward pass."""
    cached: bool = False
    """Answered from the server's result cache (no queue, no device): the times are 0."""
    batch: int = 0
    """Which of its engine's forward passes computed it, counted from 1 (0: none did)."""
    device_s: float = 0.0
    """Its share of that pass's device time (`batcher.fairness.item_cost`): what its
    tenant is charged for it."""

    def __reduce__(self) -> tuple[type[Result[OutT]], tuple[object, ...]]:
        # Fast pickling across processes (batcher.remote): the constructor's arguments.
        return Result, (self.value, self.queue_time_s, self.inference_time_s, self.batch_size,
                        self.cached, self.batch, self.device_s)  # fmt: skip


@dataclass(slots=True, eq=False)
class PendingItem(Generic[InT, OutT]):
    """A submitted input to compute, and the future its result settles. Each caller
    awaits a future of its own that this one relays to (`batcher.callers`), so that callers
    of identical inputs share one computation, and one leaving cancels it only when it
    was the last. Touched only on the loop."""

    payload: InT
    future: asyncio.Future[Result[OutT]]
    enqueued_at: float
    """Loop time (monotonic seconds) of admission."""
    deadline: float | None
    """Loop time after which it is not computed; None for no deadline."""
    cost: int
    """Length in tokens (or 1 for models without a length)."""
    overtaken: int = 0
    """Batches that left with a younger item while this one stayed queued (the policy
    bounds it: `EngineConfig.max_overtakes`)."""
    waiting: int = 1
    """Callers still waiting for it."""
    bulk: bool = False
    """In the bulk lane (every caller of it asked for bulk)."""
    owner: Owner | None = None
    """Whose it is, for the tenants' fair share (`batcher.fairness`); None: no one's in
    particular (the first caller's, when callers of identical inputs share it)."""


def settle_result(future: asyncio.Future[OutT], value: OutT) -> bool:
    """Set `value` unless the future is already done (its caller may have gone away).
    Returns whether it was set."""
    if future.done():
        return False
    future.set_result(value)
    return True


def settle_error(future: asyncio.Future[OutT], error: BaseException) -> bool:
    """Set `error` unless the future is already done. Returns whether it was set."""
    if future.done():
        return False
    future.set_exception(error)
    return True
