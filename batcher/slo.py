"""Holding a latency target: the SLO controller. Pure: no asyncio, no clock of its own.

With `slo_p99_ms` set, the engine hands the controller the latency of every computed item
(admission to result: queue wait plus device time, what the batching limits control) and,
after each batch, asks whether a window is complete and what the limits should be now.

The controller moves along a ladder of (max_batch_size, max_wait_ms) from the operator's
own settings, rung 0, the most throughput the operator allows, to the tightest, batches of
one with no wait: first the window halves down to 0, then the batch size halves down to 1.
It never goes above the operator's settings, so no new shape needs warming up.

Each judged window (at least `window_s` long and holding at least `min_items` latencies):

1. the queue grew by more than a batch over the window (arrivals beyond what the devices
   drain): smaller batches would only serve less, so step one rung looser (`back_off`)
   and bar the rung left from being tried again for a cooldown; at rung 0, hold;
2. p99 over the target, but made by a backlog: the p99 queue wait is beyond what the
   window and the batch ahead explain (`max_wait_ms` + 2 x the p99 device time of a
   batch), so the devices are saturated and tightening would only serve less: as in 1;
3. p99 over the target: one rung tighter (`tighten`), and bar the rung left from coming
   back for a cooldown; at the tightest rung, the target cannot be met by batching: return
   to rung 0 (`back_off`), where the most is served, and bar tightening for a cooldown;
   likewise when the next tighter rung saturated the devices recently (it is barred);
4. p99 under `headroom` x target: one rung looser (`loosen`), unless that rung is barred;
5. otherwise hold.

A rung's cooldown doubles each time it is barred again (up to `max_cooldown_windows`), so
the controller probes a rung that failed ever more rarely: it settles instead of
oscillating between two neighbours. Latencies from before a change are dropped: each
window judges one setting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["tighten", "loosen", "back_off"]
ACTIONS: tuple[Action, ...] = ("tighten", "loosen", "back_off")

MIN_WAIT_STEP_MS = 1.0
"""Below this the window is not halved again but set to 0."""


@dataclass(frozen=True, slots=True)
class SloConfig:
    """How the controller judges: `target_p99_ms`, over windows of at least `window_s`
    seconds and `min_items` items; it loosens only under `headroom` x target; a barred
    rung waits `cooldown_windows` windows (doubling up to `max_cooldown_windows`)."""

    target_p99_ms: float
    window_s: float = 2.0
    min_items: int = 50
    headroom: float = 0.7
    cooldown_windows: int = 10
    max_cooldown_windows: int = 160

    def __post_init__(self) -> None:
        if not self.target_p99_ms > 0:
            raise ValueError(f"slo_p99_ms must be > 0, got {self.target_p99_ms}")
        if not self.window_s > 0:
            raise ValueError(f"the SLO window must be > 0 s, got {self.window_s}")
        if self.min_items < 1:
            raise ValueError(f"the SLO window needs >= 1 item, got {self.min_items}")
        if not 0 < self.headroom < 1:
            raise ValueError(f"the SLO headroom must be in (0, 1), got {self.headroom}")
        if not 1 <= self.cooldown_windows <= self.max_cooldown_windows:
            raise ValueError("the SLO cooldown must be >= 1 window and <= its maximum")


@dataclass(frozen=True, slots=True)
class Rung:
    """One setting the controller may choose."""

    max_batch_size: int
    max_wait_ms: float


def ladder(max_batch_size: int, max_wait_ms: float, *, steer_wait: bool = True) -> tuple[Rung, ...]:
    """The rungs from the operator's settings (first) to the tightest (last). Without
    `steer_wait` (the window changes nothing: `adaptive` where no batch waits ready
    behind a busy device) only the batch size moves."""
    rungs = [Rung(max_batch_size, max_wait_ms)]
    wait = max_wait_ms
    while steer_wait and wait > 0:
        wait = wait / 2 if wait / 2 >= MIN_WAIT_STEP_MS else 0.0
        rungs.append(Rung(max_batch_size, wait))
    size = max_batch_size
    while size > 1:
        size //= 2
        rungs.append(Rung(size, wait))
    return tuple(rungs)


@dataclass(frozen=True, slots=True)
class Adjustment:
    """A change of rung, and why."""

    action: Action
    rung: Rung
    reason: str


@dataclass(frozen=True, slots=True)
class Judged:
    """What the last complete window measured: the p99 of queue plus device time, of
    the queue wait alone and of the device time alone (milliseconds)."""

    p99_ms: float
    items: int
    queue_growth: int
    queue_p99_ms: float = 0.0
    device_p99_ms: float = 0.0


@dataclass(slots=True)
class _Window:
    started_at: float
    queue_depth: int
    latencies_s: list[float] = field(default_factory=list)
    queue_waits_s: list[float] = field(default_factory=list)
    device_s: list[float] = field(default_factory=list)


class SloController:
    """Chooses the rung of `ladder(max_batch_size, max_wait_ms)` that holds the target
    while serving the most. Feed it with `record`; call `judge` after each batch."""

    def __init__(
        self,
        config: SloConfig,
        max_batch_size: int,
        max_wait_ms: float,
        now: float,
        *,
        steer_wait: bool = True,
    ) -> None:
        self.config = config
        self.rungs = ladder(max_batch_size, max_wait_ms, steer_wait=steer_wait)
        self.index = 0
        self.last: Adjustment | None = None
        self.judged: Judged | None = None
        self.adjustments = 0
        self._window = _Window(now, 0)
        self._windows = 0
        self._no_loosen = _Bars(config)
        """Rungs that missed the target: not loosened into until their cooldown ends."""
        self._no_tighten = _Bars(config)
        """Rungs that overloaded (or the tightest missed): not tightened into."""

    @property
    def rung(self) -> Rung:
        return self.rungs[self.index]

    def record(
        self, latencies_s: Iterable[float], queue_waits_s: Iterable[float] = (), device_s: float = 0
    ) -> None:
        """Items computed just now: their latencies (seconds, admission to result), their
        queue waits, and the device time of their batch."""
        window = self._window
        window.latencies_s.extend(latencies_s)
        window.queue_waits_s.extend(queue_waits_s)
        window.device_s.append(device_s)

    def judge(self, now: float, queue_depth: int) -> Adjustment | None:
        """If the window is complete, judge it and start the next: the new rung, or None
        to keep this one. `queue_depth`: items waiting now."""
        window, config = self._window, self.config
        if now - window.started_at < config.window_s or len(window.latencies_s) < config.min_items:
            return None
        self._windows += 1
        p99_ms = _p99(window.latencies_s) * 1e3
        growth = queue_depth - window.queue_depth
        queue_ms = _p99(window.queue_waits_s) * 1e3 if window.queue_waits_s else 0.0
        device_ms = _p99(window.device_s) * 1e3
        judged = Judged(p99_ms, len(window.latencies_s), growth, queue_ms, device_ms)
        self.judged = judged
        self._window = _Window(now, queue_depth)
        adjustment = self._decide(judged, queue_depth)
        if adjustment is not None:
            self.index = self.rungs.index(adjustment.rung)
            self.last = adjustment
            self.adjustments += 1
        return adjustment

    def _decide(self, judged: Judged, queue_depth: int) -> Adjustment | None:
        target, here, last = self.config.target_p99_ms, self.index, len(self.rungs) - 1
        ceiling = self.rungs[0].max_batch_size
        p99_ms, growth = judged.p99_ms, judged.queue_growth
        measured = f"p99 {p99_ms:.1f} ms (target {target:g} ms)"
        explained_ms = self.rung.max_wait_ms + 2 * judged.device_p99_ms + 1.0
        saturated = None
        if growth > ceiling and queue_depth > ceiling:
            saturated = f"the queue grew by {growth} items in the window"
        elif p99_ms > target and judged.queue_p99_ms > explained_ms:
            saturated = (
                f"queue wait p99 {judged.queue_p99_ms:.1f} ms is a backlog, beyond the "
                f"window and the batch ahead ({explained_ms:.1f} ms)"
            )
        if saturated is not None:
            if here == 0:
                return None  # saturated at the operator's settings: nothing to gain
            self._no_tighten.bar(here, self._windows)
            return self._to(
                here - 1,
                "back_off",
                f"{saturated}: the devices are saturated and {self._name(here)} serves "
                f"less; {measured}",
            )
        if p99_ms > target:
            if here == last or self._no_tighten.barred(here + 1, self._windows):
                if here == 0:
                    return None  # held at the operator's settings for the cooldown
                # The tightest setting, or the next one saturated the devices recently.
                self._no_tighten.bar(1, self._windows)
                return self._to(
                    0,
                    "back_off",
                    f"{measured} even at the tightest setting the devices sustain: "
                    "batching cannot meet the target at this load; serving the most at "
                    "the operator's settings",
                )
            self._no_loosen.bar(here, self._windows)
            return self._to(here + 1, "tighten", measured)
        if p99_ms < self.config.headroom * target and here > 0:
            if self._no_loosen.barred(here - 1, self._windows):
                return None  # looser missed the target recently
            return self._to(here - 1, "loosen", f"{measured}, under {self.config.headroom:g}x")
        return None

    def _to(self, index: int, action: Action, why: str) -> Adjustment:
        return Adjustment(action, self.rungs[index], f"{why}; now {self._name(index)}")

    def _name(self, index: int) -> str:
        rung = self.rungs[index]
        return f"max_batch_size {rung.max_batch_size}, max_wait_ms {rung.max_wait_ms:g}"


class _Bars:
    """Rungs barred for a cooldown (in windows) that doubles with each strike."""

    def __init__(self, config: SloConfig) -> None:
        self._config = config
        self._until: dict[int, int] = {}
        self._strikes: dict[int, int] = {}

    def bar(self, index: int, windows: int) -> None:
        strikes = self._strikes.get(index, 0)
        self._strikes[index] = strikes + 1
        config = self._config
        cooldown = min(config.cooldown_windows * 2**strikes, config.max_cooldown_windows)
        self._until[index] = windows + cooldown

    def barred(self, index: int, windows: int) -> bool:
        return windows < self._until.get(index, 0)


def _p99(values: list[float]) -> float:
    """The nearest-rank 99th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
