"""The HTTP side's runtime: settings, the model's encoder and an engine client, and the
state that routes, middleware and the drain read. One class for both ways to serve: the
client is `server.host.LocalClient` in one process, `server.client.RemoteClient` in a
front-end of `--workers N`; status, liveness, `/info` and `/model` are written here once,
from the engine side's `EngineReport`.

This module imports neither torch nor transformers, nor does anything it imports."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter

from batcher import EngineConfig
from batcher.models import Encoder
from server.cache import CachedEngine, ResultCache
from server.client import EngineClient, EngineHandle, EngineReport, Status, WarmingStep
from server.schemas import ThreadsInfo
from server.settings import Settings
from server.shared_cache import SharedCache
from server.timeline import Recent
from server.tokenizing import FRONT_END_INLINE_CHARS, INLINE_CHARS, Tokenizer

logger = logging.getLogger("microbatch.server")


class Runtime:
    """One per app, built in its lifespan. Routes reach it through `RuntimeDep` (the
    predict routes through `request.state`, see `server.routes.parsing.runtime_of`)."""

    def __init__(
        self, settings: Settings, client: EngineClient, registry: CollectorRegistry
    ) -> None:
        self.settings = settings
        self.client = client
        self.disconnects = Counter(
            "microbatch_client_disconnects",
            "Requests whose client went away while their items waited (not computed).",
            registry=registry,
        )
        self._tokenizer: Tokenizer | None = None
        self._draining = False
        self.cache = (
            ResultCache(settings.cache_size, int(settings.cache_mb * 2**20),
                        settings.cache_ttl_s, registry)
            if settings.cache_size > 0
            else None
        )  # fmt: skip
        """The result cache (`server.cache`); None when off."""
        self._shared: SharedCache | None = None

    @property
    def encoder(self) -> Encoder:
        """The model's encoder: its name, task, labels and token limit, and how inputs
        become token ids. Raises EngineClosed (503) while a front-end waits for it."""
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
        if self.cache is None:
            return self.client.engine
        return CachedEngine(self.client.engine, self.cache, self._shared_cache(), read=cached)

    def _shared_cache(self) -> SharedCache | None:
        """The Redis tier, made at the first prediction: its keys name the model and its
        precision, known once the engine side is ready."""
        url = self.settings.cache_url
        if url is None or self.cache is None:
            return None
        if self._shared is None:
            dtype = self.describe().get("dtype", "")
            namespace = f"microbatch:1:{self.encoder.name}:{dtype}:"
            self._shared = SharedCache(
                url, namespace, self.settings.cache_ttl_s,
                self.cache.shared_hits, self.cache.shared_errors,
            )  # fmt: skip
        return self._shared

    @property
    def status(self) -> Status:
        engine_side = self.client.status
        if self._draining and engine_side != "failed":
            return "draining"
        return engine_side

    @property
    def _report(self) -> EngineReport | None:
        return self.client.report()

    @property
    def error(self) -> str | None:
        problem = self.client.problem()
        if problem is not None:
            return problem
        report = self._report
        return report.error if report is not None else None

    @property
    def warming(self) -> WarmingStep | None:
        report = self._report
        return report.warming if report is not None else None

    @property
    def saturated(self) -> bool:
        """The queue is nearly full: a load balancer should send new traffic elsewhere."""
        report = self._report
        return report is not None and report.saturated

    @property
    def threads(self) -> ThreadsInfo | None:
        report = self._report
        return report.threads if report is not None else None

    def liveness_problem(self) -> str | None:
        """Why an orchestrator should restart this process; None while it is alive."""
        problem = self.client.problem()
        if problem is not None:
            return problem
        report = self._report
        return report.liveness_problem if report is not None else None

    def incomplete(self) -> str | None:
        """What `/ready` still waits for once the engine is ready (other front-ends)."""
        report = self._report
        if report is None or report.front_ends_ready >= report.front_ends:
            return None
        return f"{report.front_ends_ready} of {report.front_ends} front-end processes ready"

    def describe(self) -> dict[str, object]:
        """The served model, as the process that runs it describes it."""
        report = self._report
        return dict(report.description) if report is not None else {}

    def devices(self) -> list[str]:
        """Each replica's device."""
        report = self._report
        return list(report.devices) if report is not None else []

    async def refresh(self) -> None:
        """Bring the engine's state up to date before a reader that must not lag."""
        await self.client.refresh()

    async def recent(self, since: float) -> Recent:
        return await self.client.recent(since)

    async def metrics_text(self) -> bytes:
        return await self.client.metrics_text()

    async def reconfigure(self, changes: Mapping[str, object]) -> EngineConfig:
        """Change the live batching limits (ValueError for a bad value); a larger
        `max_batch_size` than any warmed so far is warmed first."""
        return await self.client.reconfigure(changes)

    def stop_admitting(self) -> None:
        """From now on `/ready` and new predictions answer 503 (safe in a signal handler)."""
        self._draining = True
        self.client.stop_admitting()

    async def drain(self) -> None:
        """Stop admitting and answer every admitted request, within `drain_timeout_s`."""
        self.stop_admitting()
        await self.client.drain()

    async def aclose(self) -> None:
        """Drain, then stop the tokenizer and the engine side (in one process, the device
        threads too)."""
        try:
            await self.drain()
        finally:
            if self._tokenizer is not None:
                await self._tokenizer.aclose()
            if self._shared is not None:
                await self._shared.aclose()
            await self.client.aclose()
