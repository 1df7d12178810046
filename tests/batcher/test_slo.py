"""The SLO controller: pure decisions first, then the real engine holding a target on
virtual time (looptime) with fake devices whose cost per batch is known."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from batcher import Engine, EngineConfig
from batcher.slo import Rung, SloConfig, SloController, ladder

CONFIG = SloConfig(target_p99_ms=30, window_s=1.0, min_items=10, cooldown_windows=3)


def controller(max_batch_size: int = 32, max_wait_ms: float = 50) -> SloController:
    return SloController(CONFIG, max_batch_size, max_wait_ms, now=0.0)


def window(slo: SloController, now: float, latency_ms: float, queue_depth: int = 0):  # type: ignore[no-untyped-def]
    """Feed one window of identical latencies, then judge it."""
    slo.record([latency_ms / 1e3] * CONFIG.min_items)
    return slo.judge(now, queue_depth)


def test_the_ladder_halves_the_window_to_zero_then_the_batch_to_one() -> None:
    waits = [50, 25, 12.5, 6.25, 3.125, 1.5625, 0]
    assert ladder(32, 50) == (
        *(Rung(32, w) for w in waits),
        *(Rung(b, 0.0) for b in (16, 8, 4, 2, 1)),
    )
    assert ladder(1, 0) == (Rung(1, 0.0),)


def test_where_the_window_changes_nothing_only_the_batch_size_moves() -> None:
    """`adaptive` on a CPU: no batch waits ready behind the busy device, so `max_wait_ms`
    is never steered (halving it would spend judged windows on nothing)."""
    assert ladder(32, 50, steer_wait=False) == tuple(Rung(b, 50) for b in (32, 16, 8, 4, 2, 1))


def test_a_window_is_judged_only_once_it_is_long_enough_and_holds_enough_items() -> None:
    slo = controller()
    slo.record([1.0] * (CONFIG.min_items - 1))
    assert slo.judge(5.0, 0) is None
    assert slo.judged is None, "too few items: the window goes on"
    slo.record([1.0])
    assert slo.judge(0.5, 0) is None, "too short"
    assert slo.judge(5.0, 0) is not None


def test_over_the_target_it_tightens_one_step_and_in_the_band_it_holds() -> None:
    slo = controller()
    change = window(slo, 1.0, latency_ms=55)
    assert change is not None
    assert change.action == "tighten"
    assert change.rung == Rung(32, 25)
    assert "p99 55.0 ms (target 30 ms)" in change.reason
    assert window(slo, 2.0, latency_ms=25) is None, "under the target, above the headroom"
    assert slo.rung == Rung(32, 25)
    assert slo.judged is not None
    assert slo.judged.p99_ms == pytest.approx(25)


def test_a_step_that_missed_the_target_is_not_loosened_into_until_its_cooldown_ends() -> None:
    slo = controller()
    window(slo, 1.0, latency_ms=55)  # 50 ms missed: now 25 ms, and 50 ms barred
    now = 1.0
    held = []
    while (change := window(slo, now := now + 1, latency_ms=5)) is None:
        held.append(now)
    assert change.action == "loosen"
    assert change.rung == Rung(32, 50)
    assert len(held) == CONFIG.cooldown_windows - 1
    # It misses again: the bar is twice as long this time.
    window(slo, now := now + 1, latency_ms=55)
    held = []
    while window(slo, now := now + 1, latency_ms=5) is None:
        held.append(now)
    assert len(held) == 2 * CONFIG.cooldown_windows - 1


def test_a_growing_queue_backs_off_one_step_and_bars_tightening_into_it() -> None:
    slo = controller(max_batch_size=8, max_wait_ms=0)  # steps: 8, 4, 2, 1
    window(slo, 1.0, latency_ms=55)
    assert slo.rung == Rung(4, 0.0)
    change = window(slo, 2.0, latency_ms=55, queue_depth=40)
    assert change is not None
    assert change.action == "back_off"
    assert change.rung == Rung(8, 0.0)
    assert "the queue grew by 40 items" in change.reason
    # Still over the target, but the tighter step overloaded: hold instead of retrying.
    assert window(slo, 3.0, latency_ms=55, queue_depth=40) is None
    assert slo.rung == Rung(8, 0.0)


def test_a_backlog_behind_busy_devices_is_not_answered_with_smaller_batches() -> None:
    slo = controller()
    window(slo, 1.0, latency_ms=55)
    assert slo.rung == Rung(32, 25)
    # Items waited 300 ms: far beyond a 25 ms window and two 10 ms batches ahead.
    slo.record([0.310] * CONFIG.min_items, [0.300] * CONFIG.min_items, device_s=0.010)
    change = slo.judge(2.0, 0)
    assert change is not None
    assert change.action == "back_off"
    assert change.rung == Rung(32, 50)
    assert "is a backlog" in change.reason
    slo.record([0.310] * CONFIG.min_items, [0.300] * CONFIG.min_items, device_s=0.010)
    assert slo.judge(3.0, 0) is None, "at the configured limits a backlog changes nothing"
    # A wait the window explains is the window's: tighten.
    slo.record([0.055] * CONFIG.min_items, [0.045] * CONFIG.min_items, device_s=0.010)
    assert slo.judge(4.0, 0) is None, "tightening into 25 ms is barred for its cooldown"


def test_at_the_operators_limits_an_overload_changes_nothing() -> None:
    slo = controller()
    assert window(slo, 1.0, latency_ms=500, queue_depth=500) is None
    assert slo.rung == Rung(32, 50)


def test_when_even_the_tightest_step_misses_it_goes_back_to_the_operators_limits() -> None:
    slo = controller(max_batch_size=2, max_wait_ms=0)  # steps: 2, 1
    window(slo, 1.0, latency_ms=55)
    assert slo.rung == Rung(1, 0.0)
    change = window(slo, 2.0, latency_ms=55)
    assert change is not None
    assert change.action == "back_off"
    assert change.rung == Rung(2, 0.0)
    assert "cannot meet the target" in change.reason
    for now in (3.0, 4.0):
        assert window(slo, now, latency_ms=55) is None, "holds the most throughput"


def test_the_config_is_validated_with_the_bad_value() -> None:
    with pytest.raises(ValueError, match="slo_p99_ms must be > 0, got 0"):
        SloConfig(target_p99_ms=0)
    with pytest.raises(ValueError, match=r"slo_p99_ms must be >= 0\.1 or null, got 0"):
        EngineConfig(slo_p99_ms=0)


# -- the engine on virtual time ----------------------------------------------------------


@dataclass
class TimedRunner:
    """A device on the loop's (virtual) clock: a batch of n takes overhead + n x per_item."""

    overhead_s: float
    per_item_s: float
    sizes: list[int] = field(default_factory=list)

    def cost(self, payload: str) -> int:
        return 8

    async def run(self, payloads: Sequence[str]) -> list[str]:
        self.sizes.append(len(payloads))
        await asyncio.sleep(self.overhead_s + self.per_item_s * len(payloads))
        return [p.upper() for p in payloads]


