"""The two lanes, interactive and bulk: which one the next batch comes from.

Interactive items (someone waits for them) go first; bulk items (a job that only needs
them done) go when no interactive item waits, and, so that a bulk job always progresses,
also whenever the bulk lane has had less than `BULK_SHARE` of the device's recent time
while both lanes had work. Recent: each second counts less as it ages (`DECAY_S`).
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


def next_lane(interactive_waits: bool, bulk_waits: bool, bulk_share: float) -> Lane:
    """The lane the next batch comes from (`bulk_share`: the bulk lane's share of the
    device's recent time)."""
    if bulk_waits and (not interactive_waits or bulk_share < BULK_SHARE):
        return "bulk"
    return "interactive"


@dataclass
class LaneUsage:
    """Device seconds each lane had of late (decayed), for `next_lane`."""

    decay_s: float = DECAY_S
    _seconds: dict[Lane, float] = field(default_factory=lambda: {"interactive": 0.0, "bulk": 0.0})
    _at: float = 0.0

    def _age(self, now: float) -> None:
        factor = math.exp(-(now - self._at) / self.decay_s) if now > self._at else 1.0
        for lane in self._seconds:
            self._seconds[lane] *= factor
        self._at = max(self._at, now)

    def add(self, lane: Lane, seconds: float, now: float) -> None:
        self._age(now)
        self._seconds[lane] += seconds

    def bulk_share(self, now: float) -> float:
        """The bulk lane's share of the recent device time (1.0 when there was none, so
        that an idle history owes bulk nothing)."""
        self._age(now)
        total = self._seconds["interactive"] + self._seconds["bulk"]
        return 1.0 if total <= 0 else self._seconds["bulk"] / total
