"""The dashboard's timeline: one sample per interval, from the engine's totals and the
request latencies, on a clock the test moves."""

from __future__ import annotations

import asyncio

import pytest

from batcher import Engine, EngineConfig
from server.timeline import Timeline
from tests.batcher.fakes import GatedRunner, open_runner

pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_sample_holds_the_interval_rates_percentiles_and_batches() -> None:
    clock = Clock()
    runner = open_runner()
    async with Engine(runner, EngineConfig(max_batch_size=4)) as engine:
        timeline = Timeline(engine, clock=clock)
        await asyncio.gather(*(engine.submit(f"x{i}") for i in range(10)))
        timeline.latencies.extend([0.001 * i for i in range(1, 101)])  # 1..100 ms
        clock.now += 2.0
        sample = timeline.sample()
    assert sample.t == 1002.0
    assert sample.items_per_s == pytest.approx(5.0)
    assert sample.requests == 100
    assert sample.p50_ms == pytest.approx(50.0)
    assert sample.p99_ms == pytest.approx(99.0)
    assert sum(sample.batches.values()) == len(runner.calls)
    assert sum(n * size for size, n in sample.batch_sizes.items()) == 10
    assert sample.mean_batch_size == pytest.approx(10 / len(runner.calls))
    assert sample.max_batch_size == 4
    assert sample.queue_depth == 0
    assert len(timeline.latencies) == 0, "each request counts in one sample"


async def test_an_idle_interval_has_no_percentiles_and_no_batches() -> None:
    clock = Clock()
    async with Engine(open_runner()) as engine:
        timeline = Timeline(engine, clock=clock)
        clock.now += 1.0
        sample = timeline.sample()
    assert sample.p99_ms is None
    assert sample.mean_batch_size is None
    assert sample.items_per_s == 0.0
    assert set(sample.batches.values()) == {0}


async def test_history_is_bounded_and_since_returns_only_newer_samples() -> None:
    clock = Clock()
    async with Engine(open_runner()) as engine:
        timeline = Timeline(engine, interval_s=1.0, history_s=5.0, clock=clock)
        for _ in range(8):
            clock.now += 1.0
            timeline.sample()
    assert len(timeline.samples) == 5
    assert [s.t for s in timeline.since(1006.0)] == [1007.0, 1008.0]


async def test_a_change_of_limits_is_an_event_with_who_made_it() -> None:
    clock = Clock()
    runner = GatedRunner()
    async with Engine(runner) as engine:
        timeline = Timeline(engine, clock=clock)
        engine.reconfigure(max_wait_ms=7)
        clock.now += 1.0
        timeline.sample()
        clock.now += 1.0
        timeline.sample()
        runner.gate.set()
    assert [e.t for e in timeline.events] == [1001.0]
    assert "PATCH /admin/batching: max_batch_size 32, max_wait_ms 7" in timeline.events[0].text
