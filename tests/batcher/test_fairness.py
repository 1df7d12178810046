"""Tenants' fair share of the device: the pure rule, then the engine with fake models on
virtual time (looptime: the clock moves only when every task waits)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import pytest

from batcher import Engine, EngineConfig, Owner
from batcher.fairness import FairShare, contested, item_cost
from tests.batcher.fakes import PaddedCostRunner


@dataclass
class Item:
    owner: Owner | None
    cost: int = 8
    name: str = ""


def tokens(item: Item) -> float:
    return float(item.cost)


def named(items: list[Item], order: list[int]) -> list[str]:
    return [items[i].name for i in order]


A, B, C = Owner("a"), Owner("b"), Owner("c")


def test_one_tenant_keeps_the_queue_order() -> None:
    items = [Item(A, cost, f"a{i}") for i, cost in enumerate([30, 2, 8, 1])]
    fair = FairShare()
    assert fair.order(items, tokens) == [0, 1, 2, 3]
    assert not contested(items)
    assert not contested([Item(None), Item(None)])  # no owner: one anonymous tenant


def test_a_late_tenant_is_served_next_not_after_the_flood() -> None:
    items = [Item(A, name=f"a{i}") for i in range(10)] + [Item(B, name=f"b{i}") for i in range(3)]
    order = named(items, FairShare().order(items, tokens))
    assert order[:6] == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert order[6:] == [f"a{i}" for i in range(3, 10)]  # a tenant's own order holds


def test_weights_split_the_order() -> None:
    items = [Item(Owner("a", 3.0), name="a") for _ in range(30)]
    items += [Item(Owner("b", 1.0), name="b") for _ in range(30)]
    first = named(items, FairShare().order(items, tokens))[:20]
    assert Counter(first) == {"a": 15, "b": 5}


def test_cost_counts_not_items() -> None:
    """A tenant of long inputs gets fewer of them through: the share is device cost."""
    items = [Item(A, 64, "long") for _ in range(10)] + [Item(B, 8, "short") for _ in range(40)]
    first = named(items, FairShare().order(items, tokens))[:18]
    assert Counter(first) == {"long": 2, "short": 16}


def test_charged_work_moves_a_tenant_back_and_an_idle_one_saves_no_credit() -> None:
    fair = FairShare()
    for _ in range(10):  # a alone for a while: its clock and the system's advance
        fair.charge([Item(A) for _ in range(4)], tokens)
    assert fair.clock("b") == fair.virtual  # b, idle all along, starts now, not at 0
    items = [Item(A, name="a") for _ in range(8)] + [Item(B, name="b") for _ in range(8)]
    first = named(items, fair.order(items, tokens))[:8]
    assert Counter(first) == {"a": 4, "b": 4}, "b caught up on its idle time"


def test_the_state_forgets_tenants_that_fell_behind() -> None:
    fair = FairShare()
    fair.charge([Item(Owner(f"t{i}")) for i in range(100)], tokens)
    for _ in range(3):
        fair.charge([Item(A)], tokens)
    assert set(fair.tenants()) <= {"a"}


def test_item_cost_adds_a_share_of_the_overhead_once_learned() -> None:
    from batcher.cost import LinearCost

    assert item_cost(10, 4, None) == 10.0
    cost = LinearCost(overhead_s=0.04, per_token_s=0.001)
    assert item_cost(16, 4, cost) == pytest.approx(0.016 + 0.01)


def test_an_owner_needs_a_positive_weight() -> None:
    with pytest.raises(ValueError, match="weight must be > 0, got 0"):
        Owner("a", 0)


# -- the engine ------------------------------------------------------------------------


async def flood(
    engine: Engine[str, str], clients: dict[Owner, int], seconds: float
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Closed-loop clients per owner for `seconds` of virtual time, each sending its
    tenant's one-letter name 8 times: the device seconds each tenant was charged, and
    each tenant's latencies."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    device: dict[str, float] = {owner.tenant: 0.0 for owner in clients}
    latencies: dict[str, list[float]] = {owner.tenant: [] for owner in clients}

    async def client(owner: Owner) -> None:
        while not stop.is_set():
            started = loop.time()
            result = await engine.submit(owner.tenant * 8, owner=owner)
            device[owner.tenant] += result.device_s
            latencies[owner.tenant].append(loop.time() - started)

    tasks = [asyncio.create_task(client(o)) for o, n in clients.items() for _ in range(n)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return device, latencies


def device_engine(batch: int = 8) -> Engine[str, str]:
    runner = PaddedCostRunner(overhead_s=0.01, per_token_s=0.001)
    runner.gate.set()
    loop = asyncio.get_running_loop()
    return Engine(runner, EngineConfig(max_batch_size=batch), clock=loop.time)  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.looptime
@pytest.mark.parametrize("weights", [(1.0, 1.0), (3.0, 1.0), (1.0, 2.0)])
async def test_device_time_splits_by_weight_while_both_wait(weights: tuple[float, float]) -> None:
    """Tenant a floods with ten times b's clients; both keep more than their share
    queued. Without the fair share each would get the device by its clients (10:1)."""
    a, b = Owner("a", weights[0]), Owner("b", weights[1])
    async with device_engine() as engine:
        device, _ = await flood(engine, {a: 40, b: 4 * 4}, seconds=30.0)
    share = device["a"] / (device["a"] + device["b"])
    wanted = weights[0] / sum(weights)
    assert share == pytest.approx(wanted, abs=0.03), f"a had {share:.1%}, its weight {wanted:.1%}"


def p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * (len(values) - 1))]


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_light_tenant_is_not_slowed_by_a_flood() -> None:
    """b sends one request at a time while a floods with 64 clients, on a device where a
    batch costs about its overhead (a GPU): b waits about two batches (the one running
    and its own), not its place behind the flood (64 / 8 batches), as it does when the
    engine cannot tell b from a."""

    def engine() -> Engine[str, str]:
        runner = PaddedCostRunner(overhead_s=0.01, per_token_s=0.00005)
        runner.gate.set()
        loop = asyncio.get_running_loop()
        return Engine(runner, EngineConfig(max_batch_size=8), clock=loop.time)  # type: ignore[arg-type]

    a, b = Owner("a"), Owner("b")
    async with engine() as solo_engine:
        _, alone = await flood(solo_engine, {b: 1}, seconds=5.0)
    async with engine() as fair_engine:
        _, beside = await flood(fair_engine, {a: 64, b: 1}, seconds=20.0)
    async with engine() as blind_engine:  # b's requests indistinguishable from a's
        _, blind = await flood(blind_engine, {a: 64, Owner("a", 1.0000001): 1}, seconds=20.0)
    solo = p99(alone["b"])
    assert p99(beside["b"]) <= 2.6 * solo, f"b: {solo:.3f} s alone, {p99(beside['b']):.3f} s"
    assert p99(next(iter(blind.values()))) > 5 * solo


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_the_flood_gets_what_an_idle_tenant_leaves() -> None:
    """b (weight 5) floods beside a, then stops: from then on a's batches are full
    again, not cut to the sixth that b's weight left it."""
    async with device_engine() as engine:
        runner = engine._runner  # type: ignore[attr-defined]
        b_done = asyncio.create_task(flood(engine, {Owner("b", 5.0): 40}, seconds=5.0))
        a_done = asyncio.create_task(flood(engine, {Owner("a"): 40}, seconds=10.0))
        await b_done
        shared = list(runner.calls)
        await a_done
        after = runner.calls[len(shared) + 2 :]  # once b's last batches are gone
    items = Counter(p[0] for call in shared[5:] for p in call.payloads)
    assert items["a"] / items.total() == pytest.approx(1 / 6, abs=0.03)
    a_after = [p for call in after for p in call.payloads]
    assert set(a_after) == {"a" * 8}
    # a alone: full batches back to back (8 items each per 74 ms).
    assert len(a_after) >= 0.9 * 8 * len(after)
    assert len(after) >= 0.9 * 5.0 / (0.01 + 0.001 * 64)


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_interactive_goes_before_bulk_within_a_tenant_and_a_bulk_tenant_keeps_its_share() -> (
    None
):
    """a floods interactively; b runs only a bulk job. Within b nothing changes, but
    across tenants b's job gets b's share of the device, not just the bulk lane's tenth."""
    loop = asyncio.get_running_loop()
    a, b = Owner("a"), Owner("b")
    stop = asyncio.Event()
    device = {"a": 0.0, "b": 0.0}

    async def client(owner: Owner, lane: str) -> None:
        while not stop.is_set():
            result = await engine.submit("x" * 8, owner=owner, lane=lane)  # type: ignore[arg-type]
            device[owner.tenant] += result.device_s

    async with device_engine() as engine:
        tasks = [asyncio.create_task(client(a, "interactive")) for _ in range(40)]
        tasks += [asyncio.create_task(client(b, "bulk")) for _ in range(40)]
        await asyncio.sleep(30.0)
        stop.set()
        await asyncio.gather(*tasks)
        # Within one tenant: its query overtakes its own queued job.
        job = [
            asyncio.create_task(engine.submit(f"job{i}", owner=a, lane="bulk")) for i in range(40)
        ]
        await asyncio.sleep(0)
        started = loop.time()
        await engine.submit("query", owner=a)
        waited = loop.time() - started
        await asyncio.gather(*job)
    share = device["b"] / (device["a"] + device["b"])
    assert share == pytest.approx(0.5, abs=0.05), f"the bulk tenant had {share:.1%}"
    assert waited < 3 * (0.01 + 0.001 * 8 * 8), f"the query waited {waited:.3f} s behind the job"


