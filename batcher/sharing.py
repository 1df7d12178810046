"""Several engines (one per model) on the same devices: who gets a device next.

Each engine joins the `DeviceScheduler` of its devices as a `DeviceShare`. An engine
whose policy wants to dispatch asks its share for a turn (`await share.turn()`); it forms
its batch only once granted, so what arrived while it waited goes with it. When a device
frees, `choose` picks among the engines that have work waiting:

1. **fair by device time** (start-time fair queuing): each share carries a virtual finish
   tag, its device seconds so far over its weight; an engine that comes back from idle
   starts at the scheduler's virtual time, so idleness banks no credit. The lowest start
   tag goes next: an engine flooded with work gets the device in turns with the others,
   each turn one batch, and a flood on one model cannot starve another;
2. **deadlines reorder within about one batch of fairness**: an engine whose earliest
   deadline would pass if it waited behind the fair choice's batch, and that can still
   make it, goes first, provided its start tag is within both batches' time of the fair
   choice's (so deadlines cannot be used to take more than a batch's share);
3. ties go to the engine whose oldest item is older;

and before all of these, lanes: engines with interactive work waiting go before those
with only bulk work, unless the bulk lane has had less than its share of the device's
recent time (`batcher.lanes`).

And while lighter engines are active (work waiting, or a batch within the last
`ACTIVE_S`; lighter: less than half as many tokens queued), a granted batch is given a
budget: half the longest of their usual batch times. The engine sizes its batch to fit
it (by its learned cost), so that a model flooded with long work does not hold the
device for a whole large batch while another model's request waits behind it: a batch
cannot be interrupted once it runs, so its length is the wait it imposes.

`choose` is pure (plain numbers in, a claim out), tested on virtual time. The scheduler
around it grants at most one batch per device at a time. An engine chosen while its
dispatch task is elsewhere gets the device reserved and is woken; it dispatches at once.
Touched only on the event-loop thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from batcher.config import EngineConfig
from batcher.cost import LinearCost
from batcher.items import PendingItem
from batcher.lanes import LaneUsage, next_lane
from batcher.metrics import Totals
from batcher.padding import bucket_length


@dataclass(frozen=True, slots=True)
class Claim:
    """What one engine's waiting work asks of the device now."""

    share: int
    """The share's index in its scheduler."""
    start: float
    """Its virtual start tag: its finish tag, raised to the scheduler's virtual time."""
    batch_s: float
    """Expected device seconds of its next batch (0.0 while unknown)."""
    oldest: float
    """When its oldest waiting item was admitted (engine clock)."""
    deadline: float | None
    """The earliest deadline among its waiting items; None when none has one."""
    interactive: bool = True
    """Whether interactive items are among its waiting ones (else only bulk)."""


def choose(claims: Sequence[Claim], now: float) -> Claim:
    """The claim whose engine gets the free device (see the module's rules)."""
    if not claims:
        raise ValueError("choose needs at least one claim")
    fair = min(claims, key=lambda c: (c.start, c.oldest))
    urgent = [
        c
        for c in claims
        if c is not fair
        and c.deadline is not None
        and now + c.batch_s <= c.deadline < now + fair.batch_s + c.batch_s
        and c.start - fair.start <= fair.batch_s + c.batch_s
    ]
    if urgent:
        return min(urgent, key=lambda c: (c.deadline, c.oldest))
    return fair


@dataclass(frozen=True, slots=True)
class Waiting:
    """An engine's waiting work, as its share reads it when the scheduler chooses."""

    batch_s: float
    oldest: float
    deadline: float | None
    interactive: bool = True
    backlog: int = 0
    """Tokens queued (among the first `DEADLINE_SCAN` items): how heavy its work is now."""


DEADLINE_SCAN = 256
"""Queued items, oldest first, whose deadlines the scheduler weighs (a bound on the work
per choice; later items reach a device after these anyway)."""


def waiting_work(
    queue: Sequence[PendingItem[Any, Any]], max_batch_size: int, rate: float | None
) -> Waiting | None:
    """What a queue (oldest first, its head live) asks of the device: its next batch's
    expected device time at `rate` items per second (0.0 while unknown), its oldest
    admission and the earliest deadline among its first `DEADLINE_SCAN` items."""
    if not queue:
        return None
    size = min(len(queue), max_batch_size)
    head = [item for item in islice(queue, DEADLINE_SCAN) if not item.future.done()]
    deadlines = [item.deadline for item in head if item.deadline is not None]
    return Waiting(
        size / rate if rate else 0.0,
        queue[0].enqueued_at,
        min(deadlines) if deadlines else None,
        any(not item.bulk for item in head),
        sum(item.cost for item in head),
    )


