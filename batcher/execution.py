"""Running a batch on a replica, and isolating the inputs that fail.

A batch that raises is split in halves and each half retried, so only the inputs that
fail on their own get the error; an input that fails alone is retried once on another
replica, and a replica that keeps failing what others compute leaves rotation. What a
computed batch teaches about the device (its cost, drain rate and memory cap) is kept
here. Touched only on the event-loop thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar, cast

from batcher.cost import CostModel, DrainRate, MemoryCap
from batcher.errors import DeviceOutOfMemory, EngineClosed, InferenceFailed
from batcher.fairness import item_cost
from batcher.items import Lane, PendingItem, Result, settle_error, settle_result
from batcher.lanes import LaneUsage
from batcher.metrics import EngineMetrics
from batcher.padding import padded_tokens
from batcher.replicas import Replica, ReplicaPool
from batcher.runner import PreparingRunner

InT = TypeVar("InT")
OutT = TypeVar("OutT")

logger = logging.getLogger("batcher.engine")


class Executor(Generic[InT, OutT]):
    """Runs batches on the replicas of `pool`; every item of a batch it runs settles.

    `wanted(item, now)` says whether an item must still be computed (it settles those
    that must not); it is asked again when a batch gets its replica.
    """

    def __init__(
        self,
        pool: ReplicaPool[InT, OutT],
        wanted: Callable[[PendingItem[InT, OutT], float], bool],
        metrics: EngineMetrics,
        clock: Callable[[], float],
        lanes: LaneUsage | None = None,
    ) -> None:
        self._pool = pool
        self._lanes = lanes if lanes is not None else LaneUsage()
        self._wanted = wanted
        self._metrics = metrics
        self._clock = clock
        self.cost = CostModel()
        """The device's cost per batch, learned from the batches run so far."""
        self.drain_rate = DrainRate()
        self.memory_cap = MemoryCap()
        self.batches_run = 0
        """Forward passes that succeeded; each result names its pass by this count."""
        first = pool.replicas[0].runner
        self._preparer = (
            first if isinstance(first, PreparingRunner) and first.collates_ahead else None
        )
        """Prepares the batches that wait for a device (host-side inputs fit any replica,
        so the first runner's serve all); None when the runners do not collate ahead."""
        self.on_computed: Callable[[list[float], list[float], float], None] | None = None
        """Called with each computed batch's latencies (admission to result, seconds),
        queue waits and device time: the SLO controller's input."""

    @property
    def prepares_ahead(self) -> bool:
        """Whether a batch that waits for a device is prepared meanwhile."""
        return self._preparer is not None

    async def run_settling(
        self, batch: list[PendingItem[InT, OutT]], device: int | None = None
    ) -> None:
        """`run(batch)` (on the replica of `device` when given); if that fails (a bug)
        or is cancelled (shutdown), every item still unsettled fails with EngineClosed,
        and the exception propagates."""
        try:
            await self.run(batch, device=device)
        except BaseException as exc:
            error = EngineClosed("the batch was interrupted by shutdown")
            if not isinstance(exc, asyncio.CancelledError):
                logger.exception("batch execution failed; this is a bug")
                error = EngineClosed("internal error while running the batch")
            for item in batch:
                settle_error(item.future, error)
            raise

    async def run(
        self,
        batch: list[PendingItem[InT, OutT]],
        avoid: Replica[InT, OutT] | None = None,
        *,
        device: int | None = None,
    ) -> bool:
        """Run `batch` on a free replica; True if every item got its result.

        If the model raises, split the batch in halves and retry each, so only the items
        that fail on their own get the error. An item that fails alone is retried once on
        another replica: if it succeeds there, the first replica gets a strike. Out of
        memory also lowers the memory cap to half the failed batch's padded tokens.
        """
        prepared = await self._prepare_ahead(batch) if avoid is None else None
        async with self._pool.lease(avoid) as replica:
            # Callers may have left or expired while the batch waited for a replica.
            now = self._clock()
            wanted = [item for item in batch if self._wanted(item, now)]
            if not wanted:
                return True
            if len(wanted) < len(batch):
                prepared = None  # made for items that are gone: the device thread collates
            batch = wanted
            started = now
            replica.busy_since = started
            try:
                payloads = [item.payload for item in batch]
                if prepared is None:
                    outputs = await replica.runner.run(payloads)
                else:
                    runner = cast("PreparingRunner[InT, OutT]", replica.runner)
                    outputs = await runner.run(payloads, prepared)
            except Exception as exc:
                failure: Exception | None = exc
            else:
                failure = None
            finally:
                replica.busy_since = None
            if failure is not None and len(batch) == 1 and avoid is None:
                if isinstance(failure, DeviceOutOfMemory):
                    self._shrink_after_oom(batch)
                if self._pool.others_alive(replica):
                    # The input's fault, or this replica's? Ask another one, still
                    # holding this one so that the retry cannot land on it.
                    retried = await self.run(batch, avoid=replica)
                    if retried:
                        self._pool.strike(replica)
                    return retried
                return self._fail_alone(batch[0], failure)
        if failure is not None:
            return await self._after_failure(batch, failure, device)
        replica.strikes = 0
        inference_time_s = self._clock() - started
        if len(outputs) != len(batch):
            error = InferenceFailed(
                f"the model returned {len(outputs)} outputs for {len(batch)} inputs"
            )
            logger.error("%s; failing the batch", error)
            self._metrics.count("failed", len(batch))
            for item in batch:
                settle_error(item.future, error)
            return False
        self._record(batch, started, inference_time_s, replica)
        size, delivered = len(batch), 0
        self.batches_run += 1
        number = self.batches_run
        cost = self.cost.estimate()
        units = [item_cost(item.cost, size, cost) for item in batch]
        per_unit = inference_time_s / (sum(units) or 1.0)
        for item, value, unit in zip(batch, outputs, units, strict=True):
            result = Result(value, started - item.enqueued_at, inference_time_s, size,
                            batch=number, device_s=unit * per_unit)  # fmt: skip
            delivered += settle_result(item.future, result)
        self._metrics.count("ok", delivered)
        if self.on_computed is not None:
            waits = [started - item.enqueued_at for item in batch]
            self.on_computed([w + inference_time_s for w in waits], waits, inference_time_s)
        return True

    async def _prepare_ahead(self, batch: list[PendingItem[InT, OutT]]) -> object | None:
        """The batch's inputs made ready on the host while every device is busy, so that
        the device thread only copies and launches once its replica is free (a runner
        with `prepare`, on a GPU); None when a replica is free now, or nothing was made.

        A prepare that raises is logged and forgotten: the device thread collates again,
        and its failure, if any, is isolated as usual.
        """
        preparer = self._preparer
        if preparer is None or self._pool.has_free():
            return None
        try:
            return await preparer.prepare([item.payload for item in batch])
        except Exception:
            logger.exception("preparing a batch ahead failed; its device thread collates it")
            return None

    async def _after_failure(
        self, batch: list[PendingItem[InT, OutT]], exc: Exception, device: int | None
    ) -> bool:
        """A batch (or a retried single item) failed: split it, or fail the item."""
        if isinstance(exc, DeviceOutOfMemory):
            self._shrink_after_oom(batch)
        if len(batch) > 1:
            half = len(batch) // 2
            first = await self.run(batch[:half], device=device)
            second = await self.run(batch[half:], device=device)
            return first and second
        return self._fail_alone(batch[0], exc)

    def _fail_alone(self, item: PendingItem[InT, OutT], exc: Exception) -> bool:
        logger.warning("model failed on one input: %r", exc)
        error = InferenceFailed(f"the model failed on this input: {type(exc).__name__}")
        error.__cause__ = exc
        if settle_error(item.future, error):
            self._metrics.count("failed")
        return False

    def _shrink_after_oom(self, batch: list[PendingItem[InT, OutT]]) -> None:
        self._metrics.out_of_memory.inc()
        failed = padded_tokens(item.cost for item in batch)
        self.memory_cap.after_oom(len(batch), failed)
        logger.warning(
            "device out of memory on %d items (%d padded tokens); batches now hold at most "
            "%s padded tokens",
            len(batch),
            failed,
            self.memory_cap.tokens,
        )

    def _record(
        self,
        batch: list[PendingItem[InT, OutT]],
        started: float,
        inference_time_s: float,
        replica: Replica[InT, OutT],
    ) -> None:
        """What one computed batch teaches: the device's cost and drain rate, and the
        metrics."""
        real = sum(item.cost for item in batch)
        padded = padded_tokens(item.cost for item in batch)
        self.cost.observe(padded, inference_time_s)
        self.drain_rate.observe(len(batch), inference_time_s)
        lane: Lane = "bulk" if batch[0].bulk else "interactive"
        self._lanes.add(lane, inference_time_s, started)
        waits = (started - item.enqueued_at for item in batch)
        self._metrics.record_batch(replica.index, inference_time_s, real, padded, waits, lane)
