"""The engine with fake models. Time is virtual (looptime): the loop's clock moves only
when every task is waiting, so timing assertions are exact and nothing sleeps."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Sequence

import pytest

from batcher import (
    DeadlineExceeded,
    DeadlineUnreachable,
    DeviceOutOfMemory,
    Engine,
    EngineClosed,
    EngineConfig,
    InferenceFailed,
    ItemTooLarge,
    QueueFull,
    Result,
    Runner,
    ThreadRunner,
)
from batcher.padding import bucket_length, padded_tokens
from batcher.replicas import REPLICA_STRIKES
from tests.batcher.fakes import (
    Call,
    GatedRunner,
    PaddedCostRunner,
    Poison,
    StagingRunner,
    open_runner,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]


def make_engine(
    runner: Runner[str, str] | Sequence[Runner[str, str]], config: EngineConfig | None = None
) -> Engine[str, str]:
    """An engine on the loop's (virtual) clock."""
    return Engine(runner, config, clock=asyncio.get_running_loop().time)


def texts(n: int, prefix: str = "t") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


async def settle(*tasks: asyncio.Task[object]) -> list[object]:
    async with asyncio.timeout(60):
        return await asyncio.gather(*tasks, return_exceptions=True)


async def test_results_go_to_the_right_caller() -> None:
    runner = open_runner()
    async with make_engine(runner, EngineConfig(max_batch_size=8)) as engine:
        inputs = texts(50)
        results = await asyncio.gather(*(engine.submit(x) for x in inputs))
    assert [r.value for r in results] == [x.upper() for x in inputs]
    assert sum(len(c.payloads) for c in runner.calls) == 50


async def test_a_batch_never_exceeds_max_batch_size() -> None:
    runner = GatedRunner()
    async with make_engine(runner, EngineConfig(max_batch_size=4, policy="adaptive")) as engine:
        tasks = [asyncio.create_task(engine.submit(x)) for x in texts(19)]
        await runner.wait_for_calls(1)  # first item went alone: the device was idle
        runner.gate.set()
        await settle(*tasks)
    sizes = [len(c.payloads) for c in runner.calls]
    assert max(sizes) <= 4
    assert sum(sizes) == 19
    assert sizes[1:3] == [4, 4], "while busy, the engine gathers full batches"


async def test_adaptive_dispatches_at_once_when_the_device_is_idle() -> None:
    runner = open_runner()
    async with make_engine(runner, EngineConfig(max_wait_ms=200, policy="adaptive")) as engine:
        submitted_at = engine.clock()
        result = await engine.submit("x")
    assert runner.calls[0].started_at == submitted_at
    assert result.queue_time_s == 0


async def test_window_waits_max_wait_ms_then_dispatches() -> None:
    runner = open_runner()
    async with make_engine(runner, EngineConfig(max_wait_ms=200, policy="window")) as engine:
        submitted_at = engine.clock()
        result = await engine.submit("x")
    assert runner.calls[0].started_at == pytest.approx(submitted_at + 0.2)
    assert result.queue_time_s == pytest.approx(0.2)


@pytest.mark.parametrize("policy", ["window", "adaptive"])
async def test_oldest_item_never_waits_past_max_wait_while_the_device_is_free(
    policy: str,
) -> None:
    runner = open_runner()
    config = EngineConfig(max_batch_size=32, max_wait_ms=50, policy=policy)  # type: ignore[arg-type]
    async with make_engine(runner, config) as engine:
        tasks = []
        for i in range(40):  # a trickle: one item every 7 ms
            tasks.append(asyncio.create_task(engine.submit(f"x{i}")))
            await asyncio.sleep(0.007)  # virtual time: spaces arrivals, orders nothing
        results = await settle(*tasks)
    waits = [r.queue_time_s for r in results]  # type: ignore[union-attr]
    assert max(waits) <= 0.05 + 1e-9
    if policy == "window":
        assert max(len(c.payloads) for c in runner.calls) > 1, "the window gathers"


async def test_a_full_batch_dispatches_before_the_window_closes() -> None:
    runner = open_runner()
    async with make_engine(
        runner, EngineConfig(max_batch_size=4, max_wait_ms=1000, policy="window")
    ) as engine:
        start = engine.clock()
        await asyncio.gather(*(engine.submit(x) for x in texts(4)))
    assert runner.calls[0].started_at == start
    assert len(runner.calls[0].payloads) == 4


async def test_a_raising_item_fails_alone() -> None:
    runner = open_runner()
    async with make_engine(runner, EngineConfig(max_batch_size=8, policy="window")) as engine:
        inputs = ["a", "b", "c", "boom", "d", "e", "f", "g"]
        results = await asyncio.gather(*(engine.submit(x) for x in inputs), return_exceptions=True)
    for x, r in zip(inputs, results, strict=True):
        if x == "boom":
            assert isinstance(r, InferenceFailed)
            assert isinstance(r.__cause__, Poison)
        else:
            assert not isinstance(r, BaseException), r
            assert r.value == x.upper()
    assert engine.metrics.outcome["failed"]._value.get() == 1


