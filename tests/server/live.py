"""The app behind a real uvicorn server on a free localhost port, in the test's own
event loop, so that a fake model can still be held and released by the test."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any

import httpx
import uvicorn

from benchmarks.processes import free_port
from benchmarks.scrape import Scrape
from server.app import create_app
from server.settings import Settings
from tests.server.fakes import FakeTextModel


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # pytest owns the signals of its process


@contextlib.asynccontextmanager
async def live_server(model: FakeTextModel, **settings: object) -> AsyncIterator[str]:
    """Yields the base URL once `/ready` answers 200; shuts the server down after."""
    app = create_app(Settings(**settings), model=model)  # type: ignore[arg-type]
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http="httptools", lifespan="on", log_level="warning"
    )
    server = _InLoopServer(config)
    task = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client, asyncio.timeout(30):
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/ready")).status_code == 200:
                        break
                await asyncio.sleep(0.01)  # the server is still starting: poll its state
        yield url
    finally:
        server.should_exit = True
        await task


@contextlib.contextmanager
def threaded_server(app: Any) -> Iterator[str]:
    """`app` behind a real uvicorn server on its own thread (for synchronous callers:
    a command that runs its own event loop, schemathesis). Yields the base URL once
    `/ready` answers 200."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)  # no signal handlers off main
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            threading.Event().wait(0.05)  # the server thread is starting: poll its state
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def metric(text: str, name: str) -> float:
    """The value of `name` in a /metrics text, summed over the samples whose labels
    include those given as `name{label="value",...}` (so a `model` label added to
    engine metrics leaves the tests' reading alone)."""
    base, _, rest = name.partition("{")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    value = Scrape.parse(text).value(base, **labels)
    assert not math.isnan(value), f"{name} not in /metrics"
    return value
