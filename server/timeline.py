"""The last minutes of the server, one sample a second: what `GET /dashboard` draws.

`Timeline.sample` reads the engine's running totals and the request latencies the
middleware collected since the previous sample, and keeps the difference: items and
refusals per second, exact p50/p99 of the requests that finished, batches by why they
left, their sizes, padding, how busy the devices were, and the live batching limits.
A change of those limits is kept as an event, with the SLO controller's reason when it
made it. Everything runs on the event-loop thread.
"""

from __future__ import annotations

import asyncio
import copy
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from batcher import DISPATCH_REASONS, Engine, EngineStats, Totals

SAMPLE_INTERVAL_S = 1.0
HISTORY_S = 600.0
"""How far back the dashboard can look: ten minutes."""
MAX_LATENCIES = 100_000
"""Request latencies kept between two samples, at most (the newest)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One interval, ending at `t` (Unix seconds): items computed and refused (429:
    queue full or deadline) per second; the engine-bound requests answered and their
    p50/p99; the queue; batches dispatched by why they left and computed by size; the
    live limits and the SLO controller's last window. `GET /dashboard/data` sends these
    as they are."""

    t: float
    items_per_s: float
    rejected_per_s: float
    requests: int
    p50_ms: float | None
    p99_ms: float | None
    queue_depth: int
    oldest_age_ms: float
    in_flight: int
    batches: dict[str, int]
    mean_batch_size: float | None
    batch_sizes: dict[int, int]
    padding_ratio: float | None
    busy_fraction: float
    max_batch_size: int
    max_wait_ms: float
    slo_p99_ms: float | None
    slo_window_p99_ms: float | None


@dataclass(frozen=True, slots=True)
class Event:
    """The batching limits changed at `t`, and why."""

    t: float
    text: str


@dataclass(frozen=True, slots=True)
class Recent:
    """What `GET /dashboard/data` sends of the timeline: the samples and limit changes
    after a time, and how often and how far back it samples."""

    interval_s: float
    history_s: float
    samples: list[Sample]
    events: list[Event]


@dataclass(frozen=True, slots=True)
class _Snapshot:
    at: float
    stats: EngineStats
    totals: Totals
    """A copy of the engine's running totals at `at`."""


@dataclass
class Timeline:
    """Samples `engine` every `interval_s`, keeping `history_s` of them. `latencies` is
    where the middleware appends the seconds each engine-bound request took."""

    engine: Engine[Any, Any]
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_LATENCIES))
    interval_s: float = SAMPLE_INTERVAL_S
    history_s: float = HISTORY_S
    clock: Callable[[], float] = time.time
    samples: deque[Sample] = field(init=False)
    events: deque[Event] = field(init=False)
    _previous: _Snapshot = field(init=False)

    def __post_init__(self) -> None:
        self.samples = deque(maxlen=max(1, math.ceil(self.history_s / self.interval_s)))
        self.events = deque(maxlen=200)
        self._previous = self._snapshot(self.clock())

    def _snapshot(self, now: float) -> _Snapshot:
        return _Snapshot(now, self.engine.stats(), copy.deepcopy(self.engine.metrics.totals))

    def sample(self) -> Sample:
        """Close the interval since the previous sample and keep it."""
        now = self.clock()
        before, after = self._previous, self._snapshot(now)
        self._previous = after
        elapsed = max(after.at - before.at, 1e-9)
        stats, was, new = after.stats, before.totals, after.totals

        def per_s(name: str) -> float:
            return (stats.items[name] - before.stats.items[name]) / elapsed

        latencies = sorted(self.latencies)
        self.latencies.clear()
        sizes = new.batch_sizes - was.batch_sizes
        computed = sum(sizes.values())
        real = new.real_tokens - was.real_tokens
        padded = new.padded_tokens - was.padded_tokens
        alive = max(1, sum(r.alive for r in stats.replicas))
        busy = (new.compute_s - was.compute_s) / (elapsed * alive)
        slo = stats.slo
        sample = Sample(
            t=now,
            items_per_s=per_s("ok"),
            rejected_per_s=per_s("rejected_full") + per_s("rejected_deadline"),
            requests=len(latencies),
            p50_ms=_quantile(latencies, 0.50),
            p99_ms=_quantile(latencies, 0.99),
            queue_depth=stats.queue_depth,
            oldest_age_ms=self.engine.oldest_age() * 1e3,
            in_flight=stats.in_flight,
            batches={r: new.batches[r] - was.batches[r] for r in DISPATCH_REASONS},
            mean_batch_size=sum(s * n for s, n in sizes.items()) / computed if computed else None,
            batch_sizes=dict(sorted(sizes.items())),
            padding_ratio=padded / real if real else None,
            busy_fraction=min(1.0, busy),
            max_batch_size=stats.config.max_batch_size,
            max_wait_ms=stats.config.max_wait_ms,
            slo_p99_ms=stats.config.slo_p99_ms,
            slo_window_p99_ms=slo.judged.p99_ms if slo is not None and slo.judged else None,
        )
        self.samples.append(sample)
        if stats.config != before.stats.config:
            self.events.append(Event(now, _why(after.stats, before.stats)))
        return sample

    def since(self, t: float) -> list[Sample]:
        """The samples taken after `t` (Unix seconds), oldest first."""
        return [s for s in self.samples if s.t > t]

    def recent(self, since: float) -> Recent:
        """The samples and events after `since` (Unix seconds)."""
        events = [e for e in self.events if e.t > since]
        return Recent(self.interval_s, self.history_s, self.since(since), events)

    async def run(self) -> None:
        """Sample every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample()


def _why(now: EngineStats, before: EngineStats) -> str:
    """Who changed the live limits between two snapshots: the SLO controller (with its
    reason), or an operator."""
    slo, config = now.slo, now.config
    changes = before.slo.adjustments if before.slo is not None else 0
    if slo is not None and slo.last is not None and slo.adjustments != changes:
        return f"SLO controller, {slo.last.action.replace('_', ' ')}: {slo.last.reason}"
    limits = f"max_batch_size {config.max_batch_size}, max_wait_ms {config.max_wait_ms:g}"
    target = f", slo_p99_ms {config.slo_p99_ms:g}" if config.slo_p99_ms else ""
    return f"set through PATCH /admin/batching: {limits}, policy {config.policy}{target}"


def _quantile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted seconds, in milliseconds; None when empty."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1e3