class SmallDevice(GatedRunner):
    """Runs out of memory, like CUDA does, on any batch over `limit` padded tokens."""

    limit: int = 64

    async def run(self, payloads: Sequence[str]) -> list[str]:
        if padded_tokens(len(p) for p in payloads) > self.limit:
            self.calls.append(Call(list(payloads), asyncio.get_running_loop().time()))
            raise DeviceOutOfMemory(f"{len(payloads)} items do not fit")
        return await super().run(payloads)


async def test_out_of_memory_splits_the_batch_and_caps_later_ones() -> None:
    runner = SmallDevice()
    runner.gate.set()
    config = EngineConfig(max_batch_size=32, policy="window", batch_sizing="fill")
    async with make_engine(runner, config) as engine:
        first = texts(32, prefix="abcdef")  # 32 x 8 padded tokens: 4x the device's room
        results = await asyncio.gather(*(engine.submit(x) for x in first))
        assert [r.value for r in results] == [x.upper() for x in first]
        assert engine.stats().memory_cap_tokens is not None
        assert engine.stats().memory_cap_tokens <= runner.limit
        failed_before = len(runner.calls)
        again = await asyncio.gather(*(engine.submit(x) for x in texts(32, prefix="ghijkl")))
    assert all(not isinstance(r, BaseException) for r in again)
    # Once the cap is learned, no batch is sent that the device cannot hold.
    later = runner.calls[failed_before:]
    assert all(padded_tokens(len(p) for p in c.payloads) <= runner.limit for c in later)
    assert engine.metrics.out_of_memory._value.get() >= 1
    assert engine.metrics.outcome["ok"]._value.get() == 64
    assert engine.metrics.outcome["failed"]._value.get() == 0


async def test_busy_for_reports_how_long_a_forward_pass_has_hung() -> None:
    runner = GatedRunner()
    async with make_engine(runner) as engine:
        assert engine.busy_for() == 0.0
        task = asyncio.create_task(engine.submit("stuck"))
        await runner.wait_for_calls(1)
        await asyncio.sleep(90)  # virtual time: the forward pass hangs for 90 s
        assert engine.busy_for() == pytest.approx(90, abs=0.01)
        runner.gate.set()
        await task
        assert engine.busy_for() == 0.0


async def test_a_model_that_returns_the_wrong_number_of_outputs_fails_the_batch_loudly() -> None:
    class Short(GatedRunner):
        async def run(self, payloads: Sequence[str]) -> list[str]:
            return (await super().run(payloads))[:-1]

    runner = Short()
    runner.gate.set()
    async with make_engine(runner, EngineConfig(max_batch_size=4, policy="window")) as engine:
        results = await asyncio.gather(
            *(engine.submit(x) for x in texts(4)), return_exceptions=True
        )
    assert all(isinstance(r, InferenceFailed) and "3 outputs for 4" in str(r) for r in results)


async def test_expired_items_are_never_computed() -> None:
    runner = GatedRunner()
    async with make_engine(runner, EngineConfig(max_batch_size=4)) as engine:
        blocker = asyncio.create_task(engine.submit("first"))
        await runner.wait_for_calls(1)  # the device is now busy
        doomed = asyncio.create_task(engine.submit("late", deadline=engine.clock() + 0.01))
        fine = asyncio.create_task(engine.submit("fine"))
        with pytest.raises(DeadlineExceeded):
            await doomed  # virtual time runs to the deadline while the device is stuck
        runner.gate.set()
        await settle(blocker, fine)
    assert fine.result().value == "FINE"
    assert "late" not in runner.computed
    assert engine.metrics.outcome["expired"]._value.get() == 1


async def test_an_item_expiring_while_its_batch_waits_for_the_device_is_not_computed() -> None:
    runner = StagingRunner()
    config = EngineConfig(max_batch_size=1)
    async with make_engine(runner, config) as engine:
        first = asyncio.create_task(engine.submit("first"))
        await runner.wait_for_calls(1)
        # Full at once (max_batch_size=1), so it is staged behind "first" with its deadline.
        doomed = asyncio.create_task(engine.submit("staged", deadline=engine.clock() + 5))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert engine.queue_depth == 0, "the item left the queue for the device"
        with pytest.raises(DeadlineExceeded):
            await doomed
        runner.gate.set()
        await settle(first)
    assert runner.computed == ["first"]


async def test_cancelled_items_are_never_computed() -> None:
    runner = GatedRunner()
    async with make_engine(runner, EngineConfig(max_batch_size=8)) as engine:
        blocker = asyncio.create_task(engine.submit("first"))
        await runner.wait_for_calls(1)
        gone = [asyncio.create_task(engine.submit(f"gone{i}")) for i in range(3)]
        kept = asyncio.create_task(engine.submit("kept"))
        await asyncio.sleep(0)
        for task in gone:
            task.cancel()
        runner.gate.set()
        await settle(blocker, kept, *gone)
    assert kept.result().value == "KEPT"
    assert not any(p.startswith("gone") for p in runner.computed)
    assert engine.metrics.outcome["cancelled"]._value.get() == 3