def size_within(
    budget_s: float,
    cost: LinearCost | None,
    queue: Sequence[PendingItem[Any, Any]],
    totals: Totals | None = None,
) -> int | None:
    """The batch size whose items take about `budget_s` of device time beyond the fixed
    cost every batch pays (by the learned `cost`, at the oldest item's length), else
    whose batch takes `budget_s` at the items per second computed so far (`totals`); at
    least 1. None (no cut) before anything is known, and where a batch costs the same
    whatever its size."""
    if cost is not None and queue:
        per_item = cost.per_token_s * bucket_length(queue[0].cost)
        if per_item <= 0:
            return None
        return max(1, round(budget_s / per_item))
    if totals is None:
        return None
    items = sum(size * count for size, count in totals.batch_sizes.items())
    if not items or totals.compute_s <= 0:
        return None
    return max(1, round(budget_s * items / totals.compute_s))


ACTIVE_S = 10.0
"""An engine whose last batch ended this recently counts as active: its next request is
likely on the way, and a batch of another model should not make it wait long. Requests
arriving a few a second leave gaps of over a second often enough (one in twenty at three
a second) that a shorter memory let a flood's full batch in front of them."""
BUDGET_SHARE = 0.5
"""A batch granted while other engines are active takes about this share of their usual
batch time: each of their requests then waits at most half a batch of theirs more than
alone."""
LIGHTER = 0.5
"""A share with less than this much of another's queued tokens is the lighter one, whose
requests the other's batches are cut for."""
BATCH_DECAY = 0.8
"""Weight kept by the past in a share's usual batch time, at each batch."""


class Grant:
    """A device, held for one batch from the moment it is granted; `release` it when
    the batch is done. The holder is charged the seconds in between."""

    __slots__ = ("_released", "_share", "budget_s", "bulk", "device", "granted_at", "start")

    def __init__(
        self, share: DeviceShare, device: int, start: float, budget_s: float | None
    ) -> None:
        self._share = share
        self.device = device
        """The device's index (the replica of that index runs the batch)."""
        self.start = start
        self.budget_s = budget_s
        """Device seconds the batch should fit in, while other engines are active; None
        when none is."""
        self.granted_at = share._scheduler.clock()
        self.bulk = False
        """Whether the batch formed on it is of the bulk lane (the engine says)."""
        self._released = False

    def limits(
        self, limits: EngineConfig, cost: LinearCost | None, queue: Sequence[PendingItem[Any, Any]],
        totals: Totals,
    ) -> EngineConfig:  # fmt: skip
        """`limits` with the batch size cut to fit the budget (`size_within`)."""
        if self.budget_s is None:
            return limits
        size = size_within(self.budget_s, cost, queue, totals)
        if size is None or size >= limits.max_batch_size:
            return limits
        return limits.replace(max_batch_size=size)

    def release(self, *, used: bool = True) -> None:
        """The batch is done (`used=False`: none was formed); the next engine may go.
        Once; later calls do nothing."""
        if self._released:
            return
        self._released = True
        held_s = self._share._scheduler.clock() - self.granted_at if used else 0.0
        self._share._released(self, held_s)


class DeviceShare:
    """One engine's place in a `DeviceScheduler`; made by `DeviceScheduler.join`."""

    def __init__(
        self,
        scheduler: DeviceScheduler,
        index: int,
        name: str,
        weight: float,
    ) -> None:
        self._scheduler = scheduler
        self.index = index
        self.name = name
        self.weight = weight
        self.finish = 0.0
        """Virtual finish tag: device seconds granted so far over the weight, counted
        from where the share last came back from idle."""
        self.device_s = 0.0
        """Device seconds its batches held a device, in all."""
        self.batches = 0
        self.batch_s = 0.0
        """Its usual batch time (recent batches weigh most); 0.0 before the first."""
        self.active_until = float("-inf")
        """Until when it counts as active since its last batch (scheduler clock)."""
        self.waiting: Callable[[], Waiting | None] = lambda: None
        """Set by the engine (`bind`): its waiting work now, or None when it has none."""
        self._wake: Callable[[], None] = lambda: None
        self._waiter: asyncio.Future[Grant] | None = None
        self.reserved: Grant | None = None
        """A device chosen for this engine while it was not asking: its next `turn`."""

    def bind(self, waiting: Callable[[], Waiting | None], wake: Callable[[], None]) -> None:
        """The engine tells how to read its waiting work and how to wake its dispatcher."""
        self.waiting = waiting
        self._wake = wake

    async def turn(self) -> Grant:
        """Wait until this engine may run a batch on a device; the caller forms the
        batch then and must `release` the grant when it is done."""
        if self.reserved is not None:
            grant, self.reserved = self.reserved, None
            return grant
        waiter: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self._scheduler._hand_out()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                waiter.result().release(used=False)
            raise
        finally:
            if self._waiter is waiter:
                self._waiter = None

    def holds(self, queued: int) -> bool:
        """Whether a device is reserved for this engine's `queued` items; a reservation
        made for work that has gone since is given back unused."""
        if self.reserved is not None and not queued:
            grant, self.reserved = self.reserved, None
            grant.release(used=False)
        return self.reserved is not None

    def _granted(self, grant: Grant) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(grant)
        else:
            self.reserved = grant
            self._wake()

    def _released(self, grant: Grant, device_s: float) -> None:
        self.device_s += device_s
        if device_s > 0:
            now = self._scheduler.clock()
            self._scheduler.lanes.add("bulk" if grant.bulk else "interactive", device_s, now)
        self.finish = grant.start + device_s / self.weight
        if device_s > 0:
            self.batches += 1
            first = self.batches == 1
            self.batch_s = (
                device_s if first else BATCH_DECAY * self.batch_s + (1 - BATCH_DECAY) * device_s
            )
            self.active_until = self._scheduler.clock() + ACTIVE_S
        self._scheduler._freed(grant.device)


