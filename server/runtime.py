"""The HTTP side's runtime: settings, the model's encoder and an engine client, and the
state that routes, middleware and the drain read. One class for both ways to serve: the
client is `server.host.LocalClient` in one process, `server.client.RemoteClient` in a
front-end of `--workers N`; status, liveness, `/info` and `/model` are written here once,
from the engine side's `EngineReport`.

This module imports neither torch nor transformers, nor does anything it imports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter

from batcher import EngineConfig
from batcher.models import Encoder
from server.cache import ResultCache
from server.client import EngineClient, EngineHandle, EngineReport, Status, WarmingStep
from server.drift import Drift
from server.log_sinks import sink_for
from server.operator_schemas import ThreadsInfo
from server.prediction_log import PredictionLog
from server.routing import RoutePatch
from server.served import Freed, ModelLoader, Served
from server.settings import Settings
from server.shadow import Shadows
from server.specs import ModelSpec
from server.tokenizing import Tokenizer
from server.versions import Versions

logger = logging.getLogger("microbatch.server")


STATUS_ORDER: tuple[Status, ...] = ("failed", "warming", "draining", "ready")
"""Several models' statuses as one: the first of these that any of them has."""


class Runtime:
    """One per app, built in its lifespan. Routes reach it through `RuntimeDep` (the
    predict routes through `request.state`, see `server.routes.parsing.runtime_of`).

    It serves one model or several (`--model NAME=PATH` repeated), each in one version
    or several (`NAME@VERSION=PATH`); `route(name, key)` finds the version that answers
    a request (the traffic split of `server.routing`), `model(name)` the one an
    operator means. What is about the server as a whole (status, liveness, draining) is
    written here over all of them; the properties `encoder`, `tokenizer`, `engine` and
    `describe` are the default model's. With a `loader`, versions are loaded and
    unloaded while it runs (`add`, `remove`)."""

    def __init__(
        self,
        settings: Settings,
        client: EngineClient | Mapping[str, EngineClient],
        registry: CollectorRegistry,
        loader: ModelLoader | None = None,
    ) -> None:
        self.settings = settings
        clients = client if isinstance(client, Mapping) else {"": client}
        self.cache = (
            ResultCache(settings.cache_size, int(settings.cache_mb * 2**20),
                        settings.cache_ttl_s, registry)
            if settings.cache_size > 0
            else None
        )  # fmt: skip
        """The result cache (`server.cache`), shared by the models; None when off."""
        self.versions = Versions(settings, clients, registry, self.cache, loader)
        """The served versions, by model, and the routes between them."""
        self.log = (
            PredictionLog(
                sink_for(settings.log_url), registry, capacity=settings.log_buffer,
                inputs=settings.log_inputs, vectors=settings.log_vectors,
                flush_timeout_s=settings.drain_timeout_s,
            )
            if settings.log_url is not None
            else None
        )  # fmt: skip
        """The prediction log (`server.prediction_log`); None when off."""
        self.drift = Drift(settings.drift_window, registry)
        """Each version's recent answers against its reference (`server.drift`)."""
        self.shadows = Shadows(settings, registry, self.log, self.drift)
        """Mirrors answered requests to their shadow versions and compares the answers."""
        self.disconnects = Counter(
            "microbatch_client_disconnects",
            "Requests whose client went away while their items waited (not computed).",
            registry=registry,
        )
        self._draining = False

    # -- the models (`server.versions`) -------------------------------------------------

    @property
    def models(self) -> dict[str, Served]:
        """Every served version by key, the default first."""
        return self.versions.models

    @property
    def default(self) -> Served:
        """The version that answers a request naming no model."""
        return self.versions.default

    def model(self, name: str | None) -> Served:
        """The version an operator's `?model=` means. Raises UnknownModel."""
        return self.versions.model(name)

    def route(self, name: str | None, key: Callable[[], str | None]) -> tuple[Served, list[Served]]:
        """The version that answers a request naming `name` with route key `key()`, and
        those it is mirrored to. Raises UnknownModel."""
        return self.versions.route(name, key)

    def names(self) -> list[str]:
        return self.versions.names()

    def set_routes(self, patches: Mapping[str, RoutePatch]) -> None:
        self.versions.set_routes(patches)

    def add(self, spec: ModelSpec) -> Served:
        """Start loading a version (`POST /admin/models`). Raises ValueError."""
        if self._draining:
            raise ValueError("the server is draining")
        return self.versions.add(spec)

    def removal_problem(self, served: Served) -> str | None:
        """Why `served` cannot be unloaded now; None when it can."""
        if self._draining:
            return "the server is draining"
        return self.versions.removal_problem(served)

    async def remove(self, served: Served) -> Freed | None:
        """Unload a version (`DELETE /admin/models/...`); check `removal_problem` first."""
        self.shadows.forget(served)
        self.drift.forget(served.key)
        return await self.versions.remove(served)

    @property
    def encoder(self) -> Encoder:
        return self.default.encoder

    @property
    def tokenizer(self) -> Tokenizer:
        return self.default.tokenizer

    @property
    def engine(self) -> EngineHandle:
        return self.default.engine

    @property
    def client(self) -> EngineClient:
        return self.default.client

    def engine_for(self, *, cached: bool) -> EngineHandle:
        return self.default.engine_for(cached=cached)

    def describe(self) -> dict[str, object]:
        """The default model, as the process that runs it describes it."""
        return self.default.describe()

    # -- the server as a whole -------------------------------------------------------------

    def _clients(self) -> list[EngineClient]:
        """The engine clients of the versions that make the server's state: those it
        started with, and those loaded since once they were ready."""
        return [s.client for s in self.models.values() if s.loaded and s.joined]

    def _loaded(self) -> list[EngineClient]:
        return [s.client for s in self.models.values() if s.loaded]

    @property
    def status(self) -> Status:
        statuses = {client.status for client in self._clients()}
        engine_side: Status = next((s for s in STATUS_ORDER if s in statuses), "warming")
        if self._draining and engine_side != "failed":
            return "draining"
        return engine_side

    def _reports(self) -> list[tuple[str, EngineReport]]:
        found = []
        for name, served in self.models.items():
            if not served.joined:
                continue
            report = served.report()
            if report is not None:
                found.append((name, report))
        return found

    def _named(self, name: str, text: str) -> str:
        return f"{name}: {text}" if len(self.models) > 1 else text

    @property
    def error(self) -> str | None:
        for name, served in self.models.items():
            if not served.joined:
                continue
            problem = served.client.problem()
            if problem is not None:
                return self._named(name, problem)
        for name, report in self._reports():
            if report.error is not None:
                return self._named(name, report.error)
        return None

    @property
    def warming(self) -> WarmingStep | None:
        for _, report in self._reports():
            if report.warming is not None:
                return report.warming
        return None

    @property
    def takes_images(self) -> bool:
        """Whether a loaded model reads images (their bodies may be larger)."""
        for served in self.models.values():
            with contextlib.suppress(Exception):  # a front-end still waiting for its engine
                if served.loaded and served.takes_images:
                    return True
        return False

    @property
    def saturated(self) -> bool:
        """A queue is nearly full: a load balancer should send new traffic elsewhere."""
        return any(report.saturated for _, report in self._reports())

    @property
    def threads(self) -> ThreadsInfo | None:
        for _, report in self._reports():
            if report.threads is not None:
                return report.threads
        return None

    def liveness_problem(self) -> str | None:
        """Why an orchestrator should restart this process; None while it is alive."""
        for name, served in self.models.items():
            if not served.joined:
                continue
            problem = served.client.problem()
            if problem is not None:
                return self._named(name, problem)
        for name, report in self._reports():
            if report.liveness_problem is not None:
                return self._named(name, report.liveness_problem)
        return None

    def incomplete(self) -> str | None:
        """What `/ready` still waits for once the engine is ready (other front-ends)."""
        reports = self._reports()
        if not reports:
            return None
        report = reports[0][1]
        if report.front_ends_ready >= report.front_ends:
            return None
        return f"{report.front_ends_ready} of {report.front_ends} front-end processes ready"

    def devices(self) -> list[str]:
        """Each replica's device (the default model's; every model has one per device)."""
        report = self.default.report()
        return list(report.devices) if report is not None else []

    async def refresh(self) -> None:
        """Bring the engine's state up to date before a reader that must not lag."""
        for client in self._clients():
            await client.refresh()

    async def metrics_text(self) -> bytes:
        """The metrics: every model's engine records into one registry, labelled by model."""
        return await self.default.client.metrics_text()

    async def reconfigure(
        self, changes: Mapping[str, object], model: str | None = None
    ) -> EngineConfig:
        """Change a model's live batching limits (ValueError for a bad value); a larger
        `max_batch_size` than any warmed so far is warmed first."""
        return await self.model(model).client.reconfigure(changes)

    def stop_admitting(self) -> None:
        """From now on `/ready` and new predictions answer 503 (safe in a signal handler)."""
        self._draining = True
        for client in self._loaded():
            client.stop_admitting()

    async def drain(self) -> None:
        """Stop admitting and answer every admitted request, within `drain_timeout_s`."""
        self.stop_admitting()
        await self.versions.cancel_loads()
        await self.shadows.aclose()
        await asyncio.gather(*(client.drain() for client in self._loaded()))

    async def start(self) -> None:
        """Start what runs beside the models: the prediction log's writer. Raises
        SchemaTooNew (startup then fails)."""
        if self.log is not None:
            await self.log.start()

    async def aclose(self) -> None:
        """Drain, then flush the prediction log and stop the tokenizers and the engine
        side (in one process, the device threads too)."""
        try:
            await self.drain()
            if self.log is not None:
                await self.log.aclose()
        finally:
            for served in self.models.values():
                await served.aclose()
            await asyncio.to_thread(self.versions.imaging.close)
            for client in self._loaded():
                await client.aclose()