async def test_a_full_queue_rejects_at_once() -> None:
    runner = StagingRunner()
    async with make_engine(runner, EngineConfig(max_batch_size=1, max_queue_size=3)) as engine:
        first = asyncio.create_task(engine.submit("running"))
        await runner.wait_for_calls(1)
        staged = asyncio.create_task(engine.submit("staged"))
        await asyncio.sleep(0)
        queued = [asyncio.create_task(engine.submit(f"q{i}")) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="3 of 3"):
            await engine.submit("one too many")
        with pytest.raises(QueueFull):
            await engine.submit_many(["a"])
        runner.gate.set()
        results = await settle(first, staged, *queued)
    assert not any(isinstance(r, BaseException) for r in results)
    assert engine.metrics.outcome["rejected_full"]._value.get() == 2


async def test_submit_many_is_all_or_nothing_against_the_queue_limit() -> None:
    runner = GatedRunner()
    async with make_engine(runner, EngineConfig(max_queue_size=4)) as engine:
        with pytest.raises(QueueFull):
            await engine.submit_many(texts(5))
        assert engine.queue_depth == 0
        runner.gate.set()
        results = await engine.submit_many(texts(4))
    assert [r.value for r in results] == [x.upper() for x in texts(4)]


async def test_an_item_over_the_token_budget_fails_at_once() -> None:
    async with Engine(open_runner(), EngineConfig(max_batch_tokens=16)) as engine:
        with pytest.raises(ItemTooLarge, match="24 padded tokens"):
            await engine.submit("x" * 17)


async def test_shutdown_answers_every_admitted_item_then_refuses_new_ones() -> None:
    runner = GatedRunner()
    engine = make_engine(
        runner, EngineConfig(max_batch_size=4, policy="window", max_wait_ms=10_000)
    )
    await engine.start()
    tasks = [asyncio.create_task(engine.submit(x)) for x in texts(10)]
    await runner.wait_for_calls(1)
    closing = asyncio.create_task(engine.aclose())
    await asyncio.sleep(0)
    with pytest.raises(EngineClosed):
        await engine.submit("after close")
    runner.gate.set()
    results = await settle(*tasks)
    await closing
    assert [r.value for r in results] == [x.upper() for x in texts(10)]  # type: ignore[union-attr]
    assert engine.state == "closed"


async def test_a_drain_that_times_out_fails_the_rest_with_engine_closed() -> None:
    runner = GatedRunner()  # never released
    engine = make_engine(runner, EngineConfig(max_batch_size=2))
    await engine.start()
    tasks = [asyncio.create_task(engine.submit(x)) for x in texts(5)]
    await runner.wait_for_calls(1)
    await engine.aclose(timeout_s=1.0)
    results = await settle(*tasks)
    assert all(isinstance(r, EngineClosed) for r in results)


async def test_reconfigure_applies_at_once_and_validates() -> None:
    runner = GatedRunner()
    async with make_engine(
        runner, EngineConfig(max_batch_size=2, policy="window", max_wait_ms=10_000)
    ) as engine:
        with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
            engine.reconfigure(max_batch_size=0)
        task = asyncio.create_task(engine.submit("waiting"))
        await asyncio.sleep(0)
        assert runner.calls == []
        engine.reconfigure(policy="adaptive")  # the waiting item goes now, not in 10 s
        await runner.wait_for_calls(1)
        runner.gate.set()
        await settle(task)
    assert engine.config.policy == "adaptive"


async def test_a_dying_dispatcher_fails_every_caller_and_surfaces_at_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = StagingRunner()
    engine = make_engine(runner, EngineConfig(max_batch_size=1))
    await engine.start()
    first = asyncio.create_task(engine.submit("first"))
    await runner.wait_for_calls(1)

    def broken(*args: object) -> None:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr("batcher.queue.select_batch", broken)
    second = asyncio.create_task(engine.submit("second"))
    with pytest.raises(EngineClosed):
        await second
    assert not engine.healthy
    with pytest.raises(EngineClosed):
        await engine.submit("third")
    runner.gate.set()
    with pytest.raises(RuntimeError, match="dispatch task failed") as info:
        await engine.aclose()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    await settle(first)


async def test_thread_runner_keeps_the_loop_free_while_the_model_computes() -> None:
    release = threading.Event()

    class BlockingModel:
        def cost(self, payload: str) -> int:
            return 1

        def predict(self, payloads: Sequence[str]) -> list[str]:
            if not release.wait(timeout=30):
                raise TimeoutError("test never released the model")
            return [p[::-1] for p in payloads]

    runner = ThreadRunner(BlockingModel())
    try:
        async with make_engine(runner) as engine:
            task = asyncio.create_task(engine.submit("abc"))
            await asyncio.sleep(0)
            # The loop still runs other work while the model blocks its thread.
            ticked = asyncio.Event()
            asyncio.get_running_loop().call_soon(ticked.set)
            await ticked.wait()
            assert not task.done()
            release.set()
            assert (await task).value == "cba"
    finally:
        runner.close()