class DeviceScheduler:
    """The devices that several engines share: `devices` of them, one batch each at a
    time. `clock` is the engines' clock (deadlines and admission times are on it)."""

    def __init__(self, devices: int = 1, clock: Callable[[], float] | None = None) -> None:
        if devices < 1:
            raise ValueError(f"devices must be >= 1, got {devices}")
        self.clock = clock if clock is not None else time.perf_counter
        self._free = [True] * devices
        self._virtual = 0.0
        """The start tag of the batch granted last: where an engine back from idle starts."""
        self.lanes = LaneUsage()
        """The device time each lane had of late, over every engine."""
        self.shares: list[DeviceShare] = []

    def join(self, name: str, weight: float = 1.0) -> DeviceShare:
        """A share for one engine; `weight` scales its share of device time."""
        if weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        share = DeviceShare(self, len(self.shares), name, weight)
        self.shares.append(share)
        return share

    def leave(self, share: DeviceShare) -> None:
        """`share`'s engine has stopped (its model was unloaded): it is chosen no more,
        and a device held for it is given back."""
        if share.reserved is not None:
            grant, share.reserved = share.reserved, None
            grant.release(used=False)
        self.shares.remove(share)
        for index, left in enumerate(self.shares):
            left.index = index

    @property
    def virtual_time(self) -> float:
        return self._virtual

    def _freed(self, device: int) -> None:
        self._free[device] = True
        self._hand_out()

    def _hand_out(self) -> None:
        """Give each free device to the engine `choose` picks, while any has work."""
        while True in self._free:
            now = self.clock()
            claims = []
            backlog: dict[int, int] = {}
            for share in self.shares:
                if share.reserved is not None:
                    continue
                waiting = share.waiting()
                backlog[share.index] = 0 if waiting is None else waiting.backlog
                if waiting is None:
                    if share._waiter is None:
                        continue
                    waiting = Waiting(0.0, now, None)  # asks with nothing left: let it see
                start = max(share.finish, self._virtual)
                claims.append(Claim(share.index, start, waiting.batch_s, waiting.oldest,
                                    waiting.deadline, waiting.interactive))  # fmt: skip
            if not claims:
                return
            chosen = choose(in_lane(claims, self.lanes.bulk_share(now)), now)
            device = self._free.index(True)
            self._free[device] = False
            self._virtual = chosen.start
            share = self.shares[chosen.share]
            budget = budget_s(share, self.shares, backlog, now)
            share._granted(Grant(share, device, chosen.start, budget))


def in_lane(claims: list[Claim], bulk_share: float) -> list[Claim]:
    """The claims the next grant is chosen among: those with interactive work, unless
    none has any or the bulk lane is owed its share (`batcher.lanes.next_lane`); then
    those with only bulk work (all of them, where every engine has both)."""
    interactive = [c for c in claims if c.interactive]
    bulk_only = [c for c in claims if not c.interactive]
    if next_lane(bool(interactive), bool(bulk_only), bulk_share) == "bulk":
        return bulk_only
    return interactive or claims


def budget_s(
    share: DeviceShare, shares: Sequence[DeviceShare], backlog: dict[int, int], now: float
) -> float | None:
    """The batch budget of `share`'s grant: `BUDGET_SHARE` of the longest usual batch
    time among the lighter shares that are active (work waiting, or a batch in the last
    `ACTIVE_S`); None when there is none, or none has run a batch yet. Lighter: less work
    queued (`backlog`, tokens) than `LIGHTER` of this share's, so a flood's batches are
    cut for a light model's requests, never the light model's for the flood, and equals
    keep full batches."""
    heavy = backlog.get(share.index, 0)
    times = [
        other.batch_s
        for other in shares
        if other is not share
        and other.batch_s > 0
        and (backlog.get(other.index, 0) > 0 or other.active_until > now)
        and backlog.get(other.index, 0) < LIGHTER * heavy
    ]
    return BUDGET_SHARE * max(times) if times else None
