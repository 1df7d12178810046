"""The queue: items admitted and not yet handed to a device, oldest first.

The engine owns one. Admission appends to it; only the dispatch task takes batches out
of it (`take`). Items whose callers left, or whose deadline passed, are dropped on the
way out and never computed. Touched only on the event-loop thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

from batcher.config import EngineConfig
from batcher.cost import LinearCost
from batcher.errors import DeadlineExceeded, EngineError, QueueFull
from batcher.fairness import FairShare, Owned, Owner, contested, item_cost, owner_of
from batcher.items import PendingItem, settle_error
from batcher.lanes import LaneUsage, next_lane
from batcher.metrics import EngineMetrics
from batcher.policy import select_batch
from batcher.sharing import size_within

InT = TypeVar("InT")
OutT = TypeVar("OutT")


QUEUE_RESERVE = 0.1
"""The share of the queue kept for tenants under their share of it (`check_room`)."""
RECENT_ITEMS = 256
"""Admitted items whose lengths the policy weighs as the work that keeps arriving..."""
RECENT_S = 10.0
"""...if admitted within this many seconds."""
SHORT_SHARE = 0.1
"""The share of recent admissions at least as short as the length the policy is told is
flowing: one stray short input among long ones does not count as short work."""


class PendingQueue(Generic[InT, OutT]):
    def __init__(self, metrics: EngineMetrics, lanes: LaneUsage | None = None) -> None:
        self._items: deque[PendingItem[InT, OutT]] = deque()
        self._metrics = metrics
        self.lanes = lanes if lanes is not None else LaneUsage()
        """The device time each lane had of late: which lane the next batch is from."""
        self.fair = FairShare()
        """The tenants' virtual clocks: whose items the next batch holds."""
        self._recent: deque[tuple[float, int]] = deque(maxlen=RECENT_ITEMS)
        """(admitted at, cost) of the last admissions."""

    def __len__(self) -> int:
        return len(self._items)

    @property
    def items(self) -> deque[PendingItem[InT, OutT]]:
        """Oldest first; for the policy to read. Change it only through this class."""
        return self._items

    def check_room(self, n: int, max_size: int, owner: Owner | None = None) -> None:
        """Raise QueueFull (and count it) unless `n` more items fit in `max_size`; and,
        for a tenant's items (`owner`), unless they fit its share: the last
        `QUEUE_RESERVE` of the queue takes only the items of a tenant that holds at most
        its weighted share of the rest (among the tenants with items queued, and it), so
        that one tenant's flood cannot fill the queue and refuse everyone else."""
        if len(self._items) + n > max_size:
            self._items = deque(item for item in self._items if not item.future.done())
            if len(self._items) + n > max_size:
                self._metrics.count("rejected_full", n)
                raise QueueFull(len(self._items), max_size)
        rest = (1 - QUEUE_RESERVE) * max_size
        if owner is None or len(self._items) + n <= rest:
            return
        held = 0
        weights = {owner.tenant: owner.weight}
        for item in self._items:
            if item.future.done():
                continue
            mine = owner_of(item)
            weights[mine.tenant] = mine.weight
            held += mine.tenant == owner.tenant
        if held + n > rest * owner.weight / sum(weights.values()):
            self._metrics.count("rejected_full", n)
            raise QueueFull(len(self._items), max_size, owner.tenant)

    def extend(self, items: Iterable[PendingItem[InT, OutT]]) -> None:
        for item in items:
            self._items.append(item)
            self._recent.append((item.enqueued_at, item.cost))

    def recent_short(self, now: float) -> int | None:
        """The length that `SHORT_SHARE` of the items admitted in the last `RECENT_S`
        seconds are at most (None when there were none)."""
        while self._recent and self._recent[0][0] < now - RECENT_S:
            self._recent.popleft()
        if not self._recent:
            return None
        costs = sorted(cost for _, cost in self._recent)
        return costs[int(SHORT_SHARE * (len(costs) - 1))]

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest item still waiting has waited at `now`; 0.0 when none."""
        for item in self._items:  # settled ones at the head are dropped lazily
            if not item.future.done():
                return max(0.0, now - item.enqueued_at)
        return 0.0

    def drop_settled_head(self) -> None:
        """Forget items at the front whose futures are done, so the policy sees a live
        oldest item."""
        while self._items and self._items[0].future.done():
            self._items.popleft()

    def wanted(self, item: PendingItem[InT, OutT], now: float) -> bool:
        """False, and the item settled, when it must not be computed: its caller stopped
        waiting, or its deadline passed."""
        if item.future.done():
            return False
        if item.deadline is not None and now >= item.deadline:
            settle_error(item.future, DeadlineExceeded("the deadline passed in the queue"))
            self._metrics.count("expired")
            return False
        return True

    def take(
        self, now: float, limits: EngineConfig, cost: LinearCost | None
    ) -> list[PendingItem[InT, OutT]]:
        """Remove and return the next batch (`policy.select_batch`), dropping the items
        no longer wanted; each item left behind older than one of its tenant's taken is
        overtaken once more. The batch is all of one lane: interactive, unless none waits
        or the bulk lane is owed its share (`batcher.lanes.next_lane`). While several
        tenants have work, the lane is the one the tenant next in fair order would use,
        and the batch is chosen among the lane's first items in fair order
        (`batcher.fairness`), as many as a batch may hold, led by the first of them: the
        input most owed goes, whatever its length (led by the longest-waiting, it could
        lose its place to inputs of closer lengths batch after batch)."""
        live = [item for item in self._items if self.wanted(item, now)]
        size = limits.max_batch_size

        def unit(item: Owned) -> float:
            return item_cost(item.cost, size, cost)

        self.fair.measure(cost is not None)
        fair = contested(live)
        pool = live
        if fair:  # the lane of the tenant a fair server would serve next
            lead = owner_of(live[self.fair.order(live, unit, 1)[0]]).tenant
            pool = [item for item in live if owner_of(item).tenant == lead]
        bulk = next_lane(any(not item.bulk for item in pool), any(item.bulk for item in pool),
                         self.lanes.bulk_share(now)) == "bulk"  # fmt: skip
        lane = [i for i, item in enumerate(live) if item.bulk == bulk]
        lead_at: float | None = now
        if fair:  # the lane's first inputs in fair order; the first of them leads
            lane = [lane[j] for j in self.fair.order([live[i] for i in lane], unit, size)]
            lead_at = None  # `select_batch` then leads with the first it is given
        budget = self.lanes.bulk_budget_s(now) if bulk else None
        if budget is not None and (fit := size_within(budget, cost, [live[lane[0]]])):
            limits = limits.replace(max_batch_size=min(fit, limits.max_batch_size))
        pending = [live[i] for i in lane]
        picked = select_batch(pending, limits, cost, lead_at, self.recent_short(now))
        chosen = sorted(lane[j] for j in picked)
        batch = [live[i] for i in chosen]
        self.fair.charge(batch, lambda item: item_cost(item.cost, len(batch), cost))
        youngest = {owner_of(item).tenant: i for i, item in zip(chosen, batch, strict=True)}
        taken = set(chosen)
        kept: deque[PendingItem[InT, OutT]] = deque()
        for i, item in enumerate(live):
            if i in taken:
                continue
            if item.bulk == bulk and i < youngest.get(owner_of(item).tenant, -1):
                item.overtaken += 1
            kept.append(item)
        self._items = kept
        return batch

    def fail_all(self, error: EngineError) -> None:
        while self._items:
            settle_error(self._items.popleft().future, error)