async def test_the_engine_learns_the_device_cost_and_then_serves_faster_than_fill() -> None:
    """A CPU-like fake: each pass takes 8 ms + 0.4 ms per padded token (virtual time)."""

    rng = random.Random(0)
    texts = ["x" * rng.randint(4, 120) for _ in range(600)]

    async def serve(sizing: str) -> tuple[float, float, Engine[str, str]]:
        runner = PaddedCostRunner(overhead_s=0.008, per_token_s=0.0004)
        runner.gate.set()
        config = EngineConfig(max_batch_size=32, batch_sizing=sizing)  # type: ignore[arg-type]
        async with make_engine(runner, config) as engine:
            for wave in range(0, 300, 20):  # traffic in waves: batches of many sizes
                await asyncio.gather(*(engine.submit(t) for t in texts[wave : wave + 20]))
            learned_from, started = len(runner.calls), engine.clock()

            async def client(k: int) -> None:  # closed loop: at most 64 items queued
                for t in texts[300 + k :: 64]:
                    await engine.submit(t)

            await asyncio.gather(*(client(k) for k in range(64)))
            elapsed = engine.clock() - started
        later = runner.calls[learned_from:]
        padded = sum(len(c.payloads) * bucket_length(max(map(len, c.payloads))) for c in later)
        return elapsed, padded / sum(len(p) for c in later for p in c.payloads), engine

    learned_s, learned_padding, engine = await serve("learned")
    fill_s, fill_padding, _ = await serve("fill")
    fit = engine.stats().learned_cost
    assert fit is not None
    assert fit.overhead_s == pytest.approx(0.008, rel=0.1)
    assert fit.per_token_s == pytest.approx(0.0004, rel=0.05)
    assert learned_padding < fill_padding
    assert learned_s < 0.9 * fill_s, f"learned {learned_s:.2f} s vs fill {fill_s:.2f} s"


async def test_alike_long_inputs_keep_full_batches_whatever_min_batch_gain() -> None:
    """Where a batch buys almost nothing (1 ms + 0.2 ms per padded token, 250-token
    inputs: batch 32 saves 2 % per item) but every input is alike, a smaller batch would
    only reorder them and pay one more overhead: `min_batch_gain` changes no batch."""

    rng = random.Random(1)
    gaps = [rng.expovariate(16.0) for _ in range(400)]  # 85 % of 1 / 52.2 ms

    async def serve(gain: float, short_every: int = 0) -> list[list[str]]:
        runner = PaddedCostRunner(overhead_s=0.001, per_token_s=0.0002)
        runner.gate.set()
        async with make_engine(runner, EngineConfig(min_batch_gain=gain)) as engine:
            tasks = []
            for k, gap in enumerate(gaps):
                await asyncio.sleep(gap)  # virtual time: Poisson arrivals
                length = 12 if short_every and k % short_every == 0 else 250
                tasks.append(asyncio.create_task(engine.submit(f"{k:04d}".ljust(length, "x"))))
            await asyncio.gather(*tasks)
            assert engine.stats().learned_cost is not None
        return [c.payloads for c in runner.calls]

    with_gain, without = await serve(0.05), await serve(0.0)
    assert sum(map(len, with_gain)) == 400
    assert with_gain == without
    assert max(map(len, with_gain)) > 2, "batches do form"
    # The control: with short inputs flowing (one in five), the same long ones are cut.
    mixed = await serve(0.05, short_every=5)
    long_batches = [b for b in mixed if len(b[0]) > 100]
    assert max(map(len, long_batches)) < max(map(len, with_gain))


# -- replicas: several runners fed from one queue --------------------------------------


async def test_batches_spread_over_replicas_from_one_queue() -> None:
    a, b = GatedRunner(), GatedRunner()
    async with make_engine([a, b], EngineConfig(max_batch_size=4)) as engine:
        tasks = [asyncio.create_task(engine.submit(x)) for x in texts(20)]
        await a.wait_for_calls(1)
        await b.wait_for_calls(1)  # both compute at once: the second did not wait
        assert a.running == b.running == 1
        a.gate.set()
        b.gate.set()
        results = await settle(*tasks)
    assert [r.value for r in results] == [x.upper() for x in texts(20)]  # type: ignore[attr-defined]
    assert sorted(a.computed + b.computed) == sorted(texts(20))
    assert engine.metrics.replica_batches(0)._value.get() >= 1
    assert engine.metrics.replica_batches(1)._value.get() >= 1


