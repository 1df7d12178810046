"""Interactive and bulk lanes: the pure rule, then the engine with fake models on
virtual time (looptime: the clock moves only when every task waits)."""

from __future__ import annotations

import asyncio

import pytest

from batcher import Engine, EngineConfig
from batcher.lanes import BULK_SHARE, LaneUsage, next_lane
from batcher.sharing import DeviceScheduler
from tests.batcher.fakes import GatedRunner, PaddedCostRunner


def test_interactive_goes_first_unless_bulk_is_owed_its_share() -> None:
    assert next_lane(True, True, bulk_share=0.5) == "interactive"
    assert next_lane(True, True, bulk_share=BULK_SHARE / 2) == "bulk"
    assert next_lane(False, True, bulk_share=0.9) == "bulk"  # alone, bulk takes it all
    assert next_lane(True, False, bulk_share=0.0) == "interactive"


def test_lane_usage_forgets_the_past() -> None:
    usage = LaneUsage(decay_s=1.0)
    assert usage.bulk_share(0.0) == 1.0  # no history: bulk is owed nothing
    usage.add("bulk", 1.0, 0.0)
    usage.add("interactive", 1.0, 10.0)  # the bulk second is ten time constants old
    assert usage.bulk_share(10.0) < 0.001
    usage.add("bulk", 1.0, 10.0)
    assert usage.bulk_share(10.0) == pytest.approx(0.5, abs=0.01)


def make_engine(runner: GatedRunner, **config: object) -> Engine[str, str]:
    clock = asyncio.get_running_loop().time
    return Engine(runner, EngineConfig(**config), clock=clock)  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_interactive_items_overtake_a_queued_bulk_job() -> None:
    runner = GatedRunner()
    async with make_engine(runner, max_batch_size=4) as engine:
        job = [asyncio.create_task(engine.submit(f"b{i}", lane="bulk")) for i in range(12)]
        await runner.wait_for_calls(1)  # the first bulk batch holds the device
        user = asyncio.create_task(engine.submit("query"))
        await asyncio.sleep(0)
        runner.gate.set()
        await asyncio.gather(user, *job)
    order = [call.payloads for call in runner.calls]
    assert order[1] == ["query"], f"the query waited behind the job: {order}"
    assert sorted(p for batch in order for p in batch) == sorted(
        ["query"] + [f"b{i}" for i in range(12)]
    )


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_bulk_keeps_its_share_under_endless_interactive_load() -> None:
    """Eight interactive clients keep the device busy forever; a bulk job still gets
    about a tenth of the device, not nothing."""
    runner = PaddedCostRunner(overhead_s=0.01, per_token_s=0.0)
    runner.gate.set()
    stop = asyncio.Event()
    done = {"interactive": 0, "bulk": 0}

    async def client(lane: str) -> None:
        while not stop.is_set():
            await engine.submit("x" * 8, lane=lane)  # type: ignore[arg-type]
            done[lane] += 1

    async with make_engine(runner, max_batch_size=4) as engine:
        tasks = [asyncio.create_task(client("interactive")) for _ in range(8)]
        tasks += [asyncio.create_task(client("bulk")) for _ in range(4)]
        await asyncio.sleep(60.0)
        stop.set()
        await asyncio.gather(*tasks)
    share = done["bulk"] / (done["bulk"] + done["interactive"])
    assert 0.5 * BULK_SHARE <= share <= 2 * BULK_SHARE, f"bulk had {share:.1%} of the items"


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_an_interactive_caller_lifts_the_identical_bulk_item_it_joins() -> None:
    runner = GatedRunner()
    engine = Engine(runner, EngineConfig(max_batch_size=1),
                    clock=asyncio.get_running_loop().time, identity=lambda text: text)  # fmt: skip
    async with engine:
        blocker = asyncio.create_task(engine.submit("first", lane="bulk"))
        await runner.wait_for_calls(1)
        bulk = [asyncio.create_task(engine.submit(f"b{i}", lane="bulk")) for i in range(3)]
        await asyncio.sleep(0)
        joined = asyncio.create_task(engine.submit("b2"))  # the same text, interactive
        await asyncio.sleep(0)
        runner.gate.set()
        await asyncio.gather(blocker, joined, *bulk)
    assert [call.payloads for call in runner.calls][1] == ["b2"]


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_across_models_interactive_work_goes_before_another_models_bulk_flood() -> None:
    """Two models flooded at once, one by interactive clients, one by a bulk job: the
    interactive model gets the device but the bulk lane's share, where fairness alone
    would split it in halves."""
    loop = asyncio.get_running_loop()
    scheduler = DeviceScheduler(1, clock=loop.time)
    runners = {name: PaddedCostRunner(overhead_s=0.01, per_token_s=0.0) for name in ("a", "b")}
    engines = {}
    for name, runner in runners.items():
        runner.gate.set()
        engines[name] = Engine(runner, EngineConfig(max_batch_size=4), clock=loop.time,
                               share=scheduler.join(name))  # fmt: skip
    stop = asyncio.Event()

    async def client(name: str, lane: str) -> None:
        while not stop.is_set():
            await engines[name].submit("x", lane=lane)  # type: ignore[arg-type]

    async with engines["a"], engines["b"]:
        tasks = [asyncio.create_task(client("a", "interactive")) for _ in range(8)]
        tasks += [asyncio.create_task(client("b", "bulk")) for _ in range(32)]
        await asyncio.sleep(60.0)
        stop.set()
        await asyncio.gather(*tasks)
    batches = {name: len(runner.calls) for name, runner in runners.items()}
    bulk_share = batches["b"] / (batches["a"] + batches["b"])
    assert 0.5 * BULK_SHARE <= bulk_share <= 2 * BULK_SHARE, batches


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_bulk_batch_is_cut_short_while_interactive_work_is_active() -> None:
    """A CPU-like device (2 ms + 0.2 ms per padded token): a bulk job of 256-token chunks
    (a full batch of them: 1.6 s) and a query every 50 ms (5 ms alone). A query waits at
    most about one chunk's batch, not a full one."""
    runner = PaddedCostRunner(overhead_s=0.002, per_token_s=0.0002)
    runner.gate.set()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    latencies: list[float] = []

    async def job(k: int) -> None:
        while not stop.is_set():
            await engine.submit(f"{k}".ljust(250, "x"), lane="bulk")

    async with make_engine(runner) as engine:
        tasks = [asyncio.create_task(job(k)) for k in range(64)]
        for i in range(200):
            started = loop.time()
            await engine.submit(f"q{i}".ljust(10, "y"))
            if i >= 20:  # the cost is learned by then
                latencies.append(loop.time() - started)
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
    chunk_alone = 0.002 + 0.0002 * 256
    latencies.sort()
    assert latencies[int(0.99 * len(latencies))] <= chunk_alone + 0.01
    assert max(len(c.payloads) for c in runner.calls) == 32, "before any query, full batches"
