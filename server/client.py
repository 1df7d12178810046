"""The HTTP side's handle on the engine: `EngineClient`, one interface for an engine in
this process (`server.host.LocalClient`) or in the engine process of `microbatch serve
--workers N` (`RemoteClient`, here).

A client gives the runtime (`server.runtime.Runtime`) four things: the model's encoder,
the engine to submit to, the engine side's `EngineReport` (its status, warm-up, limits,
liveness, the model's description), and the few calls that act on the engine side
(reconfigure, the dashboard's recent samples, the metrics text). Everything the routes
show is written once, in the runtime, from those.

A remote client imports neither torch nor transformers: it receives the encoder (plain
data and the tokenizer's JSON, `batcher.models.EncoderSpec`) from the engine process
once, and then the engine's report, pushed to every front-end each time the engine's
state changes and at least every `REPORT_EVERY_S`. It pushes its own state back (its
status, and the request latencies its middleware collected, for the dashboard) on the
same beat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from batcher import (
    DeadlineExceeded,
    EngineClosed,
    EngineConfig,
    EngineStats,
    Lane,
    Owner,
    QueueFull,
    RemoteEngine,
    Result,
    State,
)
from batcher.models import Encoded, Encoder, Output, unpack_output
from server.collector import tune_gc
from server.operator_schemas import ThreadsInfo
from server.timeline import Recent

logger = logging.getLogger("microbatch.server")

Status = Literal["warming", "ready", "draining", "failed"]

REPORT_EVERY_S = 0.1
"""How often the engine process pushes its report at least, and a front-end its state."""
STALE_AFTER_S = 10.0
"""An engine whose report has not come for this long is reported dead by `/health`."""
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
class WarmingStep:
    """Where the warm-up is: shape `step` of `steps` on replica `replica` of `replicas`."""

    replica: int
    replicas: int
    step: int
    steps: int
    what: str
    started: float
    """perf_counter at the start of the warm-up."""

    def describe(self) -> str:
        elapsed = time.perf_counter() - self.started
        on = f" on replica {self.replica + 1} of {self.replicas}" if self.replicas > 1 else ""
        return f"warm-up step {self.step} of {self.steps}{on}: {self.what}, {elapsed:.0f} s so far"


@dataclass(frozen=True, slots=True)
class EngineReport:
    """The engine side's state, as the HTTP side sees it."""

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
    """How many there are (`--workers`; 1 in one process)."""


@dataclass(frozen=True, slots=True)
class FrontEndNews:
    """What a front-end pushes to the engine process on each beat."""

    pid: int
    status: Status
    latencies: list[float]
    """Seconds each request took, since the last beat (the dashboard's p50/p99)."""


class EngineHandle(Protocol):
    """What routes use of the engine: `batcher.Engine` in this process, or `EngineView`
    on an engine in another."""

    @property
    def state(self) -> State: ...

    @property
    def config(self) -> EngineConfig: ...

    def clock(self) -> float: ...

    def stats(self) -> EngineStats: ...

    def check_room(self, n: int = 1, owner: Owner | None = None) -> None: ...

    async def submit(
        self, payload: Encoded, *, deadline: float | None = None, lane: Lane = "interactive",
        owner: Owner | None = None,
    ) -> Result[Output]: ...  # fmt: skip

    async def submit_many(
        self, payloads: Sequence[Encoded], *, deadline: float | None = None,
        lane: Lane = "interactive", owner: Owner | None = None,
    ) -> list[Result[Output]]: ...  # fmt: skip


class EngineClient(Protocol):
    """The engine, in this process or another, as the runtime uses it."""

    front_end: bool
    """Whether this process is one front-end of several (`--workers N`)."""

    @property
    def encoder(self) -> Encoder:
        """The model's encoder. Raises EngineClosed (503) before the engine sent it."""
        ...

    @property
    def engine(self) -> EngineHandle:
        """Raises EngineClosed (503) before the engine reported."""
        ...

    @property
    def status(self) -> Status:
        """The engine side's status (the runtime adds its own draining)."""
        ...

    def report(self) -> EngineReport | None:
        """The engine side's last report; None before the first."""
        ...

    def problem(self) -> str | None:
        """Why this process has lost its engine (a liveness failure); None if it has not."""
        ...

    async def refresh(self) -> None:
        """Bring the report up to date before a reader that must not lag."""
        ...

    async def recent(self, since: float) -> Recent: ...

    async def metrics_text(self) -> bytes: ...

    async def reconfigure(self, changes: Mapping[str, object]) -> EngineConfig: ...

    def stop_admitting(self) -> None: ...

    async def drain(self) -> None:
        """Wait until every item this process handed the engine is answered."""
        ...

    async def aclose(self) -> None: ...