async def test_a_failed_replica_is_taken_out_and_the_others_serve_everything() -> None:
    class Broken(GatedRunner):
        async def run(self, payloads: Sequence[str]) -> list[str]:
            self.calls.append(Call(list(payloads), asyncio.get_running_loop().time()))
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    class Slow(GatedRunner):
        async def run(self, payloads: Sequence[str]) -> list[str]:
            await asyncio.sleep(1.0)  # virtual time: busy, so the broken one gets work too
            return await super().run(payloads)

    broken, healthy = Broken(), Slow()
    healthy.gate.set()
    config = EngineConfig(max_batch_size=4, policy="window", max_wait_ms=1)
    async with make_engine([broken, healthy], config) as engine:
        inputs = texts(40)
        results = await asyncio.gather(*(engine.submit(x) for x in inputs))
        assert engine.alive_replicas == 1
        assert engine.healthy
        calls_when_removed = len(broken.calls)
        more = await asyncio.gather(*(engine.submit(x) for x in texts(20, prefix="m")))
    assert [r.value for r in results] == [x.upper() for x in inputs]
    assert [r.value for r in more] == [x.upper() for x in texts(20, prefix="m")]
    assert len(broken.calls) == calls_when_removed, "no batch reaches a replica taken out"
    assert engine.metrics.outcome["failed"]._value.get() == 0
    assert engine.metrics.replicas_alive._value.get() == 1


async def test_a_poison_input_fails_alone_and_strikes_no_replica() -> None:
    a, b = open_runner(), open_runner()
    config = EngineConfig(max_batch_size=8, policy="window", max_wait_ms=1)
    async with make_engine([a, b], config) as engine:
        for _ in range(REPLICA_STRIKES + 1):  # more poison than strikes would allow
            inputs = ["a", "b", "boom", "c"]
            results = await asyncio.gather(
                *(engine.submit(x) for x in inputs), return_exceptions=True
            )
            assert isinstance(results[2], InferenceFailed)
            assert [r.value for r in results if not isinstance(r, BaseException)] == [
                "A",
                "B",
                "C",
            ]
        assert engine.alive_replicas == 2, "failing the same input everywhere is the input's fault"


async def test_an_item_that_would_wait_past_its_deadline_is_refused_at_once() -> None:
    class OneSecond(GatedRunner):
        async def run(self, payloads: Sequence[str]) -> list[str]:
            await asyncio.sleep(1.0)  # virtual: 4 items per second at batches of 4
            return await super().run(payloads)

    runner = OneSecond()
    runner.gate.set()
    config = EngineConfig(max_batch_size=4, batch_sizing="fill")
    async with make_engine(runner, config) as engine:
        assert engine.drain_rate() is None
        await asyncio.gather(*(engine.submit(x) for x in texts(40)))  # learn the rate
        assert engine.drain_rate() == pytest.approx(4.0)
        backlog = [asyncio.create_task(engine.submit(x)) for x in texts(20, prefix="b")]
        await asyncio.sleep(0)
        now = engine.clock()
        with pytest.raises(DeadlineUnreachable) as refused:
            await engine.submit("hurry", deadline=now + 2.0)  # about 5 s of queue ahead
        assert engine.clock() == now, "refused at once, not after waiting"
        patient = await engine.submit("patient", deadline=now + 60.0)
        await settle(*backlog)
    assert refused.value.expected_wait_s > 2.0
    assert "hurry" not in runner.computed
    assert patient.value == "PATIENT"
    assert engine.metrics.outcome["rejected_deadline"]._value.get() == 1


async def test_stats_is_a_snapshot_of_queue_device_and_replicas() -> None:
    runner = StagingRunner()
    config = EngineConfig(max_batch_size=2, batch_sizing="fill")
    async with make_engine([runner], config) as engine:
        assert engine.stats().state == "running"
        tasks = [asyncio.create_task(engine.submit(x)) for x in texts(5)]
        await runner.started.wait()
        stats = engine.stats()
        runner.gate.set()  # before any assert: a failed one must not leave the drain waiting
        await settle(*tasks)
        after = engine.stats()
    # Two on the device, the next two taken out as its next batch (one batch is prepared
    # while one runs), one still queued.
    assert (stats.queue_depth, stats.in_flight) == (1, 2)
    assert [(r.index, r.alive, r.busy) for r in stats.replicas] == [(0, True, True)]
    assert (stats.config, stats.healthy, stats.memory_cap_tokens) == (config, True, None)
    assert (after.queue_depth, after.in_flight, after.replicas[0].busy) == (0, 0, False)
    assert (after.items["admitted"], after.items["ok"], after.items["failed"]) == (5, 5, 0)
    assert stats.items["ok"] == 0
    assert engine.stats().state == "closed"


def dispatched(engine: Engine[str, str]) -> dict[str, float]:
    """`microbatch_batches_total` by reason, as `/metrics` shows it."""
    registry = engine.metrics.registry
    reasons = ("idle", "full", "tokens", "window", "drain")
    return {
        r: registry.get_sample_value("microbatch_batches_total", {"model": "", "reason": r}) or 0.0
        for r in reasons
    }


