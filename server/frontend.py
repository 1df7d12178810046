"""A front-end process of `microbatch serve --workers N` (see `server.workers`).

It accepts HTTP, validates and tokenizes like the one-process server, and hands the
items to the engine process through `batcher.remote.RemoteEngine`. The routes read the
engine's state synchronously (the admission gate, `/ready`, the live limits): `FrontEnd`
keeps the engine's last `EngineReport`, which it asks for every `REPORT_EVERY_S` (and at
once before `/model` and `/admin/batching`). With each ask it tells the engine its own
status and hands over the request latencies the middleware collected, for the
dashboard, whose timeline lives in the engine process.

The tokenizer comes from the model's own files, loaded as the engine process loads them
but without the weights (the modules on the meta device, never run): every process cuts
and tokenizes exactly as the engine's model would, at the cost of the tokenizer's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from batcher import (
    DeadlineExceeded,
    EngineClosed,
    EngineConfig,
    EngineStats,
    QueueFull,
    RemoteEngine,
    Result,
    State,
)
from batcher.models import Encoded, Output, TextModel, unpack_output
from server.runtime import LocalRuntime, ServedModel, Status, WarmingStep, tune_gc
from server.schemas import ThreadsInfo
from server.settings import Settings
from server.timeline import Recent
from server.tokenizing import FRONT_END_INLINE_CHARS, Tokenizer

logger = logging.getLogger("microbatch.server")

REPORT_EVERY_S = 0.1
"""How often a front-end asks the engine for its state (and reports its own)."""
STALE_AFTER_S = 10.0
"""An engine that has not answered for this long is reported dead by `/health`."""
READY_WITHIN_S = 5.0
"""A front-end counts as ready for `/ready` if it said so within this long (a loop that
stalls for a moment does not take the whole server out of a load balancer)."""
CONTROL_TIMEOUT_S = 10.0
"""How long a front-end waits for the engine process to answer anything but a submit."""
SUBMIT_MARGIN_S = 5.0
"""A submit whose engine has not answered this long after its deadline gets a 504."""
CONNECT_TIMEOUT_S = 600.0
"""How long a front-end waits for the engine's socket (the engine loads the model first)."""


@dataclass(frozen=True, slots=True)
class EngineReport:
    """The engine process's state, as front-ends see it."""

    status: Status
    error: str | None
    warming: WarmingStep | None
    liveness_problem: str | None
    saturated: bool
    stats: EngineStats
    description: dict[str, object]
    devices: list[str]
    threads: ThreadsInfo | None
    front_ends_ready: int
    """Front-ends that reported `ready` within the last `READY_WITHIN_S`."""
    front_ends: int
    """How many the supervisor runs (`--workers`)."""


class EngineView:
    """The engine of another process, as routes use it (`server.runtime.EngineHandle`):
    submits go over the socket; `stats`, `state`, `config` and `check_room` read the
    last report, and the engine checks the queue again at submit."""

    def __init__(self, remote: RemoteEngine[Encoded, Output], stats: EngineStats) -> None:
        self.remote = remote
        self.last = stats

    @property
    def state(self) -> State:
        return self.last.state

    @property
    def config(self) -> EngineConfig:
        return self.last.config

    def clock(self) -> float:
        return self.remote.clock()

    def stats(self) -> EngineStats:
        return self.last

    def check_room(self, n: int = 1) -> None:
        depth, limit = self.last.queue_depth, self.last.config.max_queue_size
        if depth + n > limit:
            raise QueueFull(depth, limit)

    async def submit(self, payload: Encoded, *, deadline: float | None = None) -> Result[Output]:
        return await self.remote.submit(payload, deadline=deadline)

    async def submit_many(
        self, payloads: Sequence[Encoded], *, deadline: float | None = None
    ) -> list[Result[Output]]:
        """As the engine's; if the engine process has not answered `SUBMIT_MARGIN_S`
        after the deadline (its loop hangs), DeadlineExceeded (504) and a cancel."""
        if deadline is None:
            return await self.remote.submit_many(payloads)
        left = deadline - self.remote.clock() + SUBMIT_MARGIN_S
        try:
            async with asyncio.timeout(left):
                return await self.remote.submit_many(payloads, deadline=deadline)
        except TimeoutError:
            raise DeadlineExceeded("the engine process did not answer by the deadline") from None


