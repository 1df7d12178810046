"""Several engines on one device: the pure rule (`choose`), then engines with fake
models on virtual time (looptime: the clock moves only when every task waits)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import pytest

from batcher import Engine, EngineConfig
from batcher.sharing import Claim, DeviceScheduler, Grant, budget_s, choose
from tests.batcher.fakes import Call, PaddedCostRunner


def claim(share: int, start: float, batch_s: float = 0.01, oldest: float = 0.0,
          deadline: float | None = None) -> Claim:  # fmt: skip
    return Claim(share, start, batch_s, oldest, deadline)


# -- the rule ----------------------------------------------------------------------------


def test_the_lowest_start_tag_goes_first_whatever_the_backlog() -> None:
    flooded = claim(0, start=5.0, oldest=0.0)  # waited longest, but had the device most
    light = claim(1, start=4.0, oldest=9.0)
    assert choose([flooded, light], now=10.0) is light


def test_ties_go_to_the_older_work() -> None:
    a, b = claim(0, 1.0, oldest=3.0), claim(1, 1.0, oldest=2.0)
    assert choose([a, b], now=5.0) is b


def test_a_deadline_that_would_pass_behind_the_fair_choice_goes_first() -> None:
    fair = claim(0, start=1.0, batch_s=0.2)
    due = claim(1, start=1.1, batch_s=0.05, deadline=10.2)  # 10.0 + 0.2 + 0.05 > 10.2
    assert choose([fair, due], now=10.0) is due
    relaxed = claim(1, start=1.1, batch_s=0.05, deadline=10.3)  # makes it behind: fair
    assert choose([fair, relaxed], now=10.0) is fair
    lost = claim(1, start=1.1, batch_s=0.05, deadline=10.04)  # misses it anyway
    assert choose([fair, lost], now=10.0) is fair


def test_deadlines_cannot_take_more_than_a_batch_beyond_the_fair_share() -> None:
    fair = claim(0, start=1.0, batch_s=0.2)
    greedy = claim(1, start=1.5, batch_s=0.05, deadline=10.1)  # 0.5 ahead > 0.25
    assert choose([fair, greedy], now=10.0) is fair


def test_choose_needs_a_claim() -> None:
    with pytest.raises(ValueError, match="at least one claim"):
        choose([], now=0.0)


# -- engines sharing one device ------------------------------------------------------------


@dataclass
class Device:
    """One device for several fake models: counts who runs when, and how often two ran
    at once (never, if the scheduler is right)."""

    running: int = 0
    overlaps: int = 0
    busy_s: dict[str, float] = field(default_factory=dict)
    calls: dict[str, list[Call]] = field(default_factory=dict)


@dataclass
class SharedRunner(PaddedCostRunner):
    device: Device = field(default_factory=Device)
    name: str = ""

    async def run(self, payloads: list[str]) -> list[str]:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        self.device.running += 1
        self.device.overlaps += self.device.running > 1
        started = loop.time()
        try:
            return await super().run(payloads)
        finally:
            self.device.running -= 1
            spent = loop.time() - started
            self.device.busy_s[self.name] = self.device.busy_s.get(self.name, 0.0) + spent
            self.device.calls[self.name] = self.calls


def engines_on(device: Device, scheduler: DeviceScheduler | None, *specs: tuple[str, float, float]
               ) -> list[Engine[str, str]]:  # fmt: skip
    """One engine per (name, overhead_s, per_token_s) fake model, sharing `scheduler`."""
    made = []
    clock = asyncio.get_running_loop().time
    for name, overhead_s, per_token_s in specs:
        runner = SharedRunner(overhead_s=overhead_s, per_token_s=per_token_s, device=device,
                              name=name)  # fmt: skip
        runner.gate.set()
        share = scheduler.join(name) if scheduler is not None else None
        made.append(Engine(runner, EngineConfig(max_batch_size=32), clock=clock, share=share))
    return made


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_flood_on_one_model_cannot_starve_another_and_never_overlaps() -> None:
    """An embedder flooded with long inputs by 64 closed-loop clients (a batch of 32
    takes 86 ms); a reranker gets a short request every 50 ms (8 ms alone). A reranker
    request waits at most one of the flood's batches, and those are cut to about the
    reranker's batch time while it is active: its p99 stays within 2.5 x alone, where
    first come, first served would make it wait a whole 86 ms batch. The first few
    requests after the reranker was idle still wait one uncut batch."""
    device = Device()
    scheduler = DeviceScheduler(1, clock=asyncio.get_running_loop().time)
    embedder, reranker = engines_on(device, scheduler, ("embed", 0.004, 0.00001),
                                    ("rerank", 0.004, 0.0001))  # fmt: skip
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    stop = asyncio.Event()

    async def flood(k: int) -> None:
        while not stop.is_set():
            await embedder.submit(f"{k}".ljust(250, "x"))

    async def request(i: int) -> None:
        started = loop.time()
        await reranker.submit(f"q{i}".ljust(40, "y"))
        if i >= 5:  # the first ones find the flood's batches uncut: it learns they come
            latencies.append(loop.time() - started)

    async with embedder, reranker:
        flooders = [asyncio.create_task(flood(k)) for k in range(64)]
        await asyncio.sleep(2.0)  # the flood's batches are learned and running
        tasks = []
        for i in range(105):
            tasks.append(asyncio.create_task(request(i)))
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
        stop.set()
        await asyncio.gather(*flooders)

    alone_s = 0.004 + 0.0001 * 40  # one reranker input alone: 8 ms
    latencies.sort()
    p99 = latencies[98]
    assert device.overlaps == 0
    assert p99 <= 2.5 * alone_s, f"p99 {p99 * 1e3:.1f} ms against {alone_s * 1e3:.1f} alone"
    assert embedder.stats().items["ok"] > 1000, "the flood still got the device"
    sizes = [len(c.payloads) for c in device.calls["embed"]]
    assert max(sizes) == 32, "alone, the flood ran full batches"


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_two_floods_split_the_device_time_evenly() -> None:
    """Two models flooded at once, one with batches four times as long: each gets about
    half the device's time (counting batches would give the long one four fifths)."""
    device = Device()
    scheduler = DeviceScheduler(1, clock=asyncio.get_running_loop().time)
    long_model, short_model = engines_on(device, scheduler, ("long", 0.002, 0.0002),
                                         ("short", 0.002, 0.00005))  # fmt: skip
    stop = asyncio.Event()
    rng = random.Random(0)

    async def flood(engine: Engine[str, str]) -> None:
        while not stop.is_set():
            await engine.submit("z" * rng.randint(60, 100))

    async with long_model, short_model:
        tasks = [
            asyncio.create_task(flood(e)) for e in (long_model, short_model) for _ in range(48)
        ]
        await asyncio.sleep(20.0)
        stop.set()
        await asyncio.gather(*tasks)
    share = device.busy_s["long"] / (device.busy_s["long"] + device.busy_s["short"])
    assert device.overlaps == 0
    assert 0.4 <= share <= 0.6, f"the long model had {share:.0%} of the device"


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_an_idle_model_banks_no_credit() -> None:
    """A model idle for a long while comes back on equal terms: it does not get the
    device for the whole of its absence while the other waits."""
    device = Device()
    scheduler = DeviceScheduler(1, clock=asyncio.get_running_loop().time)
    a, b = engines_on(device, scheduler, ("a", 0.01, 0.0), ("b", 0.01, 0.0))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    a_latencies: list[float] = []

    async def flood(engine: Engine[str, str], record: list[float] | None) -> None:
        while not stop.is_set():
            started = loop.time()
            await engine.submit("x")
            if record is not None:
                record.append(loop.time() - started)

    async with a, b:
        a_tasks = [asyncio.create_task(flood(a, a_latencies)) for _ in range(4)]
        await asyncio.sleep(10.0)  # a alone: its finish tag runs far ahead
        a_latencies.clear()
        b_tasks = [asyncio.create_task(flood(b, None)) for _ in range(4)]
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*a_tasks, *b_tasks)
    # Turns of a few batches each: a waits for some of b's, never for b's ten seconds'
    # worth of banked idleness (which a tag not raised to the virtual time would give).
    assert max(a_latencies) <= 0.1


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_shared_engine_closes_with_its_turn_pending() -> None:
    """An engine waiting for the device when it shuts down still answers (or fails)
    every item: nothing hangs, and the device is handed on."""
    device = Device()
    scheduler = DeviceScheduler(1, clock=asyncio.get_running_loop().time)
    a, b = engines_on(device, scheduler, ("a", 0.5, 0.0), ("b", 0.01, 0.0))
    await a.start()
    await b.start()
    slow = asyncio.create_task(a.submit("x"))
    await asyncio.sleep(0.1)  # a's batch holds the device
    waiting = asyncio.create_task(b.submit("y"))
    await asyncio.sleep(0.1)
    await b.aclose(timeout_s=5.0)
    assert (await waiting).value == "Y"
    await a.aclose()
    assert (await slow).value == "X"


def test_only_the_model_with_more_work_queued_has_its_batches_cut() -> None:
    """The budget protects the lighter model's requests from the heavier one's batches;
    it never cuts the lighter model's batches, nor those of equals, nor anyone's once
    the light model has gone quiet."""
    now = [0.0]
    scheduler = DeviceScheduler(1, clock=lambda: now[0])
    heavy, light = scheduler.join("heavy"), scheduler.join("light")
    for share, seconds in ((heavy, 0.2), (light, 0.04)):  # each ran a batch
        grant = Grant(share, 0, 0.0, None)
        now[0] += seconds
        grant.release()
    flood = {heavy.index: 64 * 256, light.index: 0}  # the light one: between requests
    assert budget_s(heavy, scheduler.shares, flood, now[0]) == pytest.approx(0.02)
    assert budget_s(light, scheduler.shares, flood, now[0]) is None
    equals = {heavy.index: 4096, light.index: 4096}
    assert budget_s(heavy, scheduler.shares, equals, now[0]) is None
    now[0] += 11.0  # the light model's last batch is long past, and nothing waits
    assert budget_s(heavy, scheduler.shares, flood, now[0]) is None
