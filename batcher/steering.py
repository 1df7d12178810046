"""The engine's live limits: the configured ones, or, with a latency target
(`slo_p99_ms`), the SLO controller's rung within them (`batcher.slo`).

Runs on the event-loop thread, as the engine does."""

from __future__ import annotations

import logging
from collections.abc import Callable

from batcher.config import EngineConfig
from batcher.metrics import EngineMetrics
from batcher.slo import SloConfig, SloController
from batcher.stats import SloStats

logger = logging.getLogger("batcher.engine")

STEERED = frozenset({"max_batch_size", "max_wait_ms", "slo_p99_ms"})
"""Limits whose change restarts the SLO controller from the new values."""

Observer = Callable[[list[float], list[float], float], None]
"""Told of each computed batch: its items' latencies, their queue waits, device seconds."""


class Steering:
    """Keeps `configured` (as set) and `live` (what the policy uses). `wake` is called
    when the live limits change on their own, so that the dispatcher looks again;
    `queue_depth` tells the controller how much is waiting."""

    def __init__(
        self,
        configured: EngineConfig,
        *,
        clock: Callable[[], float],
        metrics: EngineMetrics,
        queue_depth: Callable[[], int],
        wake: Callable[[], None],
        window_matters: Callable[[EngineConfig], bool] = lambda config: True,
    ) -> None:
        self._window_matters = window_matters
        """Whether `max_wait_ms` changes anything under these limits (not under `adaptive`
        where no batch waits ready behind a busy device): else the controller leaves it."""
        self.configured = configured
        self.live = configured
        self._clock = clock
        self._metrics = metrics
        self._queue_depth = queue_depth
        self._wake = wake
        self._slo: SloController | None = None
        self.set(configured)

    def set(self, configured: EngineConfig, changed: frozenset[str] = STEERED) -> None:
        """New configured limits; the controller restarts from them if any of `changed`
        is one it steers (or stops, without a target)."""
        self.configured = configured
        target = configured.slo_p99_ms
        if target is None:
            self._slo = None
        elif self._slo is None or not changed.isdisjoint(STEERED | {"policy"}):
            self._slo = SloController(
                SloConfig(target), configured.max_batch_size, configured.max_wait_ms,
                self._clock(), steer_wait=self._window_matters(configured),
            )  # fmt: skip
        self.live = self._live_limits()

    @property
    def observer(self) -> Observer | None:
        """What the executor should call per computed batch; None without a target, so
        that it gathers no latencies: nothing on the hot path."""
        return None if self._slo is None else self._observe

    def _live_limits(self) -> EngineConfig:
        if self._slo is None:
            return self.configured
        rung = self._slo.rung
        return self.configured.replace(
            max_batch_size=rung.max_batch_size, max_wait_ms=rung.max_wait_ms
        )

    def _observe(
        self, latencies_s: list[float], queue_waits_s: list[float], device_s: float
    ) -> None:
        slo = self._slo
        assert slo is not None, "latencies are observed only with a target; this is a bug"
        slo.record(latencies_s, queue_waits_s, device_s)
        judged = slo.judged
        adjustment = slo.judge(self._clock(), self._queue_depth())
        if slo.judged is not judged:
            self._metrics.record_slo(slo.judged, adjustment)
        if adjustment is not None:
            self.live = self._live_limits()
            logger.info("slo: %s: %s", adjustment.action.replace("_", " "), adjustment.reason)
            self._wake()

    def stats(self) -> SloStats | None:
        slo = self._slo
        if slo is None:
            return None
        assert self.configured.slo_p99_ms is not None
        return SloStats(
            target_p99_ms=self.configured.slo_p99_ms,
            rung=slo.rung,
            rungs=len(slo.rungs),
            index=slo.index,
            judged=slo.judged,
            last=slo.last,
            adjustments=slo.adjustments,
        )
