"""The replicas behind one queue: one runner (one device) each, leased to one batch at a
time. Touched only on the event-loop thread."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from batcher.runner import Runner
from batcher.stats import ReplicaStats

InT = TypeVar("InT")
OutT = TypeVar("OutT")

logger = logging.getLogger("batcher.engine")

REPLICA_STRIKES = 3
"""A replica that fails this many inputs in a row which another replica then computes
is taken out of rotation (while another replica is alive)."""


@dataclass(eq=False)
class Replica(Generic[InT, OutT]):
    """One runner (one device) and what the engine knows of it."""

    index: int
    runner: Runner[InT, OutT]
    busy_since: float | None = None
    strikes: int = 0
    alive: bool = True


class ReplicaPool(Generic[InT, OutT]):
    """Hands out free replicas: `async with pool.lease() as replica`, released on exit,
    whatever happens inside."""

    def __init__(
        self, runners: Sequence[Runner[InT, OutT]], on_alive: Callable[[int], None]
    ) -> None:
        if not runners:
            raise ValueError("an engine needs at least one runner")
        self.replicas = [Replica(i, r) for i, r in enumerate(runners)]
        self._idle = list(self.replicas)
        self._changed = asyncio.Event()
        """Set when a replica is freed or leaves rotation: waiters look again."""
        self._on_alive = on_alive
        """Told the number of live replicas whenever it changes (a metric)."""
        on_alive(len(self.replicas))

    @property
    def alive(self) -> int:
        return sum(r.alive for r in self.replicas)

    def others_alive(self, replica: Replica[InT, OutT]) -> bool:
        """Whether a live replica other than `replica` exists."""
        return any(r.alive and r is not replica for r in self.replicas)

    def stats(self) -> tuple[ReplicaStats, ...]:
        return tuple(
            ReplicaStats(r.index, r.alive, r.busy_since is not None) for r in self.replicas
        )

    def busy_since(self) -> float | None:
        """When the longest-running forward pass now on a device started; None if idle."""
        starts = [r.busy_since for r in self.replicas if r.busy_since is not None]
        return min(starts) if starts else None

    @asynccontextmanager
    async def lease(
        self, avoid: Replica[InT, OutT] | None = None, only: int | None = None
    ) -> AsyncIterator[Replica[InT, OutT]]:
        """A free live replica, other than `avoid` while another is alive; the one with
        the fewest strikes when several are free; with `only`, the replica of that index
        while it is alive. Waits until one is free."""
        # No await between a failed look and the wait: a release can only come during
        # the wait, and it sets the event.
        while (replica := self._take(avoid, only)) is None:
            self._changed.clear()
            await self._changed.wait()
        try:
            yield replica
        finally:
            self._idle.append(replica)  # the one place a replica is released
            self._changed.set()

    def has_free(self) -> bool:
        """Whether a live replica is free now (a lease would not wait)."""
        return any(r.alive for r in self._idle)

    def _take(
        self, avoid: Replica[InT, OutT] | None, only: int | None = None
    ) -> Replica[InT, OutT] | None:
        free = [r for r in self._idle if r.alive]
        if only is not None and self.replicas[only].alive:
            free = [r for r in free if r.index == only]
        if avoid is not None and self.others_alive(avoid):
            free = [r for r in free if r is not avoid]
        if not free:
            return None
        replica = min(free, key=lambda r: r.strikes)
        self._idle.remove(replica)
        return replica

    def strike(self, replica: Replica[InT, OutT]) -> None:
        """`replica` failed an input that another replica then computed; after
        REPLICA_STRIKES in a row it leaves rotation, unless it is the last one alive."""
        replica.strikes += 1
        logger.warning(
            "replica %d failed an input that another replica computed (%d in a row)",
            replica.index,
            replica.strikes,
        )
        if replica.strikes >= REPLICA_STRIKES and self.alive > 1:
            replica.alive = False
            self._on_alive(self.alive)
            logger.error(
                "replica %d taken out of rotation after %d strikes; %d replicas left",
                replica.index,
                replica.strikes,
                self.alive,
            )
            self._changed.set()  # those avoiding it may now take any replica
