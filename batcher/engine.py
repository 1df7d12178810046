"""The engine: admits items, forms batches with the policy, runs them, settles every future.

Everything here runs on the event-loop thread; the model runs behind a `Runner` (see
`batcher.runner.ThreadRunner`), or behind several: one replica per device
(`batcher.replicas`), all fed from the one queue (`batcher.queue`), each batch going to
whichever replica is free. What to run and when is the policy's (`batcher.policy`); what
the device taught is in `batcher.cost`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from batcher.callers import Callers
from batcher.config import EngineConfig
from batcher.errors import DeadlineUnreachable, EngineClosed, ItemTooLarge
from batcher.execution import Executor
from batcher.fairness import Owner
from batcher.items import Lane, PendingItem, Result
from batcher.metrics import EngineMetrics
from batcher.padding import bucket_length
from batcher.policy import Dispatch, DispatchReason, batch_limits, decide
from batcher.queue import PendingQueue
from batcher.replicas import ReplicaPool
from batcher.runner import Runner
from batcher.sharing import DeviceShare, Grant, Waiting, waiting_work
from batcher.stats import EngineStats, State
from batcher.steering import Steering

InT = TypeVar("InT")
OutT = TypeVar("OutT")

logger = logging.getLogger("batcher.engine")


class Engine(Generic[InT, OutT]):
    """Dynamic micro-batching in front of one `Runner`.

    Use it as an async context manager (or call `start` and `aclose`); then
    `await engine.submit(x)` from any task on the same loop. `runner` may be a sequence
    of runners (one per device): each batch goes to a free one. `clock` is injectable so
    that tests can run on virtual time. With `identity` (a payload's key, or None for
    one never to share), an input identical to one already queued or computing joins it
    instead of being computed again; each caller still gets its own result, deadline
    and cancellation. With `share` (its place in a `batcher.sharing.DeviceScheduler`),
    the engine shares its devices with other engines: each batch waits for its turn, and
    runs on the replica of the device it was given.
    """

    def __init__(
        self,
        runner: Runner[InT, OutT] | Sequence[Runner[InT, OutT]],
        config: EngineConfig | None = None,
        *,
        metrics: EngineMetrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
        identity: Callable[[InT], Hashable | None] | None = None,
        share: DeviceShare | None = None,
    ) -> None:
        runners = list(runner) if isinstance(runner, Sequence) else [runner]
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self._pool = ReplicaPool(runners, self.metrics.replicas_alive.set)
        self._runner = runners[0]  # for `cost`: every replica runs the same model
        self.clock = clock
        """Monotonic seconds; `enqueued_at`, deadlines and timings are on this clock."""
        self._queue: PendingQueue[InT, OutT] = PendingQueue(self.metrics)
        self._callers: Callers[InT, OutT] = Callers(identity, self.metrics)
        self._has_work = asyncio.Event()
        self._executor: Executor[InT, OutT] = Executor(
            self._pool, self._queue.wanted, self.metrics, clock, self._queue.lanes
        )
        ahead = self._executor.prepares_ahead
        self._steering = Steering(
            config if config is not None else EngineConfig(),
            clock=clock,
            metrics=self.metrics,
            queue_depth=lambda: len(self._queue),
            wake=self._has_work.set,
            window_matters=lambda limits: ahead or limits.policy == "window",
        )
        self._in_flight = 0
        self._batches: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._state: State = "new"
        self._failure: BaseException | None = None
        self.metrics.watch(self.busy_for, lambda: len(self._queue), self.oldest_age,
                           lambda: self._in_flight, lambda: self._executor.memory_cap.tokens,
                           lambda: self.config)  # fmt: skip
        self._executor.on_computed = self._steering.observer
        self._share: DeviceShare | None = None
        self.join(share)

    def join(self, share: DeviceShare | None) -> None:
        """Share the devices from the next batch on (None: no longer), e.g. live loads."""
        self._share = share
        if share is not None:
            share.bind(self._waiting, self._has_work.set)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the dispatch task. Raises RuntimeError if already started."""
        if self._state != "new":
            raise RuntimeError(f"engine already started (state {self._state})")
        self._state = "running"
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="microbatch-dispatch")

    async def aclose(self, timeout_s: float | None = None) -> None:
        """Stop admitting, finish every admitted item, then stop.

        Items still unanswered after `timeout_s` fail with `EngineClosed`. Re-raises the
        exception of a dispatch task that died, so a bug cannot pass silently.
        """
        if self._state == "new":
            self._state = "closed"
            return
        if self._state != "closed":
            await self._drain(timeout_s)
        if self._failure is not None:
            raise RuntimeError("the engine's dispatch task failed") from self._failure

    async def _drain(self, timeout_s: float | None) -> None:
        self._state = "draining"
        self._has_work.set()
        assert self._dispatcher is not None
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.wait([self._dispatcher])
                while self._batches:
                    await asyncio.wait(set(self._batches))
        except TimeoutError:
            logger.warning("drain timed out after %ss; failing what is left", timeout_s)
        finally:
            self._state = "closed"
            tasks = [self._dispatcher, *self._batches]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._queue.fail_all(EngineClosed("the engine shut down before this item ran"))

    async def __aenter__(self) -> Engine[InT, OutT]:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def stats(self) -> EngineStats:
        """A snapshot of the engine's state, limits and replicas."""
        return EngineStats(
            state=self._state,
            healthy=self.healthy,
            config=self.config,
            configured=self._steering.configured,
            slo=self._steering.stats(),
            queue_depth=len(self._queue),
            in_flight=self._in_flight,
            busy_for_s=self.busy_for(),
            memory_cap_tokens=self._executor.memory_cap.tokens,
            items=dict(self.metrics.counts),
            learned_cost=self._executor.cost.estimate(),
            replicas=self._pool.stats(),
        )

    @property
    def state(self) -> State:
        return self._state

    @property
    def healthy(self) -> bool:
        """False once the dispatch task has died; an orchestrator should restart us."""
        return self._failure is None and self._state in ("running", "draining")

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def config(self) -> EngineConfig:
        """The live limits: as configured, or the SLO controller's choice within them."""
        return self._steering.live

    def busy_for(self) -> float:
        """Seconds the longest-running forward pass now on a device has run; 0.0 when
        all are idle. A value far above the usual batch time means a worker is stuck."""
        since = self._pool.busy_since()
        return 0.0 if since is None else max(0.0, self.clock() - since)

    def oldest_age(self) -> float:
        """Seconds the oldest item still waiting in the queue has waited; 0.0 when none."""
        return self._queue.oldest_age(self.clock())

    def drain_rate(self) -> float | None:
        """Items per second the live replicas compute while busy (recent batches), or
        None until enough batches have run."""
        rate = self._executor.drain_rate.per_replica()
        return None if rate is None else self._pool.alive * rate

    def expected_wait(self, extra: int = 0) -> float | None:
        """Seconds until `extra` new items would reach a device, at the drain rate."""
        rate = self.drain_rate()
        return None if rate is None else (len(self._queue) + extra) / rate

    @property
    def alive_replicas(self) -> int:
        return self._pool.alive

    @property
    def configured(self) -> EngineConfig:
        """The limits as set; `config` is what is live (the SLO controller's choice)."""
        return self._steering.configured

    def reconfigure(self, **changes: object) -> EngineConfig:
        """Apply new limits at once (validated; raises ValueError) and return the live
        ones. Queued items stay. Also forgets the memory cap, so that a new limit can be
        tried. New `max_batch_size`, `max_wait_ms` or `slo_p99_ms` restart the SLO
        controller from the new limits."""
        self._steering.set(self.configured.replace(**changes), frozenset(changes))
        self._executor.on_computed = self._steering.observer
        self._executor.memory_cap.forget()
        self._has_work.set()
        return self.config

    # -- admission ---------------------------------------------------------------------

    async def submit(
        self, payload: InT, *, deadline: float | None = None, lane: Lane = "interactive",
        owner: Owner | None = None,
    ) -> Result[OutT]:  # fmt: skip
        """Queue one input and wait for its result.

        `deadline` is an absolute time on `engine.clock` (`engine.clock() + timeout_s`);
        `lane`: `bulk` goes after `interactive` work, with a share kept (`batcher.lanes`);
        `owner`: the tenant whose item it is, for the fair share (`batcher.fairness`).
        Raises QueueFull, EngineClosed or ItemTooLarge at once; DeadlineUnreachable at once
        when, at the rate the devices drain the queue, it would reach a device only after
        its deadline; DeadlineExceeded when the deadline passes first; InferenceFailed when
        the model fails on this input."""
        [result] = await self.submit_many([payload], deadline=deadline, lane=lane, owner=owner)
        return result

    async def submit_many(
        self, payloads: Sequence[InT], *, deadline: float | None = None,
        lane: Lane = "interactive", owner: Owner | None = None,
    ) -> list[Result[OutT]]:  # fmt: skip
        """Queue several inputs at once, all or none, and wait for all their results. Each
        is batched on its own; if one fails, the others are cancelled (those not yet
        computed never will be) and its error is raised."""
        items = self._admit(payloads, deadline, lane == "bulk", owner)
        wait_s = None if deadline is None else deadline - self.clock()
        return await self._callers.wait(items, wait_s)

    def check_room(self, n: int = 1, owner: Owner | None = None) -> None:
        """Raise QueueFull (and count it) unless `n` more items (of `owner`) fit in the
        queue now (`PendingQueue.check_room`). `submit` calls it; a server may call it
        before parsing a request, to refuse cheaply under overload."""
        self._queue.check_room(n, self.config.max_queue_size, owner)

    def _admit(
        self, payloads: Sequence[InT], deadline: float | None, bulk: bool = False,
        owner: Owner | None = None,
    ) -> list[PendingItem[InT, OutT]]:  # fmt: skip
        if self._state != "running":
            self.metrics.count("rejected_closed", len(payloads))
            raise EngineClosed(f"the engine is {self._state}; not admitting new items")
        config = self.config
        self.check_room(len(payloads), owner)
        now = self.clock()
        if deadline is not None and len(self._queue):
            wait_s = self.expected_wait(len(payloads))
            if wait_s is not None and now + wait_s > deadline:
                self.metrics.count("rejected_deadline", len(payloads))
                raise DeadlineUnreachable(wait_s, max(0.0, deadline - now))
        costs = [self._runner.cost(payload) for payload in payloads]
        if config.max_batch_tokens is not None:
            for cost in costs:
                if bucket_length(cost) > config.max_batch_tokens:
                    raise ItemTooLarge(bucket_length(cost), config.max_batch_tokens)
        items: list[PendingItem[InT, OutT]] = []
        fresh: list[PendingItem[InT, OutT]] = []
        for payload, cost in zip(payloads, costs, strict=True):
            item, new = self._callers.admit(payload, now, deadline, cost, bulk, owner)
            if new:
                fresh.append(item)
            items.append(item)
        self._queue.extend(fresh)
        self.metrics.count("admitted", len(fresh))
        self._has_work.set()
        return items

    # -- dispatch ----------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        clock = self.clock
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._queue.drop_settled_head()
                draining = self._state == "draining"
                if draining and not len(self._queue) and self._in_flight == 0:
                    return
                decision = decide(self._queue.items, clock(), self.config, self._in_flight,
                                  self.alive_replicas, ahead=self._executor.prepares_ahead,
                                  draining=draining)  # fmt: skip
                share = self._share
                if share is not None and share.holds(len(self._queue)):
                    decision = Dispatch("idle")  # a device is held for this engine
                if isinstance(decision, Dispatch):
                    grant = await share.turn() if share is not None else None
                    cost = self._executor.cost.estimate()
                    limits = batch_limits(self.config, self._executor.memory_cap.tokens)
                    if grant is not None:
                        limits = grant.limits(limits, cost, self._queue.items, self.metrics.totals)
                    batch = self._queue.take(clock(), limits, cost)
                    self._launch(batch, decision.reason, grant)
                    continue
                self._has_work.clear()
                wake_at = decision.until
                if wake_at is None:
                    await self._has_work.wait()
                    continue
                # A timer that sets the event costs less than a timeout scope around the
                # wait, and this runs once per batch.
                timer = loop.call_later(max(0.0, wake_at - clock()), self._has_work.set)
                try:
                    await self._has_work.wait()
                finally:
                    timer.cancel()
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                logger.exception("dispatch task failed; failing every queued item")
                self._failure = exc
                self._state = "closed"
            self._queue.fail_all(EngineClosed("the engine stopped before this item ran"))
            raise

    def _launch(
        self, batch: list[PendingItem[InT, OutT]], reason: DispatchReason, grant: Grant | None
    ) -> None:
        if not batch:
            if grant is not None:
                grant.release(used=False)
            return
        self.metrics.record_dispatch(reason, len(batch), self.config.max_batch_size)
        if grant is not None:
            grant.bulk = batch[0].bulk
        self._in_flight += 1
        task = asyncio.create_task(self._execute(batch, grant))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    # -- execution ---------------------------------------------------------------------

    async def _execute(self, batch: list[PendingItem[InT, OutT]], grant: Grant | None) -> None:
        """Run one batch on a free replica (the granted device's, when shared); whatever
        happens, every future settles."""
        try:
            await self._executor.run_settling(batch, None if grant is None else grant.device)
        finally:
            self._in_flight -= 1
            self._has_work.set()
            if grant is not None:
                grant.release()

    def _waiting(self) -> Waiting | None:
        """This engine's waiting work, for the device scheduler (None when none)."""
        self._queue.drop_settled_head()
        if self._state not in ("running", "draining"):
            return None
        rate = self._executor.drain_rate.per_replica()
        return waiting_work(self._queue.items, self.config.max_batch_size, rate)
