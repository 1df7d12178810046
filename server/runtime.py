"""The HTTP side's runtime: settings, the model's encoder and an engine client, and the
state that routes, middleware and the drain read. One class for both ways to serve: the
client is `server.host.LocalClient` in one process, `server.client.RemoteClient` in a
front-end of `--workers N`; status, liveness, `/info` and `/model` are written here once,
from the engine side's `EngineReport`.

This module imports neither torch nor transformers, nor does anything it imports."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter

from batcher import EngineConfig
from batcher.models import Encoder
from server.cache import CachedEngine, ResultCache
from server.client import EngineClient, EngineHandle, EngineReport, Status, WarmingStep
from server.errors import UnknownModel
from server.operator_schemas import ThreadsInfo
from server.settings import Settings
from server.shared_cache import SharedCache
from server.tokenizing import FRONT_END_INLINE_CHARS, INLINE_CHARS, Tokenizer

logger = logging.getLogger("microbatch.server")


STATUS_ORDER: tuple[Status, ...] = ("failed", "warming", "draining", "ready")
"""Several models' statuses as one: the first of these that any of them has."""


class Served:
    """One model as the HTTP side serves it: its engine client, encoder and tokenizer,
    and its namespace in the shared cache."""

    def __init__(self, name: str, client: EngineClient, runtime: Runtime) -> None:
        self.name = name
        self.client = client
        self._runtime = runtime
        self._tokenizer: Tokenizer | None = None
        self._shared: SharedCache | None = None

    @property
    def encoder(self) -> Encoder:
        """Its encoder: its name, task, labels and token limit, and how inputs become
        token ids. Raises EngineClosed (503) while a front-end waits for it."""
        return self.client.encoder

    @property
    def tokenizer(self) -> Tokenizer:
        """Tokenizes the requests' texts off the loop, in batches (`server.tokenizing`).
        A front-end tokenizes short texts on its loop always: its parallelism is the
        processes, a core each."""
        if self._tokenizer is None:
            if self.client.front_end:
                self._tokenizer = Tokenizer(
                    self.encoder, inline_chars=FRONT_END_INLINE_CHARS, gather_short=False
                )
            else:
                self._tokenizer = Tokenizer(self.encoder, inline_chars=INLINE_CHARS)
        return self._tokenizer

    @property
    def engine(self) -> EngineHandle:
        return self.client.engine

    def engine_for(self, *, cached: bool) -> EngineHandle:
        """The engine as a prediction sees it: behind the result cache when there is one
        (`cached=False`: a request that asked for a fresh answer skips its lookups)."""
        cache = self._runtime.cache
        if cache is None:
            return self.client.engine
        return CachedEngine(self.client.engine, cache, self._shared_cache(), read=cached,
                            model=self.name)  # fmt: skip

    def _shared_cache(self) -> SharedCache | None:
        """The Redis tier, made at the first prediction: its keys name the model and its
        precision, known once the engine side is ready."""
        runtime = self._runtime
        url = runtime.settings.cache_url
        if url is None or runtime.cache is None:
            return None
        if self._shared is None:
            dtype = self.describe().get("dtype", "")
            namespace = f"microbatch:1:{self.encoder.name}:{dtype}:"
            self._shared = SharedCache(
                url, namespace, runtime.settings.cache_ttl_s,
                runtime.cache.shared_hits, runtime.cache.shared_errors,
            )  # fmt: skip
        return self._shared

    @property
    def status(self) -> Status:
        return self.client.status

    def report(self) -> EngineReport | None:
        return self.client.report()

    def describe(self) -> dict[str, object]:
        """The model, as the process that runs it describes it."""
        report = self.report()
        return dict(report.description) if report is not None else {}

    async def aclose(self) -> None:
        if self._tokenizer is not None:
            await self._tokenizer.aclose()
        if self._shared is not None:
            await self._shared.aclose()


class Runtime:
    """One per app, built in its lifespan. Routes reach it through `RuntimeDep` (the
    predict routes through `request.state`, see `server.routes.parsing.runtime_of`).

    It serves one model or several (`--model NAME=PATH` repeated): `model(name)` finds
    one (the first, or `--default-model`, for a request that names none). What is about
    the server as a whole (status, liveness, draining) is written here over all of
    them; the properties `encoder`, `tokenizer`, `engine` and `describe` are the default
    model's."""

    def __init__(
        self,
        settings: Settings,
        client: EngineClient | Mapping[str, EngineClient],
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        clients = client if isinstance(client, Mapping) else {"": client}
        if not clients:
            raise ValueError("a runtime needs at least one model")
        self.models = {name: Served(name, c, self) for name, c in clients.items()}
        """By name, the default first. A lone model handed in unnamed is found by
        whatever name its encoder has, or by none."""
        self.default = next(iter(self.models.values()))
        self.disconnects = Counter(
            "microbatch_client_disconnects",
            "Requests whose client went away while their items waited (not computed).",
            registry=registry,
        )
        self._draining = False
        self.cache = (
            ResultCache(settings.cache_size, int(settings.cache_mb * 2**20),
                        settings.cache_ttl_s, registry)
            if settings.cache_size > 0
            else None
        )  # fmt: skip
        """The result cache (`server.cache`), shared by the models; None when off."""

    # -- the models ----------------------------------------------------------------------

    def model(self, name: str | None) -> Served:
        """The model a request names (None or "": the default). Raises UnknownModel."""
        if not name:
            return self.default
        served = self.models.get(name)
        if served is not None:
            return served
        if len(self.models) == 1:
            # One model answers to any name its clients know it by (OpenAI clients
            # always send one); several are told apart by their served names.
            return self.default
        for served in self.models.values():  # its hub id or path, as /v1/models lists it
            if self._encoder_name(served) == name:
                return served
        raise UnknownModel(name, self.names())

    def names(self) -> list[str]:
        """Every served model's name, the default first."""
        return [self._encoder_name(served) or served.name for served in self.models.values()]

    @staticmethod
    def _encoder_name(served: Served) -> str | None:
        try:
            return served.encoder.name
        except Exception:  # a front-end still waiting for the engine process
            return None

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
        return [served.client for served in self.models.values()]

    @property
    def status(self) -> Status:
        statuses = {client.status for client in self._clients()}
        engine_side = next(s for s in STATUS_ORDER if s in statuses)
        if self._draining and engine_side != "failed":
            return "draining"
        return engine_side

    def _reports(self) -> list[tuple[str, EngineReport]]:
        found = []
        for name, served in self.models.items():
            report = served.report()
            if report is not None:
                found.append((name, report))
        return found

    def _named(self, name: str, text: str) -> str:
        return f"{name}: {text}" if len(self.models) > 1 else text

    @property
    def error(self) -> str | None:
        for name, served in self.models.items():
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
        for client in self._clients():
            client.stop_admitting()

    async def drain(self) -> None:
        """Stop admitting and answer every admitted request, within `drain_timeout_s`."""
        self.stop_admitting()
        await asyncio.gather(*(client.drain() for client in self._clients()))

    async def aclose(self) -> None:
        """Drain, then stop the tokenizers and the engine side (in one process, the
        device threads too)."""
        try:
            await self.drain()
        finally:
            for served in self.models.values():
                await served.aclose()
            for client in self._clients():
                await client.aclose()