class FrontEnd:
    """A front-end's runtime (`server.runtime.Runtime`): a local tokenizer, the engine
    of the engine process. Built by `FrontEnd.connect` in the app's lifespan."""

    def __init__(
        self,
        settings: Settings,
        model: ServedModel,
        path: str,
        metrics_dir: str | None,
        registry: CollectorRegistry,
        latencies: deque[float],
    ) -> None:
        self.settings = settings
        self.model = model
        self.metrics_dir = metrics_dir
        self.registry = registry
        # One core each: see server.tokenizing
        self.tokenizer = Tokenizer(model, inline_chars=FRONT_END_INLINE_CHARS, gather_short=False)
        self.remote: RemoteEngine[Encoded, Output] = RemoteEngine(path, unpack=unpack_output)
        self.report: EngineReport | None = None
        self._engine: EngineView | None = None
        self._reported_at = 0.0
        self._latencies = latencies
        self._draining = False
        self._failed: str | None = None
        self._follow: asyncio.Task[None] | None = None
        self._parent = os.getppid()
        self.threads: ThreadsInfo | None = None
        self.disconnects = Counter(
            "microbatch_client_disconnects",
            "Requests whose client went away while their items waited (not computed).",
            registry=registry,
        )

    @classmethod
    async def connect(
        cls,
        settings: Settings,
        registry: CollectorRegistry,
        path: str,
        latencies: deque[float],
        metrics_dir: str | None = None,
        model: ServedModel | None = None,
    ) -> FrontEnd:
        """Load the tokenizer (the model without its weights, or `model`) and start
        following the engine at `path`; `/ready` says ready once the engine does."""
        if model is None:
            options = replace(
                settings.load_options("cpu"), dtype="float32", compile=False, weights=False
            )
            model = await asyncio.to_thread(TextModel.load, options)
        front = cls(settings, model, path, metrics_dir, registry, latencies)
        tune_gc()  # as the engine process does once warm: torch and the model live on
        front._follow = asyncio.create_task(front._run(), name="microbatch-front-end")
        return front

    async def _run(self) -> None:
        try:
            await self._connect()
            while True:
                # A silent engine: /health fails once it has been so for STALE_AFTER_S.
                with contextlib.suppress(TimeoutError):
                    await self._ask()
                await asyncio.sleep(REPORT_EVERY_S)
                if os.getppid() != self._parent:
                    raise RuntimeError("the supervisor process went away")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._draining:
                logger.error("front-end %d: %s; exiting", os.getpid(), exc)
            self._failed = f"{type(exc).__name__}: {exc}"
            # Drain and exit: the supervisor restarts this front-end (or, if the engine
            # died, stops everything); without a supervisor, nobody else would.
            os.kill(os.getpid(), signal.SIGTERM)

    async def _connect(self) -> None:
        waited = time.monotonic()
        while True:
            try:
                await self.remote.connect()
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() - waited > CONNECT_TIMEOUT_S:
                    raise
                if os.getppid() != self._parent:
                    raise RuntimeError("the supervisor process went away") from None
                await asyncio.sleep(REPORT_EVERY_S)

    async def _ask(self) -> None:
        latencies = list(self._latencies)
        self._latencies.clear()
        report: EngineReport = await self.remote.control(
            "call",
            name="report",
            args=(os.getpid(), self._own_status(), latencies),
            timeout_s=CONTROL_TIMEOUT_S,
        )
        self._take(report)

    def _take(self, report: EngineReport) -> None:
        self.report = report
        self._reported_at = time.monotonic()
        if self._engine is None:
            self._engine = EngineView(self.remote, report.stats)
        else:
            self._engine.last = report.stats
        self.threads = report.threads

    def _own_status(self) -> Status:
        if self._draining:
            return "draining"
        return "failed" if self._failed else "ready"

    @property
    def engine(self) -> EngineView:
        if self._engine is None:  # 503: retry shortly
            raise EngineClosed("the engine process has not reported yet; it is starting")
        return self._engine

    @property
    def status(self) -> Status:
        if self._failed is not None:
            return "failed"
        if self._draining:
            return "draining"
        if self.report is None:
            return "warming"
        return self.report.status

    @property
    def error(self) -> str | None:
        if self._failed is not None:
            return self._failed
        return self.report.error if self.report is not None else None

    @property
    def warming(self) -> WarmingStep | None:
        return self.report.warming if self.report is not None else None

    @property
    def saturated(self) -> bool:
        return self.report is not None and self.report.saturated

    def liveness_problem(self) -> str | None:
        if self._failed is not None:
            return f"front-end {os.getpid()} lost the engine process: {self._failed}"
        if self.report is None:
            return None  # still connecting; the engine loads the model
        silent = time.monotonic() - self._reported_at
        if silent > STALE_AFTER_S:
            return f"the engine process has not answered for {silent:.0f} s"
        return self.report.liveness_problem

    def incomplete(self) -> str | None:
        report = self.report
        if report is None or report.front_ends_ready >= report.front_ends:
            return None
        return f"{report.front_ends_ready} of {report.front_ends} front-end processes ready"

    def describe(self) -> dict[str, object]:
        return dict(self.report.description) if self.report is not None else {}

    def devices(self) -> list[str]:
        return list(self.report.devices) if self.report is not None else []

    async def refresh(self) -> None:
        if self.remote.connected:
            await self._ask()

    async def recent(self, since: float) -> Recent:
        recent: Recent = await self.remote.control(
            "call", name="recent", args=(since,), timeout_s=CONTROL_TIMEOUT_S
        )
        return recent

    async def metrics_text(self) -> bytes:
        """The engine process's metrics, then every front-end's (prometheus_client's
        multiprocess mode: each process writes its own files, this reads them all), or
        this one's alone when there is no such directory."""
        engine: bytes = await self.remote.control(
            "call", name="metrics", timeout_s=CONTROL_TIMEOUT_S
        )
        if self.metrics_dir is None:
            return engine + generate_latest(self.registry)
        front_ends = CollectorRegistry()
        MultiProcessCollector(front_ends, path=self.metrics_dir)  # type: ignore[no-untyped-call]
        return engine + await asyncio.to_thread(generate_latest, front_ends)

    async def reconfigure(self, changes: Mapping[str, object]) -> EngineConfig:
        # No timeout: a larger max_batch_size is warmed first, which may take minutes.
        as_args = cast("dict[str, Any]", dict(changes))
        stats: EngineStats = await self.remote.control("reconfigure", **as_args)
        self.engine.last = stats
        return stats.config

    def stop_admitting(self) -> None:
        if self._failed is None:
            self._draining = True

    async def drain(self) -> None:
        """Stop admitting and wait until the engine has answered every item this
        front-end handed it, within `drain_timeout_s`."""
        self.stop_admitting()
        if self.remote.submitting:
            logger.info("front-end %d draining: %d requests waiting", os.getpid(),
                        self.remote.submitting)  # fmt: skip
        try:
            await asyncio.wait_for(self.remote.idle(), self.settings.drain_timeout_s)
        except TimeoutError:
            logger.error("front-end %d: %d requests still waiting after the drain timeout; "
                         "failing them", os.getpid(), self.remote.submitting)  # fmt: skip
            self.remote.fail_waiting("the server shut down before these items were computed")

    async def aclose(self) -> None:
        try:
            await self.drain()
        finally:
            if self._follow is not None:
                self._follow.cancel()
                await asyncio.gather(self._follow, return_exceptions=True)
            await self.remote.aclose()
            await self.tokenizer.aclose()


def report_of(
    runtime: LocalRuntime, front_ends: Mapping[int, tuple[Status, float]], workers: int
) -> EngineReport:
    """The engine process's `EngineReport` of its `LocalRuntime`; `front_ends` maps each
    front-end's pid to its last status and when it said so (time.monotonic)."""
    now = time.monotonic()
    ready = sum(
        1 for status, at in front_ends.values() if status == "ready" and now - at < READY_WITHIN_S
    )
    return EngineReport(
        status=runtime.status,
        error=runtime.error,
        warming=runtime.warming,
        liveness_problem=runtime.liveness_problem(),
        saturated=runtime.saturated,
        stats=runtime.engine.stats(),
        description=runtime.describe(),
        devices=runtime.devices(),
        threads=runtime.threads,
        front_ends_ready=ready,
        front_ends=workers,
    )
