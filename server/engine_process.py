"""The engine process of `microbatch serve --workers N` (started by `server.workers`).

It loads the model and serves its `server.host.EngineHost` on a Unix socket
(`batcher.remote.EngineServer`) to the front-ends' `server.client.RemoteClient`s:
their submits, the calls they make (the encoder, once; the report before a reader that
must not lag; the dashboard's recent samples; the metrics text; a change of limits), and
the notices they push (their status and request latencies). It pushes its report to
every front-end when its state changes and at least every `REPORT_EVERY_S`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from server.children import child_setup, run_loop
from server.client import REPORT_EVERY_S, FrontEndNews, Status
from server.settings import Settings

if TYPE_CHECKING:
    from batcher import EngineServer
    from server.host import EngineHost, ServedModel

logger = logging.getLogger("microbatch.server")

_EARLY_STOP = threading.Event()
REFUSED = 2
"""The engine process's exit status when the settings cannot work here (a device this
machine lacks): the supervisor exits with it, as `microbatch serve` does."""


def run(settings: Settings, path: str, supervisor: int, model: ServedModel | None = None) -> None:
    """The engine process's entry point: serve the engine on `path` until SIGTERM, or
    until the process `supervisor` is gone. `model` replaces the one `settings` names
    (the null model of `benchmarks.lab.overhead`)."""
    # A SIGTERM (or SIGINT) during the model's load is kept, and honoured once the loop runs.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: _EARLY_STOP.set())
    child_setup(settings)
    from batcher.models import disable_progress_bars
    from server.preflight import device_problems

    if found := device_problems(settings):  # not checked by the supervisor: no torch there
        for problem in found:
            logger.error("microbatch serve: %s", problem)
        raise SystemExit(REFUSED)
    disable_progress_bars()
    run_loop(lambda: _serve(settings, path, supervisor, model))


async def _serve(settings: Settings, path: str, supervisor: int, model: ServedModel | None) -> None:
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

    from batcher import EngineServer
    from server.host import EngineHost
    from server.timeline import MAX_LATENCIES, Recent

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    latencies: deque[float] = deque(maxlen=MAX_LATENCIES)
    host = await EngineHost.load(settings, registry, model, latencies, packed_outputs=True)
    front_ends: dict[int, tuple[Status, float]] = {}

    def heard(news: FrontEndNews) -> None:
        front_ends[news.pid] = (news.status, time.monotonic())
        latencies.extend(news.latencies)

    async def report() -> object:
        return host.report(front_ends, settings.workers)

    async def encoder() -> object:
        return host.encoder

    async def recent(since: float) -> Recent:
        return host.timeline.recent(since)

    async def metrics() -> bytes:
        return generate_latest(registry)

    server = EngineServer(
        host.engine,
        path,
        reconfigure=host.reconfigure,
        handlers={"report": report, "encoder": encoder, "recent": recent, "metrics": metrics},
        notices={"front-end": heard},
    )
    await server.start()
    logger.info("engine process %d serving on its socket", os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # either: drain, then stop
        loop.add_signal_handler(signum, stop.set)
    if _EARLY_STOP.is_set():
        stop.set()
    watch = asyncio.create_task(_watch_parent(supervisor, stop))
    push = asyncio.create_task(_push_reports(host, server, front_ends, settings.workers))
    await stop.wait()
    watch.cancel()
    try:
        await host.aclose()  # drains: every item still queued is computed and answered
    finally:
        push.cancel()
        await asyncio.gather(push, watch, return_exceptions=True)
        await server.aclose()
    logger.info("engine process %d stopped", os.getpid())


async def _push_reports(
    host: EngineHost,
    server: EngineServer[Any, Any],
    front_ends: dict[int, tuple[Status, float]],
    workers: int,
) -> None:
    """Push the host's report to every front-end the moment its status or limits
    change, and at least every `REPORT_EVERY_S` (the queue's depth, for their admission
    gates; the warm-up's step; and a beat whose absence tells them the engine hangs)."""
    while True:
        host.changed.clear()
        if server.connected:
            try:
                server.broadcast("report", host.report(front_ends, workers))
            except Exception:
                # Front-ends then see no report: within STALE_AFTER_S, /health says so.
                logger.exception("the engine's report failed; this is a bug")
        try:
            async with asyncio.timeout(REPORT_EVERY_S):
                await host.changed.wait()
        except TimeoutError:
            pass


async def _watch_parent(supervisor: int, stop: asyncio.Event) -> None:
    # No event says so (a child is told nothing when its parent dies): poll.
    while os.getppid() == supervisor:  # noqa: ASYNC110
        await asyncio.sleep(1.0)
    logger.error("the supervisor process went away; stopping")
    stop.set()
