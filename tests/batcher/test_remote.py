"""The engine across a real Unix socket: several front-ends share one engine's batches
and its one bounded queue, and every guarantee of `submit` holds across the link."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from batcher import (
    DeadlineExceeded,
    Engine,
    EngineClosed,
    EngineConfig,
    InferenceFailed,
    Owner,
    QueueFull,
    Result,
)
from batcher.remote import EngineServer, RemoteCause, RemoteEngine, socket_dir
from tests.batcher.fakes import GatedRunner, Poison, StagingRunner, open_runner

pytestmark = pytest.mark.asyncio


async def until(done: Callable[[], bool]) -> None:
    """Let the other end (the engine's tasks, across the socket) move until `done`."""
    while not done():  # noqa: ASYNC110 (state another task reaches)
        await asyncio.sleep(0)


@asynccontextmanager
async def served(
    runner: GatedRunner, config: EngineConfig | None = None, front_ends: int = 2
) -> AsyncIterator[tuple[Engine[str, str], list[RemoteEngine[str, str]]]]:
    directory = socket_dir()
    path = os.path.join(directory, "engine.sock")
    engine: Engine[str, str] = Engine(runner, config)
    server = EngineServer(engine, path)
    remotes = [RemoteEngine[str, str](path) for _ in range(front_ends)]
    try:
        async with asyncio.timeout(30):
            await engine.start()
            await server.start()
            for remote in remotes:
                await remote.connect()
            yield engine, remotes
    finally:
        for remote in remotes:
            await remote.aclose()
        await engine.aclose()
        await server.aclose()
        shutil.rmtree(directory, ignore_errors=True)


async def test_front_ends_share_batches_and_each_gets_its_own_results() -> None:
    runner = GatedRunner()
    async with served(runner, EngineConfig(max_batch_size=16)) as (engine, [a, b]):
        first = asyncio.create_task(a.submit("first"))
        await runner.wait_for_calls(1)  # the device is busy: what comes next is gathered
        tasks = [asyncio.create_task(r.submit(f"{name}{i}")) for i in range(6)
                 for r, name in ((a, "a"), (b, "b"))]  # fmt: skip
        await until(lambda: engine.queue_depth >= 12)
        runner.gate.set()
        results = await asyncio.gather(first, *tasks)
    assert [r.value for r in results] == ["FIRST"] + [
        f"{name}{i}".upper() for i in range(6) for name in ("a", "b")
    ]
    second = runner.calls[1].payloads
    assert len(second) == 12, "one batch holds both front-ends' items"
    assert {p[0] for p in second} == {"a", "b"}


async def test_owners_cross_the_link_and_the_fair_share_holds_across_front_ends() -> None:
    """Front-end a queues ten of tenant x's items, then b two of y's: y's go in the next
    batch beside x's oldest, as they would in one process (oldest first would send x's
    four); and each result carries its share of the device time back."""
    runner = GatedRunner()
    async with served(runner, EngineConfig(max_batch_size=4)) as (engine, [a, b]):
        first = asyncio.create_task(a.submit("first"))
        await runner.wait_for_calls(1)
        x = [asyncio.create_task(a.submit(f"x{i}", owner=Owner("x"))) for i in range(10)]
        await until(lambda: engine.queue_depth >= 10)
        y = [asyncio.create_task(b.submit(f"y{i}", owner=Owner("y", 2.0))) for i in range(2)]
        await until(lambda: engine.queue_depth >= 12)
        runner.gate.set()
        results = await asyncio.gather(first, *x, *y)
    assert sorted(runner.calls[1].payloads) == ["x0", "x1", "y0", "y1"]
    assert all(r.device_s > 0 for r in results)


async def test_the_one_bounded_queue_refuses_across_front_ends() -> None:
    runner = StagingRunner()  # like CUDA: one batch is handed out ahead
    config = EngineConfig(max_batch_size=1, max_queue_size=2)
    async with served(runner, config) as (engine, [a, b]):
        running = asyncio.create_task(a.submit("running"))
        await runner.wait_for_calls(1)
        queued = [asyncio.create_task(a.submit("q0"))]
        await until(lambda: engine.stats().in_flight == 2)  # q0: the batch prefetched
        queued += [asyncio.create_task(a.submit(f"q{i}")) for i in (1, 2)]
        await until(lambda: engine.queue_depth == 2)
        with pytest.raises(QueueFull) as refused:
            await b.submit("one too many")
        assert (refused.value.queue_size, refused.value.max_queue_size) == (2, 2)
        runner.gate.set()
        results = await asyncio.gather(running, *queued)
        assert [r.value for r in results] == ["RUNNING", "Q0", "Q1", "Q2"]


async def test_a_caller_that_goes_away_is_never_computed() -> None:
    runner = GatedRunner()
    async with served(runner, EngineConfig(max_batch_size=4)) as (engine, [a, _]):
        running = asyncio.create_task(a.submit("running"))
        await runner.wait_for_calls(1)
        gone = asyncio.create_task(a.submit_many(["gone1", "gone2"]))
        kept = asyncio.create_task(a.submit("kept"))
        await until(lambda: engine.queue_depth >= 3)
        gone.cancel()
        await until(lambda: engine.stats().items.get("cancelled", 0) >= 2)
        runner.gate.set()
        assert (await kept).value == "KEPT"
        await running
    assert not any(p.startswith("gone") for p in runner.computed)


async def test_a_front_end_that_disconnects_has_its_items_cancelled() -> None:
    runner = GatedRunner()
    async with served(runner, EngineConfig(max_batch_size=4)) as (engine, [a, b]):
        running = asyncio.create_task(b.submit("running"))
        await runner.wait_for_calls(1)
        orphans = asyncio.create_task(a.submit_many(["orphan1", "orphan2"]))
        await until(lambda: engine.queue_depth >= 2)
        await a.aclose()  # the front-end process went away
        with pytest.raises(EngineClosed):
            await orphans
        await until(lambda: engine.stats().items.get("cancelled", 0) >= 2)
        runner.gate.set()
        assert (await running).value == "RUNNING"
        assert (await b.submit("after")).value == "AFTER"
    assert not any(p.startswith("orphan") for p in runner.computed)


async def test_a_deadline_passes_across_the_link() -> None:
    runner = GatedRunner()
    async with served(runner) as (_, [a, _]):
        running = asyncio.create_task(a.submit("running"))
        await runner.wait_for_calls(1)
        with pytest.raises(DeadlineExceeded):
            await a.submit("late", deadline=a.clock() + 0.05)
        runner.gate.set()
        await running
    assert "late" not in runner.computed


async def test_a_failing_input_fails_alone_and_its_cause_crosses_the_link() -> None:
    """The front-end gets InferenceFailed with the model's own exception as its cause
    (repr and traceback), as a one-process caller does; the other input is answered."""
    async with served(open_runner()) as (_, [a, b]):
        failed, answered = await asyncio.gather(
            a.submit("boom"), b.submit("fine"), return_exceptions=True
        )
    assert isinstance(failed, InferenceFailed)
    assert isinstance(answered, Result)
    assert answered.value == "FINE"
    cause = failed.__cause__
    assert isinstance(cause, RemoteCause)
    assert repr(cause) == repr(Poison("cannot handle a batch holding 'boom'"))
    assert str(cause).startswith("Traceback"), "the engine process's traceback"
    assert "raise Poison" in str(cause)


async def test_the_engine_going_away_fails_every_waiting_caller() -> None:
    runner = GatedRunner()
    async with served(runner) as (engine, [a, b]):
        running = asyncio.create_task(a.submit("running"))
        await runner.wait_for_calls(1)
        waiting = asyncio.create_task(b.submit("waiting"))
        await until(lambda: engine.queue_depth >= 1)
        drain = asyncio.create_task(engine.aclose(timeout_s=0))  # the engine fails its items
        with pytest.raises(EngineClosed):
            await waiting
        runner.gate.set()
        await drain
        await asyncio.gather(running, return_exceptions=True)
        with pytest.raises(EngineClosed, match="not admitting"):
            await a.submit("after")


async def test_control_reads_stats_and_reconfigures() -> None:
    async with served(open_runner()) as (engine, [a, b]):
        stats = await a.control("reconfigure", max_batch_size=7, max_wait_ms=3.0)
        assert (stats.config.max_batch_size, stats.config.max_wait_ms) == (7, 3.0)
        seen = await b.control("stats")
        assert seen.config.max_batch_size == 7 == engine.config.max_batch_size
        with pytest.raises(ValueError, match="max_batch_size"):
            await a.control("reconfigure", max_batch_size=0)
        assert (await a.submit("x")).value == "X"


async def test_idle_returns_once_every_submit_is_answered() -> None:
    """What a front-end's drain waits for: the replies of everything it handed over."""
    runner = GatedRunner()
    async with served(runner, EngineConfig(max_batch_size=4)) as (_, [a, _b]):
        await a.idle()  # nothing submitted: at once
        tasks = [asyncio.create_task(a.submit(f"x{i}")) for i in range(3)]
        await runner.wait_for_calls(1)
        assert a.submitting == 3
        idle = asyncio.create_task(a.idle())
        await asyncio.sleep(0)
        assert not idle.done()
        runner.gate.set()
        await idle
        assert all(t.done() for t in tasks)
        assert a.submitting == 0


async def test_a_drain_out_of_time_fails_what_still_waits() -> None:
    """Then the front-end closes its connection, and the engine cancels those items."""
    runner = GatedRunner()
    config = EngineConfig(max_batch_size=1)
    async with served(runner, config) as (engine, [a, _b]):
        running = asyncio.create_task(a.submit("running"))
        await runner.wait_for_calls(1)
        queued = asyncio.create_task(a.submit("queued"))
        await until(lambda: engine.stats().in_flight + engine.queue_depth == 2)
        a.fail_waiting("the server shut down before these items were computed")
        for task in (running, queued):
            with pytest.raises(EngineClosed, match="shut down"):
                await task
        assert a.submitting == 0
        runner.gate.set()


async def test_a_control_the_engine_does_not_answer_times_out() -> None:
    answered = asyncio.Event()

    async def never() -> None:
        await answered.wait()  # released only after the caller gave up

    directory = socket_dir()
    path = os.path.join(directory, "engine.sock")
    engine: Engine[str, str] = Engine(open_runner())
    server = EngineServer(engine, path, handlers={"never": never})
    remote = RemoteEngine[str, str](path)
    try:
        async with asyncio.timeout(30):
            await engine.start()
            await server.start()
            await remote.connect()
            with pytest.raises(TimeoutError):
                await remote.control("call", name="never", timeout_s=0.05)
            answered.set()
            assert (await remote.control("stats", timeout_s=10)).state == "running"
    finally:
        await remote.aclose()
        await engine.aclose()
        await server.aclose()
        shutil.rmtree(directory, ignore_errors=True)


async def test_notices_reach_every_front_end_and_the_engine_in_order() -> None:
    """`broadcast` reaches each connected front-end's `on_notice`; `notify` reaches the
    engine's handler of its topic; neither waits for a reply, and one of an unknown
    topic is dropped."""
    directory = socket_dir()
    path = os.path.join(directory, "engine.sock")
    engine: Engine[str, str] = Engine(GatedRunner())
    engine_heard: list[object] = []
    heard_all = asyncio.Event()

    def hear(value: object) -> None:
        engine_heard.append(value)
        if len(engine_heard) == 4:
            heard_all.set()

    server = EngineServer(engine, path, notices={"state": hear})
    front_heard: list[list[tuple[str, object]]] = [[], []]
    remotes = [
        RemoteEngine[str, str](path, on_notice=lambda t, v, i=i: front_heard[i].append((t, v)))
        for i in range(2)
    ]
    try:
        async with asyncio.timeout(30):
            await server.start()
            for remote in remotes:
                await remote.connect()
            await until(lambda: server.connected == 2)
            for n in range(3):
                server.broadcast("report", n)
            await until(lambda: all(len(h) == 3 for h in front_heard))
            remotes[0].notify("state", ("a", 1))
            remotes[1].notify("unknown", "dropped")
            remotes[1].notify("state", ("b", 1))
            remotes[0].notify("state", ("a", 2))
            remotes[1].notify("state", ("b", 2))
            await heard_all.wait()
    finally:
        for remote in remotes:
            await remote.aclose()
        await server.aclose()
        shutil.rmtree(directory, ignore_errors=True)
    assert front_heard == [[("report", 0), ("report", 1), ("report", 2)]] * 2
    assert [v for v in engine_heard if v[0] == "a"] == [("a", 1), ("a", 2)]  # type: ignore[index]
    assert [v for v in engine_heard if v[0] == "b"] == [("b", 1), ("b", 2)]  # type: ignore[index]