async def test_every_batch_is_counted_with_why_it_left() -> None:
    runner = StagingRunner()  # like CUDA: a batch may wait ready behind the running one
    config = EngineConfig(max_batch_size=4, max_wait_ms=50, policy="adaptive")
    async with make_engine(runner, config) as engine:
        first = asyncio.create_task(engine.submit("alone"))
        await runner.wait_for_calls(1)  # the device was idle
        full = [asyncio.create_task(engine.submit(x)) for x in texts(5, "f")]
        await asyncio.sleep(0)
        # four went as a full batch behind the running one; one waits for its window
        assert (
            engine.metrics.registry.get_sample_value(
                "microbatch_oldest_item_age_seconds", {"model": ""}
            )
            == 0
        )
        await asyncio.sleep(0.02)  # virtual time: the one left over ages
        assert engine.oldest_age() == pytest.approx(0.02)
        runner.gate.set()
        await settle(first, *full)
    counts = dispatched(engine)
    assert counts["idle"] >= 1
    assert counts["full"] == 1
    assert sum(counts.values()) == len(runner.calls)
    fill = engine.metrics.registry.get_sample_value(
        "microbatch_batch_fill_ratio_sum", {"model": ""}
    )
    assert fill == pytest.approx(sum(len(c.payloads) for c in runner.calls) / 4)
    assert engine.oldest_age() == 0.0


async def test_a_window_a_token_budget_and_a_drain_are_told_apart() -> None:
    runner = open_runner()
    window = EngineConfig(max_batch_size=8, max_wait_ms=50, policy="window")
    async with make_engine(runner, window) as engine:
        await engine.submit("w")
        assert dispatched(engine)["window"] == 1
        engine.reconfigure(max_batch_tokens=16)
        await asyncio.gather(*(engine.submit(x) for x in ("aaaaaaaa", "bbbbbbbb")))
        assert dispatched(engine)["tokens"] == 1
        runner.gate.clear()
        stuck = asyncio.create_task(engine.submit("running"))
        async with asyncio.timeout(5):
            await runner.wait_for_calls(3)
        queued = asyncio.create_task(engine.submit("queued"))
        await asyncio.sleep(0)
        closing = asyncio.create_task(engine.aclose())
        await asyncio.sleep(0)
        runner.gate.set()
        await settle(stuck, queued, closing)
    assert dispatched(engine)["drain"] == 1
    compute = engine.metrics.registry.get_sample_value(
        "microbatch_device_compute_seconds_total", {"model": ""}
    )
    assert compute == 0.0, "the fake computes in no virtual time"


class PreparingModel:
    """A thread-blocking model that prepares ahead: `predict` of a batch holding "hold"
    waits until the test releases it; each prepare is recorded with its thread."""

    collates_ahead = True

    def __init__(self, fail_prepare: bool = False) -> None:
        self.release = threading.Event()
        self.holding = threading.Event()
        self.prepared = threading.Event()
        self.prepares: list[tuple[list[str], str]] = []
        self.passes: list[tuple[str, list[str]]] = []
        self.fail_prepare = fail_prepare

    def cost(self, payload: str) -> int:
        return 1

    def prepare(self, payloads: Sequence[str]) -> object:
        self.prepares.append((list(payloads), threading.current_thread().name))
        self.prepared.set()
        if self.fail_prepare:
            raise MemoryError("no pinned memory left")
        return ("prepared", tuple(payloads))

    def _compute(self, kind: str, payloads: Sequence[str]) -> list[str]:
        self.passes.append((kind, list(payloads)))
        if "hold" in payloads:
            self.holding.set()
            if not self.release.wait(timeout=30):
                raise TimeoutError("test never released the model")
        return [p.upper() for p in payloads]

    def predict(self, payloads: Sequence[str]) -> list[str]:
        return self._compute("collated on the device thread", payloads)

    def predict_prepared(self, payloads: Sequence[str], prepared: object) -> list[str]:
        assert prepared == ("prepared", tuple(payloads))
        return self._compute("prepared ahead", payloads)


async def wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 30), "the model's thread never got there"


async def hold_the_device_then_prepare(
    engine: Engine[str, str], model: PreparingModel
) -> tuple[asyncio.Task[Result[str]], list[asyncio.Task[Result[str]]]]:
    """Submit "hold" and wait until its pass blocks the device; then submit "b" and "c"
    (one batch, which must wait) and wait until that batch is being prepared."""
    first = asyncio.create_task(engine.submit("hold"))
    await wait_for(model.holding)
    rest = [asyncio.create_task(engine.submit(t)) for t in ("b", "c")]
    await wait_for(model.prepared)
    return first, rest


async def test_a_batch_waiting_for_its_device_is_prepared_while_the_one_before_computes() -> None:
    model = PreparingModel()
    runner = ThreadRunner(model, thread_name="dev")
    assert runner.collates_ahead
    try:
        async with make_engine(runner, EngineConfig(max_batch_size=2)) as engine:
            first, rest = await hold_the_device_then_prepare(engine, model)
            # Prepared on the collate thread while the first pass still blocks the device.
            assert model.prepares == [(["b", "c"], model.prepares[0][1])]
            assert model.prepares[0][1].startswith("dev-collate")
            assert not first.done()
            model.release.set()
            assert [(await t).value for t in (first, *rest)] == ["HOLD", "B", "C"]
    finally:
        runner.close()
    # The device was free for the first batch: no hop to the collate thread for it.
    assert model.passes == [
        ("collated on the device thread", ["hold"]),
        ("prepared ahead", ["b", "c"]),
    ]