@pytest.mark.asyncio
async def test_a_flood_cannot_fill_the_queue_against_the_other_tenants() -> None:
    """The last tenth of the queue takes only the items of a tenant under its share of
    the rest: a's flood stops at 90 % of the queue, b still gets in; items without an
    owner (a server without tenants) may fill it whole, as before."""
    from batcher import QueueFull
    from tests.batcher.fakes import GatedRunner

    runner = GatedRunner()
    loop = asyncio.get_running_loop()
    config = EngineConfig(max_batch_size=1, max_queue_size=20)
    async with Engine(runner, config, clock=loop.time) as engine:  # type: ignore[arg-type]
        a, b = Owner("a"), Owner("b")
        running = asyncio.create_task(engine.submit("run", owner=a))
        await runner.wait_for_calls(1)
        flood = [asyncio.create_task(engine.submit(f"a{i}", owner=a)) for i in range(18)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="tenant 'a' holds more than its share"):
            await engine.submit("a18", owner=a)
        light = [asyncio.create_task(engine.submit(f"b{i}", owner=b)) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match=r"queue is full \(20 of 20"):
            await engine.submit("b2", owner=b)
        runner.gate.set()
        await asyncio.gather(running, *flood, *light)
    async with Engine(GatedRunner(), config, clock=loop.time) as engine:  # type: ignore[arg-type]
        running = asyncio.create_task(engine.submit("run"))
        await engine._runner.wait_for_calls(1)  # type: ignore[attr-defined]
        anonymous = [asyncio.create_task(engine.submit(f"x{i}")) for i in range(20)]
        await asyncio.sleep(0)
        assert all(not task.done() for task in anonymous)
        engine._runner.gate.set()  # type: ignore[attr-defined]
        await asyncio.gather(running, *anonymous)