class EngineView:
    """The engine of another process, as routes use it (`EngineHandle`): submits go over
    the socket; `stats`, `state`, `config` and `check_room` read the last report, and
    the engine checks the queue again at submit."""

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

    def check_room(self, n: int = 1, owner: Owner | None = None) -> None:
        # The report has no tenants' holdings: the engine process checks those at submit.
        depth, limit = self.last.queue_depth, self.last.config.max_queue_size
        if depth + n > limit:
            raise QueueFull(depth, limit)

    async def submit(
        self, payload: Encoded, *, deadline: float | None = None, lane: Lane = "interactive",
        owner: Owner | None = None,
    ) -> Result[Output]:  # fmt: skip
        [result] = await self.submit_many([payload], deadline=deadline, lane=lane, owner=owner)
        return result

    async def submit_many(
        self, payloads: Sequence[Encoded], *, deadline: float | None = None,
        lane: Lane = "interactive", owner: Owner | None = None,
    ) -> list[Result[Output]]:  # fmt: skip
        """As the engine's; if the engine process has not answered `SUBMIT_MARGIN_S`
        after the deadline (its loop hangs), DeadlineExceeded (504) and a cancel."""
        if deadline is None:
            return await self.remote.submit_many(payloads, lane=lane, owner=owner)
        left = deadline - self.remote.clock() + SUBMIT_MARGIN_S
        try:
            async with asyncio.timeout(left):
                return await self.remote.submit_many(
                    payloads, deadline=deadline, lane=lane, owner=owner
                )
        except TimeoutError:
            raise DeadlineExceeded("the engine process did not answer by the deadline") from None


class RemoteClient:
    """A front-end's `EngineClient`: the engine process at the socket `path`. Built by
    `RemoteClient.start`, which returns at once and connects in the background (the
    engine process loads the model first): `status` is `warming` until it has."""

    front_end = True

    def __init__(
        self,
        path: str,
        registry: CollectorRegistry,
        latencies: deque[float],
        metrics_dir: str | None,
        drain_timeout_s: float,
    ) -> None:
        self.remote: RemoteEngine[Encoded, Output] = RemoteEngine(
            path, unpack=unpack_output, on_notice=self._heard
        )
        self.registry = registry
        self.metrics_dir = metrics_dir
        self._drain_timeout_s = drain_timeout_s
        self._latencies = latencies
        self._encoder: Encoder | None = None
        self._report: EngineReport | None = None
        self._engine: EngineView | None = None
        self._reported_at = 0.0
        self._draining = False
        self._failed: str | None = None
        self._parent = os.getppid()
        self._follow: asyncio.Task[None] | None = None

    @classmethod
    def start(
        cls,
        path: str,
        registry: CollectorRegistry,
        latencies: deque[float],
        metrics_dir: str | None,
        drain_timeout_s: float,
    ) -> RemoteClient:
        client = cls(path, registry, latencies, metrics_dir, drain_timeout_s)
        client._follow = asyncio.create_task(client._run(), name="microbatch-front-end")
        return client

    async def _run(self) -> None:
        try:
            await self._connect()
            self._encoder = await self._patiently("encoder")
            self._take(await self._patiently("report"))
            tune_gc()  # what this process holds now lives as long as it does
            while True:  # the beat: our state to the engine; is the supervisor there?
                self._tell()
                await asyncio.sleep(REPORT_EVERY_S)
                if os.getppid() != self._parent:
                    raise RuntimeError("the supervisor process went away")
                if not self.remote.connected:
                    raise ConnectionError("the connection to the engine process was lost")
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

    async def _patiently(self, name: str) -> Any:
        """Call `name` in the engine process, asking again while it does not answer
        (its loop may be busy warming up), for up to `CONNECT_TIMEOUT_S`."""
        waited = time.monotonic()
        while True:
            try:
                return await self.remote.control("call", name=name, timeout_s=CONTROL_TIMEOUT_S)
            except TimeoutError:
                if time.monotonic() - waited > CONNECT_TIMEOUT_S:
                    raise

    def _tell(self) -> None:
        latencies = list(self._latencies)
        self._latencies.clear()
        status: Status = "draining" if self._draining else "ready"
        self.remote.notify("front-end", FrontEndNews(os.getpid(), status, latencies))

    def _heard(self, topic: str, value: Any) -> None:
        if topic == "report":
            self._take(value)

    def _take(self, report: EngineReport) -> None:
        self._report = report
        self._reported_at = time.monotonic()
        if self._engine is None:
            self._engine = EngineView(self.remote, report.stats)
        else:
            self._engine.last = report.stats

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            raise EngineClosed("the engine process has not reported yet; it is starting")
        return self._encoder

    @property
    def engine(self) -> EngineView:
        if self._engine is None:  # 503: retry shortly
            raise EngineClosed("the engine process has not reported yet; it is starting")
        return self._engine

    @property
    def status(self) -> Status:
        if self._failed is not None:
            return "failed"
        if self._report is None or self._encoder is None:
            return "warming"
        return self._report.status

    def report(self) -> EngineReport | None:
        return self._report

    def problem(self) -> str | None:
        if self._failed is not None:
            return f"front-end {os.getpid()} lost the engine process: {self._failed}"
        if self._report is None:
            return None  # still connecting; the engine loads the model
        silent = time.monotonic() - self._reported_at
        if silent > STALE_AFTER_S:
            return f"the engine process has not reported for {silent:.0f} s"
        return None

    async def refresh(self) -> None:
        if self.remote.connected:
            report = await self.remote.control("call", name="report", timeout_s=CONTROL_TIMEOUT_S)
            self._take(report)

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
        front-end handed it, within the drain timeout."""
        self.stop_admitting()
        if self.remote.submitting:
            logger.info("front-end %d draining: %d requests waiting", os.getpid(),
                        self.remote.submitting)  # fmt: skip
        try:
            await asyncio.wait_for(self.remote.idle(), self._drain_timeout_s)
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
