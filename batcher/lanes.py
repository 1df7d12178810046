"""The two lanes, interactive and bulk: which one the next batch comes from.

Interactive items (someone waits for them) go first; bulk items (a job that only needs
them done) go when no interactive item waits, and, so that a bulk job always progresses,
also whenever the bulk lane has had less than `BULK_SHARE` of the device's recent time
while both lanes had work. Recent: each second counts less as it ages (`DECAY_S`). And
while interactive work is active, a bulk batch is cut to half an interactive batch's
usual time (`bulk_budget_s`): once it runs it cannot be interrupted, and an interactive
request arriving meanwhile waits for it.
Within a lane the batch forms as `batcher.policy.select_batch` says (the response ratio
leads). Pure arithmetic on an injected clock; touched only on the event-loop thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from batcher.items import Lane

BULK_SHARE = 0.1
"""The least share of the device's recent time the bulk lane keeps while interactive
work waits too."""
DECAY_S = 5.0
"""Time constant of "recent", in seconds."""
ACTIVE_S = 10.0
"""Interactive work counts as active this long after its last batch."""
BUDGET_SHARE = 0.5
"""While interactive work is active, a bulk batch takes about this share of an
interactive batch's usual time (at least one item): a batch cannot be interrupted."""
BATCH_DECAY = 0.8
"""Weight kept by the past in the usual batch time, at each batch."""


def next_lane(interactive_waits: bool, bulk_waits: bool, bulk_share: float) -> Lane:
    """The lane the next batch comes from (`bulk_share`: the bulk lane's share of the
    device's recent time)."""
    if bulk_waits and (not interactive_waits or bulk_share < BULK_SHARE):
        return "bulk"
    return "interactive"


@dataclass
class LaneUsage:
    """Device seconds each lane had of late (decayed), for `next_lane`; and the
    interactive lane's usual batch time and last batch, for `bulk_budget_s`."""

    decay_s: float = DECAY_S
    _seconds: dict[Lane, float] = field(default_factory=lambda: {"interactive": 0.0, "bulk": 0.0})
    _at: float = 0.0
    interactive_batch_s: float = 0.0
    """The interactive lane's usual batch time (recent batches weigh most)."""
    interactive_at: float = float("-inf")
    """When its last batch ran."""

    def bulk_budget_s(self, now: float) -> float | None:
        """While interactive work is active (a batch in the last `ACTIVE_S`), the time a
        bulk batch should fit in: `BUDGET_SHARE` of the interactive lane's usual batch
        time, so that an interactive request arriving meanwhile waits about half a batch
        of its own more than alone; None otherwise (bulk batches as large as they come)."""
        if now - self.interactive_at > ACTIVE_S or self.interactive_batch_s <= 0:
            return None
        return BUDGET_SHARE * self.interactive_batch_s

    def _age(self, now: float) -> None:
        factor = math.exp(-(now - self._at) / self.decay_s) if now > self._at else 1.0
        for lane in self._seconds:
            self._seconds[lane] *= factor
        self._at = max(self._at, now)

    def add(self, lane: Lane, seconds: float, now: float) -> None:
        self._age(now)
        self._seconds[lane] += seconds
        if lane == "interactive":
            first = self.interactive_batch_s == 0.0
            past = BATCH_DECAY * self.interactive_batch_s
            self.interactive_batch_s = seconds if first else past + (1 - BATCH_DECAY) * seconds
            self.interactive_at = now

    def bulk_share(self, now: float) -> float:
        """The bulk lane's share of the recent device time (1.0 when there was none, so
        that an idle history owes bulk nothing)."""
        self._age(now)
        total = self._seconds["interactive"] + self._seconds["bulk"]
        return 1.0 if total <= 0 else self._seconds["bulk"] / total
