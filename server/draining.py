"""Graceful shutdown for `microbatch serve`.

On the first SIGTERM or SIGINT: `/ready` turns 503 and new predictions get 503 at once
(the listener stays open, so clients and load balancers get an answer, not a refused
connection); every admitted item is computed and answered; then uvicorn closes the
listener, lets the last replies go out and runs the lifespan shutdown. A second signal
skips the wait. The drain is bounded by `--drain-timeout-s`.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from server.runtime import Runtime

logger = logging.getLogger("microbatch.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, app: FastAPI, **config: Any) -> None:
        super().__init__(uvicorn.Config(app, **config))
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self._signalled = False

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        runtime: Runtime | None = getattr(self.app.state, "runtime", None)
        if self._signalled or self._loop is None or runtime is None:
            super().handle_exit(sig, frame)  # second signal, or nothing to drain yet
            return
        self._signalled = True
        # Unlike uvicorn's own handler, this one does not record the signal for uvicorn
        # to raise again once it has shut down: after a clean drain the process exits 0
        # (SIGTERM and Ctrl-C alike), as orchestrators and terminals expect.
        runtime.stop_admitting()  # synchronous: the very next request sees it
        # A signal handler runs between two bytecodes of the loop's own thread: only
        # schedule here, do the work in a task.
        self._loop.call_soon_threadsafe(self._start_drain, runtime)

    def _start_drain(self, runtime: Runtime) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit(runtime))

    async def _drain_then_exit(self, runtime: Runtime) -> None:
        try:
            await runtime.drain()
        except Exception:
            logger.exception("drain failed; shutting down anyway")
        finally:
            self.should_exit = True
