"""Callers and the items they wait for.

Each caller of `Engine.submit` awaits an answer of its own, which its item relays to, so
that callers of identical inputs can share one item: with an `identity` (a payload's key,
or None for one never to share), an input identical to one already queued or computing
joins it instead of being queued again. A caller leaving (cancelled, or past its
deadline) settles only its own answer; the last one to leave before the item is computed
cancels the item, which the queue then drops. Touched only on the event-loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from functools import partial
from typing import Generic, TypeVar

from batcher.errors import DeadlineExceeded
from batcher.fairness import Owner
from batcher.items import PendingItem, Result
from batcher.metrics import EngineMetrics

InT = TypeVar("InT")
OutT = TypeVar("OutT")


class Callers(Generic[InT, OutT]):
    def __init__(
        self, identity: Callable[[InT], Hashable | None] | None, metrics: EngineMetrics
    ) -> None:
        self._identity = identity
        self._metrics = metrics
        self._shared: dict[Hashable, PendingItem[InT, OutT]] = {}
        """Items queued or computing, by identity."""

    def admit(
        self, payload: InT, now: float, deadline: float | None, cost: int, bulk: bool = False,
        owner: Owner | None = None,
    ) -> tuple[PendingItem[InT, OutT], bool]:  # fmt: skip
        """The item `payload`'s caller waits for, now also until `deadline`, and whether it
        is new (to be queued): the item of an identical input queued or computing, or a
        new one that identical inputs may join until it is settled. An interactive caller
        joining a bulk item moves it to the interactive lane."""
        key = None if self._identity is None else self._identity(payload)
        shared = None if key is None else self._shared.get(key)
        if shared is not None and not shared.future.done():
            shared.waiting += 1
            shared.bulk = shared.bulk and bulk
            if shared.deadline is not None:  # wanted until its last caller's deadline
                shared.deadline = None if deadline is None else max(deadline, shared.deadline)
            self._metrics.count("coalesced")
            return shared, False
        item: PendingItem[InT, OutT] = PendingItem(
            payload, asyncio.get_running_loop().create_future(), now, deadline, cost, bulk=bulk,
            owner=owner,
        )  # fmt: skip
        if key is not None:
            self._shared[key] = item
            item.future.add_done_callback(partial(self._forget, key, item))
        return item, True

    def _forget(
        self, key: Hashable, item: PendingItem[InT, OutT], _: asyncio.Future[Result[OutT]]
    ) -> None:
        if self._shared.get(key) is item:
            del self._shared[key]

    async def wait(
        self, items: list[PendingItem[InT, OutT]], deadline_in: float | None
    ) -> list[Result[OutT]]:
        """One caller's results for `items`, within `deadline_in` seconds (None: no limit).
        Raises the first error; whatever happens, the caller leaves every item."""
        loop = asyncio.get_running_loop()
        answers: list[asyncio.Future[Result[OutT]]] = [loop.create_future() for _ in items]
        for item, answer in zip(items, answers, strict=True):
            item.future.add_done_callback(partial(_relay, answer))
        timer = None
        if deadline_in is not None:
            timer = loop.call_later(max(0.0, deadline_in), _expire, answers)
        try:
            return [await answer for answer in answers]
        finally:
            if timer is not None:
                timer.cancel()
            for item, answer in zip(items, answers, strict=True):
                # Not yet answered (a sibling failed, or our caller was cancelled), or the
                # deadline passed: this caller stops waiting.
                if answer.cancel() or answer.cancelled():
                    self._leave(item, "cancelled")
                elif isinstance(answer.exception(), DeadlineExceeded):
                    self._leave(item, "expired")
                else:
                    self._leave(item, None)

    def _leave(self, item: PendingItem[InT, OutT], why: str | None) -> None:
        """One caller of `item` stopped waiting; the last one to leave before it is
        computed cancels it (counted as `why`)."""
        item.waiting -= 1
        if item.waiting == 0 and item.future.cancel() and why is not None:
            self._metrics.count(why)


def _expire(answers: list[asyncio.Future[Result[OutT]]]) -> None:
    for answer in answers:
        if not answer.done():
            answer.set_exception(DeadlineExceeded("the deadline passed before it ran"))


def _relay(answer: asyncio.Future[Result[OutT]], done: asyncio.Future[Result[OutT]]) -> None:
    """Pass an item's outcome to one caller's answer (unless that caller left)."""
    if done.cancelled():
        answer.cancel()
        return
    error = done.exception()  # read even when no one waits: it counts as retrieved
    if answer.done():
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(done.result())