def test_the_input_most_owed_leads_the_batch_whatever_its_length() -> None:
    """b is owed the device (a has had its share), but its input is long and a's are
    short: grouping by length around a's oldest would leave b out batch after batch.
    Led by the first in fair order, b's input goes now."""
    import itertools

    from batcher.cost import LinearCost
    from batcher.items import PendingItem
    from batcher.metrics import EngineMetrics
    from batcher.queue import PendingQueue

    loop = asyncio.new_event_loop()
    try:
        ticks = itertools.count()

        def item(owner: Owner, tokens: int) -> PendingItem[str, str]:
            return PendingItem("x", loop.create_future(), float(next(ticks)), None, tokens,
                               owner=owner)  # fmt: skip

        queue: PendingQueue[str, str] = PendingQueue(EngineMetrics())
        a, b = Owner("a"), Owner("b")
        queue.fair.measure(learned=True)  # the cost below is learned
        queue.fair.charge([item(a, 8) for _ in range(16)], tokens)  # a had its share
        flood = [item(a, 8) for _ in range(30)]
        owed = item(b, 120)
        queue.extend([*flood, owed])
        cost = LinearCost(overhead_s=0.001, per_token_s=0.001)  # a CPU: padding costs
        batch = queue.take(100.0, EngineConfig(max_batch_size=8), cost)
    finally:
        loop.close()
    assert owed in batch


def test_a_change_of_unit_starts_the_clocks_afresh() -> None:
    """Before the device cost is learned the clocks count tokens, then seconds: a lead
    of a thousand tokens kept as seconds would starve the other tenant for millions of
    inputs. Once the cost is learned, both share the next batches."""
    import itertools

    from batcher.cost import LinearCost
    from batcher.items import PendingItem
    from batcher.metrics import EngineMetrics
    from batcher.queue import PendingQueue

    loop = asyncio.new_event_loop()
    try:
        ticks = itertools.count()

        def item(owner: Owner) -> PendingItem[str, str]:
            return PendingItem("x", loop.create_future(), float(next(ticks)), None, 8,
                               owner=owner)  # fmt: skip

        queue: PendingQueue[str, str] = PendingQueue(EngineMetrics())
        a, b = Owner("a"), Owner("b")
        queue.extend([item(a) for _ in range(200)])
        for _ in range(10):  # a alone, in tokens: its clock runs far ahead
            queue.take(0.0, EngineConfig(max_batch_size=8), None)
        queue.extend([item(b) for _ in range(200)])
        queue.extend([item(a) for _ in range(200)])
        cost = LinearCost(overhead_s=0.001, per_token_s=0.0001)
        taken = Counter(
            owner_of_item.owner.tenant  # type: ignore[union-attr]
            for _ in range(10)
            for owner_of_item in queue.take(1.0, EngineConfig(max_batch_size=8), cost)
        )
    finally:
        loop.close()
    assert min(taken["a"], taken["b"]) >= 30, taken
