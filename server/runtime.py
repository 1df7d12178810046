"""What the app's lifespan builds and the routes use: settings, model, engine, status."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from prometheus_client import CollectorRegistry

from batcher import Engine, EngineMetrics, ThreadRunner
from batcher.models import Encoded, Output, TextModel
from server.settings import Settings

logger = logging.getLogger("microbatch.server")

Status = Literal["loading", "warming", "ready", "draining", "failed"]


class ServedModel(Protocol):
    """What the server needs of a model; `batcher.models.TextModel` is the real one."""

    name: str
    task: Literal["embed", "classify"]
    labels: tuple[str, ...]

    def encode(self, text: str) -> Encoded: ...

    def encode_many(self, texts: Sequence[str]) -> list[Encoded]: ...

    def cost(self, item: Encoded) -> int: ...

    def predict(self, items: Sequence[Encoded]) -> Sequence[Output]: ...

    def warm_up(self, max_batch_size: int) -> None: ...

    def describe(self) -> dict[str, object]: ...


@dataclass
class Runtime:
    """One per app. Built by the lifespan; routes reach it through `RuntimeDep`."""

    settings: Settings
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    status: Status = "loading"
    error: str | None = None
    model: ServedModel | None = None
    engine: Engine[Encoded, Output] | None = None
    _runner: ThreadRunner[Encoded, Output] | None = None
    _warm_up: asyncio.Task[None] | None = None

    async def load(self, model: ServedModel | None) -> None:
        """Load the model (off the loop). Raises ModelLoadError: startup then fails."""
        if self.settings.torch_threads is not None:
            torch.set_num_threads(self.settings.torch_threads)
        if model is None:
            options = self.settings.load_options()
            model = await asyncio.to_thread(TextModel.load, options)
        self.model = model
        self._runner = runner = ThreadRunner(model)
        self.engine = engine = Engine(
            runner, self.settings.engine_config(), metrics=EngineMetrics(self.registry)
        )
        self.status = "warming"
        warm_up = self._warm_and_start(model, runner, engine)
        self._warm_up = asyncio.create_task(warm_up, name="microbatch-warm-up")

    async def _warm_and_start(
        self,
        model: ServedModel,
        runner: ThreadRunner[Encoded, Output],
        engine: Engine[Encoded, Output],
    ) -> None:
        try:
            await runner.call(model.warm_up, self.settings.max_batch_size)
            await engine.start()
        except Exception as exc:
            logger.exception("warm-up failed; the server stays unready")
            self.status, self.error = "failed", f"warm-up failed: {type(exc).__name__}: {exc}"
            return
        self.status = "ready"
        logger.info("ready: %s", model.describe())

    @property
    def healthy(self) -> bool:
        if self.status == "failed":
            return False
        return self.engine is None or self.engine.state == "new" or self.engine.healthy

    async def aclose(self) -> None:
        """Stop admitting, answer every admitted request, stop the device thread."""
        self.status = "draining"
        if self._warm_up is not None and not self._warm_up.done():
            self._warm_up.cancel()
            await asyncio.gather(self._warm_up, return_exceptions=True)
        try:
            if self.engine is not None:
                await self.engine.aclose(timeout_s=self.settings.drain_timeout_s)
        finally:
            if self._runner is not None:
                await asyncio.to_thread(self._runner.close)