async def test_a_prepared_batch_whose_caller_left_is_collated_again_without_it() -> None:
    model = PreparingModel()
    runner = ThreadRunner(model, thread_name="dev")
    try:
        async with make_engine(runner, EngineConfig(max_batch_size=2)) as engine:
            first, (stays, leaves) = await hold_the_device_then_prepare(engine, model)
            leaves.cancel()
            await asyncio.gather(leaves, return_exceptions=True)
            model.release.set()
            assert (await first).value == "HOLD"
            assert (await stays).value == "B"
    finally:
        runner.close()
    assert model.passes[1] == ("collated on the device thread", ["b"])


async def test_a_prepare_that_fails_leaves_the_batch_to_the_device_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = PreparingModel(fail_prepare=True)
    runner = ThreadRunner(model, thread_name="dev")
    try:
        async with make_engine(runner, EngineConfig(max_batch_size=2)) as engine:
            first, rest = await hold_the_device_then_prepare(engine, model)
            model.release.set()
            assert [(await t).value for t in (first, *rest)] == ["HOLD", "B", "C"]
    finally:
        runner.close()
    assert model.passes[1] == ("collated on the device thread", ["b", "c"])
    assert "preparing a batch ahead failed" in caplog.text


async def test_collating_ahead_is_the_models_choice_unless_the_runner_is_told() -> None:
    model = PreparingModel()
    model.collates_ahead = False  # type: ignore[misc]
    assert not ThreadRunner(model).collates_ahead
    assert ThreadRunner(model, collate_ahead=True).collates_ahead
    assert not ThreadRunner(PreparingModel(), collate_ahead=False).collates_ahead

    class Plain:
        def cost(self, payload: str) -> int:
            return 1

        def predict(self, payloads: Sequence[str]) -> list[str]:
            return list(payloads)

    assert not ThreadRunner(Plain()).collates_ahead
    with pytest.raises(ValueError, match="cannot prepare its batches ahead"):
        ThreadRunner(Plain(), collate_ahead=True)


# -- identical inputs in flight are computed once ---------------------------------------


def sharing_engine(
    runner: Runner[str, str], config: EngineConfig | None = None
) -> Engine[str, str]:
    """An engine on virtual time whose identical inputs (equal strings) share one item."""
    clock = asyncio.get_running_loop().time
    return Engine(runner, config, clock=clock, identity=lambda payload: payload)


async def test_identical_inputs_in_flight_are_computed_once_and_each_caller_answered() -> None:
    runner = GatedRunner()
    async with sharing_engine(runner, EngineConfig(max_batch_size=8)) as engine:
        first = asyncio.create_task(engine.submit("a"))
        await runner.wait_for_calls(1)  # "a" is computing
        joined = [asyncio.create_task(engine.submit(x)) for x in ("a", "b", "b", "a")]
        await asyncio.sleep(0)  # virtual time: let the callers submit
        runner.gate.set()
        results = await settle(first, *joined)
    assert [r.value for r in results] == ["A", "A", "B", "B", "A"]  # type: ignore[union-attr]
    assert sorted(runner.computed) == ["a", "b"], "each distinct input computed once"
    assert engine.stats().items["coalesced"] == 3
    assert engine.stats().items["admitted"] == engine.stats().items["ok"] == 2


async def test_one_caller_leaving_never_cancels_anothers_computation() -> None:
    runner = GatedRunner()
    async with sharing_engine(runner, EngineConfig(max_batch_size=8)) as engine:
        blocker = asyncio.create_task(engine.submit("busy"))
        await runner.wait_for_calls(1)  # the device is busy: what follows stays queued
        leaving = asyncio.create_task(engine.submit("x"))
        staying = asyncio.create_task(engine.submit("x"))
        both_leave = [asyncio.create_task(engine.submit("y")) for _ in range(2)]
        await asyncio.sleep(0)
        leaving.cancel()
        for task in both_leave:
            task.cancel()
        runner.gate.set()
        done = await settle(blocker, leaving, staying, *both_leave)
    assert isinstance(done[1], asyncio.CancelledError)
    assert done[2].value == "X"  # type: ignore[union-attr]
    assert "x" in runner.computed, "still computed for the caller who stayed"
    assert "y" not in runner.computed, "no one waited for it any more"
    assert engine.stats().items["cancelled"] == 1


async def test_each_caller_keeps_its_own_deadline() -> None:
    runner = GatedRunner()
    async with sharing_engine(runner, EngineConfig(max_batch_size=8)) as engine:
        blocker = asyncio.create_task(engine.submit("busy"))
        await runner.wait_for_calls(1)
        hurried = asyncio.create_task(engine.submit("x", deadline=engine.clock() + 0.5))
        patient = asyncio.create_task(engine.submit("x"))
        with pytest.raises(DeadlineExceeded):
            await hurried  # virtual time runs to its deadline while the device is busy
        assert not patient.done()
        runner.gate.set()
        assert (await patient).value == "X"
        await blocker
    assert runner.computed.count("x") == 1
    assert engine.stats().items["expired"] == 0, "the item itself did not expire"


