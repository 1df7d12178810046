"""How the engine reaches a model: the `Runner` protocol, and a runner that owns a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar, runtime_checkable

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


@runtime_checkable
class PreparingModel(Model[InT_contra, OutT_co], Protocol[InT_contra, OutT_co]):
    """A `Model` whose batch can be made ready on the host (padded, in pinned memory)
    while the device still computes the one before it."""

    @property
    def collates_ahead(self) -> bool:
        """Whether preparing ahead pays on this model's device (a GPU, where the device
        thread mostly waits for the kernels)."""
        ...

    def prepare(self, payloads: Sequence[InT_contra]) -> object:
        """The batch's host-side inputs; touches no device, so it may run on any thread."""
        ...

    def predict_prepared(
        self, payloads: Sequence[InT_contra], prepared: object
    ) -> Sequence[OutT_co]:
        """`predict(payloads)`, from what `prepare(payloads)` returned."""
        ...


class Runner(Protocol[InT_contra, OutT_co]):
    """What the engine calls. The engine never runs two `run` calls at once on one runner.

    A runner may also be a `PreparingRunner`: the engine then prepares a batch that has to
    wait for its device, and hands what was made to `run(payloads, prepared)`.
    """

    def cost(self, payload: InT_contra) -> int: ...

    async def run(self, payloads: Sequence[InT_contra]) -> Sequence[OutT_co]: ...


@runtime_checkable
class PreparingRunner(Runner[InT_contra, OutT_co], Protocol[InT_contra, OutT_co]):
    """A runner that can make a batch ready before its device is free."""

    @property
    def collates_ahead(self) -> bool:
        """Whether `prepare` makes anything (else the engine does not call it)."""
        ...

    async def prepare(self, payloads: Sequence[InT_contra]) -> object | None:
        """Host-side inputs for `run(payloads, prepared)`; None when nothing was made."""
        ...

    async def run(
        self, payloads: Sequence[InT_contra], prepared: object | None = None
    ) -> Sequence[OutT_co]: ...


class ThreadRunner(Generic[InT, OutT]):
    """Runs a `Model` on one dedicated thread, so the event loop never waits on it.

    One thread serialises the device; torch releases the GIL while it computes. A model
    that collates ahead (`PreparingModel`, on a GPU) also gets a second thread, which
    prepares the next batch while the device thread runs the current one.
    `collate_ahead` overrides the model's own choice (tests, and A/B runs).
    """

    def __init__(
        self,
        model: Model[InT, OutT],
        *,
        thread_name: str = "microbatch-device",
        collate_ahead: bool | None = None,
    ) -> None:
        self.model = model
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        preparing = model if isinstance(model, PreparingModel) else None
        wanted = collate_ahead
        if wanted is None:
            wanted = preparing is not None and preparing.collates_ahead
        if wanted and preparing is None:
            raise ValueError(f"{type(model).__name__} cannot prepare its batches ahead")
        self._preparing: PreparingModel[InT, OutT] | None = preparing if wanted else None
        self._collator = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{thread_name}-collate")
            if wanted
            else None
        )

    @property
    def collates_ahead(self) -> bool:
        return self._preparing is not None

    def cost(self, payload: InT) -> int:
        return self.model.cost(payload)

    async def prepare(self, payloads: Sequence[InT]) -> object | None:
        """The batch's host-side inputs, made on the collate thread while the device
        thread computes; None when this runner does not collate ahead."""
        if self._preparing is None or self._collator is None:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._collator, self._preparing.prepare, payloads)

    async def run(self, payloads: Sequence[InT], prepared: object | None = None) -> Sequence[OutT]:
        loop = asyncio.get_running_loop()
        if prepared is None or self._preparing is None:
            return await loop.run_in_executor(self._executor, self.model.predict, payloads)
        predict = self._preparing.predict_prepared
        return await loop.run_in_executor(self._executor, predict, payloads, prepared)

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the device thread (warm-up, say), in turn with batches."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Wait for the running calls, then stop the threads."""
        if self._collator is not None:
            self._collator.shutdown(wait=True)
        self._executor.shutdown(wait=True)
