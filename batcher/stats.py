"""What the engine shows of itself: one frozen snapshot (`Engine.stats()`), the only
thing readers outside the engine (routes, `/model`, probes) look at."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from batcher.config import EngineConfig
from batcher.cost import LinearCost
from batcher.slo import Adjustment, Judged, Rung

State = Literal["new", "running", "draining", "closed"]


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    index: int
    alive: bool
    """False once it failed inputs that another replica then computed (out of rotation)."""
    busy: bool


@dataclass(frozen=True, slots=True)
class SloStats:
    """The SLO controller, when `slo_p99_ms` is set."""

    target_p99_ms: float
    rung: Rung
    """The limits it chose (within `configured`)."""
    rungs: int
    index: int
    """0: the configured limits; rungs - 1: batches of one, no wait."""
    judged: Judged | None
    """The last complete window; None until one."""
    last: Adjustment | None
    adjustments: int


@dataclass(frozen=True, slots=True)
class EngineStats:
    state: State
    healthy: bool
    """False once the dispatch task died."""
    config: EngineConfig
    """The live limits."""
    configured: EngineConfig
    """The limits as set (at start and by reconfigure); `config` differs from it only in
    what the SLO controller chose."""
    slo: SloStats | None
    queue_depth: int
    in_flight: int
    """Items on a device now."""
    busy_for_s: float
    """How long the longest-running forward pass has run (0 when idle)."""
    memory_cap_tokens: int | None
    """Padded tokens per batch learned from out-of-memory errors; None until one."""
    learned_cost: LinearCost | None
    """The device's cost per batch, fitted to past batches; None until enough ran."""
    replicas: tuple[ReplicaStats, ...]
    items: Mapping[str, int]
    """Items admitted, and how many ended in each outcome (`batcher.OUTCOMES`)."""