@dataclass
class Trace:
    """Each request's (submitted at, latency) and each live setting as it changed."""

    latencies: list[tuple[float, float]] = field(default_factory=list)
    settings: list[tuple[float, int, float]] = field(default_factory=list)
    failures: int = 0

    def p99_ms(self, since: float = 0.0, until: float = float("inf")) -> float:
        values = sorted(lat for at, lat in self.latencies if since <= at < until)
        return values[max(0, int(0.99 * len(values)) - 1)] * 1e3


async def drive(engine: Engine[str, str], rates: Sequence[tuple[float, float]]) -> Trace:
    """Open-loop Poisson arrivals: `rates` is (requests per second, seconds) phases."""
    trace, rng, loop = Trace(), random.Random(7), asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def one(text: str) -> None:
        at = loop.time()
        try:
            await engine.submit(text)
        except Exception:
            trace.failures += 1
        else:
            trace.latencies.append((at, loop.time() - at))
        config = engine.config
        if not trace.settings or trace.settings[-1][1:] != (
            config.max_batch_size,
            config.max_wait_ms,
        ):
            trace.settings.append((loop.time(), config.max_batch_size, config.max_wait_ms))

    sent = 0
    for rate, seconds in rates:
        end = loop.time() + seconds
        while loop.time() < end:
            await asyncio.sleep(rng.expovariate(rate))  # virtual time: the arrival process
            task = asyncio.create_task(one(f"r{sent}"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
    async with asyncio.timeout(600):
        while tasks:
            await asyncio.wait(set(tasks))
    return trace


def changes_after(trace: Trace, since: float) -> int:
    return sum(1 for at, *_ in trace.settings[1:] if at >= since)


def spells(trace: Trace, end: float) -> list[tuple[float, int, float]]:
    """(seconds, max_batch_size, max_wait_ms) of each stretch on one setting."""
    ends = [at for at, *_ in trace.settings[1:]] + [end]
    return [(stop - at, b, w) for (at, b, w), stop in zip(trace.settings, ends, strict=True)]


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_the_engine_converges_under_the_target_and_stays() -> None:
    """A window policy at 50 ms misses a 30 ms target; the controller finds the window
    that meets it and settles there (a rare probe back up is allowed, an oscillation
    is not)."""
    device = TimedRunner(overhead_s=0.002, per_item_s=0.0002)
    config = EngineConfig(max_batch_size=32, max_wait_ms=50, policy="window", slo_p99_ms=30)
    engine = Engine(device, config, clock=asyncio.get_running_loop().time)
    async with engine:
        start = engine.clock()
        trace = await drive(engine, [(300, 150)])
        stats = engine.stats()
    uncontrolled = Engine(TimedRunner(0.002, 0.0002), config.replace(slo_p99_ms=None),
                          clock=asyncio.get_running_loop().time)  # fmt: skip
    async with uncontrolled:
        baseline = await drive(uncontrolled, [(300, 10)])
    assert trace.failures == 0
    assert baseline.p99_ms() > 50, "without the controller the window alone misses it"
    second_half = start + 75
    assert trace.p99_ms(since=second_half) <= 30
    assert changes_after(trace, second_half) <= 2, trace.settings
    assert stats.slo is not None
    assert stats.slo.rung.max_wait_ms < 30
    assert stats.slo.rung.max_batch_size == 32, "the window was enough; batches stay full"
    assert stats.configured.max_wait_ms == 50
    tightened = engine.metrics.registry.get_sample_value(
        "microbatch_slo_adjustments_total", {"model": "", "action": "tighten"}
    )
    assert tightened is not None
    assert tightened >= 1


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_target_batching_cannot_meet_sends_it_back_to_the_configured_limits() -> None:
    """Every pass takes 40 ms: a 10 ms p99 is out of reach at any setting."""
    device = TimedRunner(overhead_s=0.040, per_item_s=0.0)
    config = EngineConfig(max_batch_size=8, max_wait_ms=4, slo_p99_ms=10)
    async with Engine(device, config, clock=asyncio.get_running_loop().time) as engine:
        trace = await drive(engine, [(20, 120)])
        end = engine.clock()
    assert trace.failures == 0
    backed_off = engine.metrics.registry.get_sample_value(
        "microbatch_slo_adjustments_total", {"model": "", "action": "back_off"}
    )
    assert backed_off is not None
    assert backed_off >= 2
    holds = [seconds for seconds, b, w in spells(trace, end)[1:] if (b, w) == (8, 4)]
    assert len(holds) >= 2  # the last one may be cut short by the end of the run
    assert holds[1] > 1.8 * holds[0], "each retry comes twice as late: no steady cycle"
    configured = sum(seconds for seconds, b, w in spells(trace, end) if (b, w) == (8, 4))
    assert configured > 0.5 * (end - trace.settings[0][0]), "mostly at the most throughput"


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_it_backs_off_a_batch_size_that_cannot_keep_up_and_loses_nothing() -> None:
    """16 ms a pass: batches of 4 serve 244 items/s, below the 300 arriving; the target
    (5 ms) is out of reach, so the controller walks down until the queue grows, then
    steps back and stays where the devices keep up."""
    device = TimedRunner(overhead_s=0.016, per_item_s=0.0001)
    config = EngineConfig(max_batch_size=16, max_wait_ms=2, slo_p99_ms=5)
    async with Engine(device, config, clock=asyncio.get_running_loop().time) as engine:
        start = engine.clock()
        trace = await drive(engine, [(300, 60)])
        stats = engine.stats()
    assert trace.failures == 0
    assert stats.slo is not None
    backed_off = engine.metrics.registry.get_sample_value(
        "microbatch_slo_adjustments_total", {"model": "", "action": "back_off"}
    )
    assert backed_off is not None
    assert backed_off >= 1
    end = engine.clock()
    at_four = sum(seconds for seconds, b, _ in spells(trace, end) if b <= 4)
    assert at_four < 0.15 * (end - start), "batches of 4 only while probing"
    assert stats.queue_depth == 0
