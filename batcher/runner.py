"""How the engine reaches a model: the `Runner` protocol, and a runner that owns a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar

InT = TypeVar("InT")
OutT = TypeVar("OutT")
T = TypeVar("T")
InT_contra = TypeVar("InT_contra", contravariant=True)
OutT_co = TypeVar("OutT_co", covariant=True)


class Model(Protocol[InT_contra, OutT_co]):
    """A synchronous batch model. `predict` runs on the device worker thread."""

    def cost(self, payload: InT_contra) -> int:
        """The payload's length in tokens; the batch former groups similar lengths."""
        ...

    def predict(self, payloads: Sequence[InT_contra]) -> Sequence[OutT_co]:
        """One output per payload, in order. May raise; the engine then splits the batch."""
        ...


class Runner(Protocol[InT_contra, OutT_co]):
    """What the engine calls. The engine never runs two `run` calls at once."""

    def cost(self, payload: InT_contra) -> int: ...

    async def run(self, payloads: Sequence[InT_contra]) -> Sequence[OutT_co]: ...


class ThreadRunner(Generic[InT, OutT]):
    """Runs a `Model` on one dedicated thread, so the event loop never waits on it.

    One thread serialises the device; torch releases the GIL while it computes.
    """

    def __init__(self, model: Model[InT, OutT], *, thread_name: str = "microbatch-device") -> None:
        self.model = model
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)

    def cost(self, payload: InT) -> int:
        return self.model.cost(payload)

    async def run(self, payloads: Sequence[InT]) -> Sequence[OutT]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.model.predict, payloads)

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the device thread (warm-up, say), in turn with batches."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Wait for the running call, then stop the thread."""
        self._executor.shutdown(wait=True)
