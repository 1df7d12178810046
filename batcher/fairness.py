"""Tenants' fair share of one engine's device: start-time fair queuing on virtual time.

Each tenant has a virtual clock, the virtual time its served work has reached: an item
of device cost `c` advances its tenant's clock by `c / weight`. The next batch is filled
in the order a fair server would start the queued items: over and over, the next item
(oldest first) of the tenant whose clock is lowest, its clock advanced as if that item
ran. A tenant that comes back from idle starts at the system's virtual time (the start of
the latest work served), not at its old clock: no credit is saved while away, so an idle
tenant's share goes to the others meanwhile. Pure arithmetic, no clock of its own;
touched only on the event-loop thread.

Invariants, for every order `order` returns and every `charge`:

1. One tenant (or none named): the order is the queue's own; fairness changes nothing.
2. A tenant's own items keep their order among themselves.
3. While tenants stay backlogged, the device cost each is served, divided by its
   weight, differs between any two of them by at most one item's cost over the weight
   plus one batch (start-time fair queuing's bound, with a batch as the service quantum).
4. The state is bounded: a tenant whose clock has fallen to the system's virtual time is
   forgotten (it would restart there anyway).

The cost of an item (`item_cost`) is its share of a batch's device time under the
learned cost (`batcher.cost.LinearCost`): its tokens' time plus its share of the batch
overhead; before anything is learned, its tokens. The engine splits each batch's
measured time among its items by the same measure (`Result.device_s`), so that what a
tenant is charged and what it is shown to have had agree.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from batcher.cost import LinearCost
from batcher.padding import bucket_length


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose an item is, for the fair share: a tenant's name, and its weight (a tenant of
    weight 2 gets twice the device time of a tenant of weight 1 while both wait)."""

    tenant: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"a tenant's weight must be > 0, got {self.weight}")


ANONYMOUS = Owner("")
"""The owner of items submitted without one."""


class Owned(Protocol):
    @property
    def owner(self) -> Owner | None: ...

    @property
    def cost(self) -> int:
        """Length in tokens."""
        ...


def item_cost(tokens: int, batch_size: int, cost: LinearCost | None) -> float:
    """An item's share of a batch's device time: under the learned `cost`, its (bucketed)
    tokens' time plus its share of the batch overhead; without one, its tokens."""
    if cost is None:
        return float(tokens)
    return cost.per_token_s * bucket_length(tokens) + cost.overhead_s / max(1, batch_size)


def owner_of(item: Owned) -> Owner:
    return item.owner if item.owner is not None else ANONYMOUS


def contested(items: Sequence[Owned]) -> bool:
    """Whether more than one tenant has items in `items`."""
    first = None
    for item in items:
        tenant = owner_of(item).tenant
        if first is None:
            first = tenant
        elif tenant != first:
            return True
    return False


class FairShare:
    """The tenants' virtual clocks for one engine."""

    def __init__(self) -> None:
        self.virtual = 0.0
        """The system's virtual time: the start of the latest item served."""
        self._clocks: dict[str, float] = {}
        """Each tenant's virtual finish of its work served so far (only those ahead of
        `virtual`)."""
        self.learned = False
        """Whether the clocks count seconds of a learned cost (else tokens)."""

    def measure(self, learned: bool) -> None:
        """Count in seconds of the learned cost (`learned`) or in tokens from now on. A
        change of unit starts every clock afresh: a lead of thousands of tokens, kept as
        seconds, would take millions of inputs to make up."""
        if learned != self.learned:
            self.learned = learned
            self.virtual = 0.0
            self._clocks.clear()

    def clock(self, tenant: str) -> float:
        """Where `tenant`'s next item would start."""
        return max(self.virtual, self._clocks.get(tenant, self.virtual))

    def order(
        self, items: Sequence[Owned], unit: Callable[[Owned], float], limit: int | None = None
    ) -> list[int]:
        """Indices of `items` (oldest first) in the order a fair server would start them,
        each item's cost given by `unit`: the first `limit` of them (None: all)."""
        limit = len(items) if limit is None else min(limit, len(items))
        queues: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            queues.setdefault(owner_of(item).tenant, []).append(i)
        if len(queues) <= 1:
            return list(range(limit))
        # (start, index of the tenant's next item, tenant, position in its queue); ties
        # go to the older item.
        heap = [(self.clock(t), q[0], t, 0) for t, q in queues.items()]
        heapq.heapify(heap)
        order: list[int] = []
        while heap and len(order) < limit:
            start, i, tenant, at = heapq.heappop(heap)
            order.append(i)
            queue = queues[tenant]
            if at + 1 < len(queue):
                item = items[i]
                finish = start + unit(item) / owner_of(item).weight
                heapq.heappush(heap, (finish, queue[at + 1], tenant, at + 1))
        return order

    def charge(self, served: Sequence[Owned], unit: Callable[[Owned], float]) -> None:
        """Advance the clocks of the tenants whose items `served` went to the device."""
        latest = self.virtual
        for item in served:
            owner = owner_of(item)
            start = self.clock(owner.tenant)
            self._clocks[owner.tenant] = start + unit(item) / owner.weight
            latest = max(latest, start)
        self.virtual = latest
        for tenant in [t for t, c in self._clocks.items() if c <= latest]:
            del self._clocks[tenant]

    def tenants(self) -> dict[str, float]:
        """The tenants ahead of the system's virtual time, and by how much (a gauge of
        who has had more than its share of late)."""
        return {t: c - self.virtual for t, c in self._clocks.items()}