async def test_a_later_deadline_keeps_a_shared_item_queued_past_the_first_callers() -> None:
    runner = GatedRunner()
    async with sharing_engine(runner, EngineConfig(max_batch_size=8)) as engine:
        blocker = asyncio.create_task(engine.submit("busy"))
        await runner.wait_for_calls(1)
        short = asyncio.create_task(engine.submit("x", deadline=engine.clock() + 0.5))
        longer = asyncio.create_task(engine.submit("x", deadline=engine.clock() + 5.0))
        with pytest.raises(DeadlineExceeded):
            await short
        await asyncio.sleep(1.0)  # virtual time: past the first deadline, before the second
        runner.gate.set()
        assert (await longer).value == "X"
        await blocker


async def test_an_input_is_computed_again_once_its_twin_has_finished() -> None:
    runner = open_runner()
    async with sharing_engine(runner) as engine:
        assert (await engine.submit("a")).value == "A"
        assert (await engine.submit("a")).value == "A"
    assert runner.computed == ["a", "a"], "coalescing is not a cache"


async def test_a_shared_failure_reaches_every_caller() -> None:
    runner = GatedRunner()
    async with sharing_engine(runner, EngineConfig(max_batch_size=8)) as engine:
        blocker = asyncio.create_task(engine.submit("busy"))
        await runner.wait_for_calls(1)
        twins = [asyncio.create_task(engine.submit("boom")) for _ in range(2)]
        await asyncio.sleep(0)
        runner.gate.set()
        outcomes = await settle(blocker, *twins)
    assert all(isinstance(o, InferenceFailed) for o in outcomes[1:])
    assert runner.computed.count("boom") == 1


async def test_without_an_identity_nothing_is_shared() -> None:
    runner = GatedRunner()
    async with make_engine(runner, EngineConfig(max_batch_size=8)) as engine:
        blocker = asyncio.create_task(engine.submit("busy"))
        await runner.wait_for_calls(1)
        twins = [asyncio.create_task(engine.submit("a")) for _ in range(2)]
        await asyncio.sleep(0)
        runner.gate.set()
        await settle(blocker, *twins)
    assert runner.computed.count("a") == 2


async def test_short_inputs_do_not_queue_behind_long_ones() -> None:
    """The mix on a CPU-like fake (1 ms + 0.17 ms per padded token: a 256-token chunk
    takes 45 ms, a query 4-5 ms): 80 % queries, 20 % chunks, Poisson at ~80 % of the
    device. Batches form around the highest response ratio, and chunks go a few at a
    time while queries flow (`min_batch_gain`), so a query waits for the batch already
    computing and little more; in arrival order (`max_overtakes=0`) it waits behind
    every chunk queued before it."""

    rng = random.Random(7)
    arrivals = [(rng.expovariate(64.0), rng.random() < 0.2) for _ in range(1200)]

    async def serve(config: EngineConfig, chunks: bool = True) -> dict[bool, list[float]]:
        runner = PaddedCostRunner(overhead_s=0.001, per_token_s=0.00017)
        runner.gate.set()
        latencies: dict[bool, list[float]] = {True: [], False: []}
        async with make_engine(runner, config) as engine:
            for wave in range(12):  # batches of many sizes and lengths: the cost is learned
                lengths = [16 + 48 * (wave % 6)] * (1 + 2 * wave)
                await asyncio.gather(
                    *(engine.submit(f"w{wave}-{i}".ljust(n, "w")) for i, n in enumerate(lengths))
                )
            assert engine.stats().learned_cost is not None

            async def one(k: int, chunk: bool) -> None:
                started = engine.clock()
                await engine.submit(f"{k:05d}".ljust(256 if chunk else 12 + k % 12, "x"))
                latencies[chunk].append(engine.clock() - started)

            tasks = []
            for k, (gap, chunk) in enumerate(arrivals):
                await asyncio.sleep(gap)  # virtual time: Poisson arrivals
                if chunks or not chunk:
                    tasks.append(asyncio.create_task(one(k, chunk)))
            await asyncio.gather(*tasks)
        return {kind: sorted(values) for kind, values in latencies.items()}

    def p99(values: list[float]) -> float:
        return values[int(0.99 * len(values))]

    chunk_s = 0.001 + 0.00017 * 256
    config = EngineConfig(max_batch_size=32)
    alone = (await serve(config, chunks=False))[False]
    mixed = await serve(config)
    in_order = await serve(config.replace(max_overtakes=0))
    assert len(mixed[True]) == sum(chunk for _, chunk in arrivals), "every chunk is served"
    # Without preempting a forward pass, a query may find a chunk computing, then waits
    # about its own batch and one queued before it.
    assert p99(mixed[False]) <= chunk_s + 3 * p99(alone), f"{p99(mixed[False]):.3f} s"
    assert p99(mixed[False]) < 0.5 * p99(in_order[False])
    assert p99(mixed[True]) < 1.5 * p99(in_order[True]), "chunks pay little for it"
