"""The engine side of the server: the model's replicas, their warm-up, the engine and its
timeline, in one `EngineHost`. It runs unchanged in the one process of `microbatch serve`
(the app's `LocalClient` holds it) and in the engine process of `--workers N`
(`server.engine_process` serves it on a socket to the front-ends' `server.client.RemoteClient`).

Only this side imports torch and transformers (through `batcher.models`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest

from batcher import (
    DeviceShare,
    Engine,
    EngineConfig,
    EngineMetrics,
    ThreadRunner,
)
from batcher.models import (
    Encoded,
    Encoder,
    GpuMemoryCollector,
    Output,
    cpu_budget,
    cuda_devices,
    default_threads,
    load_model,
    set_threads,
)
from server.client import READY_WITHIN_S, EngineReport, Status, WarmingStep
from server.collector import tune_gc
from server.operator_schemas import ThreadsInfo
from server.settings import Settings
from server.specs import ModelSpec
from server.timeline import MAX_LATENCIES, Recent, Timeline

logger = logging.getLogger("microbatch.server")


class ServedModel(Protocol):
    """What the engine side needs of a model; `batcher.models.TextModel` is the real one."""

    @property
    def encoder(self) -> Encoder:
        """Its inputs' encoder; the HTTP side gets it (a copy, in another process)."""
        ...

    packed_outputs: bool
    """Embeddings as float32 bytes (`batcher.models.wire`), set in an engine process."""

    def cost(self, item: Encoded) -> int: ...

    def predict(self, items: Sequence[Encoded]) -> Sequence[Output]: ...

    def warm_up(
        self, max_batch_size: int, on_step: Callable[[int, int, str], None] | None = None
    ) -> None:
        """Compile and run every shape; `on_step(step, steps, what)` before each."""
        ...

    def describe(self) -> dict[str, object]: ...


def _identity(item: Encoded) -> Hashable:
    """What makes two items compute the same output (a text's tokens and options, an
    image's pixels and options)."""
    return item.identity()


class EngineHost:
    """The models (one replica per device), the engine and its device threads, the
    warm-up and the timeline; built by `EngineHost.load`, alive until `aclose`."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        models: Sequence[ServedModel],
        latencies: deque[float] | None = None,
        *,
        share: DeviceShare | None = None,
        warm_lock: asyncio.Lock | None = None,
        label: str | None = None,
    ) -> None:
        if not models:
            raise ValueError("an engine host needs at least one model")
        self.settings = settings
        self.registry = registry
        self.status: Status = "warming"
        self.error: str | None = None
        self.models = list(models)
        """One per replica (device)."""
        self.model = self.models[0]
        """The first replica's model: it describes the model."""
        self.encoder = self.model.encoder
        self._runners = [
            ThreadRunner(m, thread_name=f"microbatch-device-{i}") for i, m in enumerate(self.models)
        ]
        self.name = label or self.encoder.name
        """Its `model` label in the metrics: its served key (`NAME@VERSION`)."""
        self.share = share
        self.engine: Engine[Encoded, Output] = Engine(
            self._runners,
            settings.engine_config(),
            metrics=EngineMetrics(registry, model=self.name),
            identity=_identity if settings.coalesce else None,
            share=share,
        )
        self._warm_lock = warm_lock if warm_lock is not None else asyncio.Lock()
        """Held while warming: several models' warm-ups run one after the other."""
        self.timeline = Timeline(
            self.engine, latencies if latencies is not None else deque(maxlen=MAX_LATENCIES)
        )
        """The last minutes, sampled each second, for `GET /dashboard`."""
        self._sampler: asyncio.Task[None] | None = None
        self._warm_up: asyncio.Task[None] | None = None
        self.warming: WarmingStep | None = None
        """The warm-up step under way (None before and after); /ready shows it."""
        self._warmed_batch_size = 0
        self.threads: ThreadsInfo | None = None
        """torch's threads and why; None when the models were handed in."""
        self.changed = asyncio.Event()
        """Set when the status or the limits change (the engine process pushes its report)."""

    @classmethod
    async def load(
        cls,
        settings: Settings,
        registry: CollectorRegistry,
        model: ServedModel | Sequence[ServedModel] | None = None,
        latencies: deque[float] | None = None,
        *,
        packed_outputs: bool = False,
        spec: ModelSpec | None = None,
        share: DeviceShare | None = None,
        warm_lock: asyncio.Lock | None = None,
    ) -> EngineHost:
        """Load the model `spec` names (default: the first of `settings`), or take
        `model`, one replica per device (off the loop), and start warming it up in the
        background. `latencies` is where request times arrive for the timeline;
        `packed_outputs` makes the models answer embeddings as bytes, for a socket;
        `share` is its place on devices shared with other models, `warm_lock` what their
        warm-ups take turns on. Raises ModelLoadError or ValueError: startup then fails."""
        threads = None
        if model is None:
            threads = _set_threads(settings)
            models: list[ServedModel] = []
            devices = settings.device_list()
            started = time.perf_counter()
            for replica, device in enumerate(devices, start=1):
                options = settings.load_options(device, spec)
                logger.info("loading %d/%d: %s on %s", replica, len(devices),
                            options.source or "the built-in model", device)  # fmt: skip
                models.append(await asyncio.to_thread(load_model, options))
                logger.info("loaded %d/%d, %.1fs so far", replica, len(devices),
                            time.perf_counter() - started)  # fmt: skip
        elif isinstance(model, Sequence):
            models = list(model)
        else:
            models = [model]
        for replica_model in models:
            replica_model.packed_outputs = packed_outputs
        host = cls(settings, registry, models, latencies, share=share, warm_lock=warm_lock,
                   label=spec.key if spec is not None and spec.key else None)  # fmt: skip
        host.threads = threads
        if model is None and (gpus := cuda_devices([str(m.describe()["device"]) for m in models])):
            with contextlib.suppress(ValueError):  # another model's host registered it
                registry.register(GpuMemoryCollector(gpus))
        warm_up = host._warm_and_start(host.engine)
        host._warm_up = asyncio.create_task(warm_up, name="microbatch-warm-up")
        host._sampler = asyncio.create_task(host.timeline.run(), name="microbatch-timeline")
        return host

    async def _warm_and_start(self, engine: Engine[Encoded, Output]) -> None:
        try:
            # One replica after the other: torch.compile is not made for parallel tracing.
            size = engine.configured.max_batch_size
            async with self._warm_lock:
                started = time.perf_counter()
                for replica, (runner, model) in enumerate(
                    zip(self._runners, self.models, strict=True)
                ):
                    await runner.call(model.warm_up, size, self._step_reporter(replica, started))
            self.warming = None
            self._warmed_batch_size = size
            await engine.start()
        except Exception as exc:
            logger.exception("warm-up failed; the server stays unready")
            self.status, self.error = "failed", f"warm-up failed: {type(exc).__name__}: {exc}"
            self.changed.set()
            return
        tune_gc()
        self.status = "ready"
        self.changed.set()
        logger.info("ready: %s on %d replica(s)", self.models[0].describe(), len(self.models))

    def _step_reporter(self, replica: int, started: float) -> Callable[[int, int, str], None]:
        """Keeps the step a replica's warm-up is on (called on its device thread: one
        reference assignment, which readers on the loop see whole)."""
        replicas = len(self.models)

        def report(step: int, steps: int, what: str) -> None:
            self.warming = WarmingStep(replica, replicas, step, steps, what, started)

        return report

    async def reconfigure(self, changes: Mapping[str, object]) -> EngineConfig:
        """Change the live batching limits (ValueError for a bad value). A larger
        `max_batch_size` than any warmed so far first warms the new shapes on every
        replica, in turn with their batches, so that no request triggers a compile."""
        engine = self.engine
        config = engine.configured.replace(**changes)  # validates before any warm-up
        if config.max_batch_size > self._warmed_batch_size:
            async with self._warm_lock:
                for runner, model in zip(self._runners, self.models, strict=True):
                    await runner.call(model.warm_up, config.max_batch_size)
            self._warmed_batch_size = config.max_batch_size
        live = engine.reconfigure(**changes)
        self.changed.set()
        return live

    def describe(self) -> dict[str, object]:
        return self.model.describe()

    def devices(self) -> list[str]:
        return [str(m.describe().get("device")) for m in self.models]

    def report(
        self, front_ends: Mapping[int, tuple[Status, float]] | None = None, workers: int = 1
    ) -> EngineReport:
        """The engine side's state for the HTTP side. `front_ends` maps each front-end's
        pid to its last status and when it said so (time.monotonic); None in one process,
        whose HTTP side is ready whenever this is."""
        if front_ends is None:
            ready = workers
        else:
            now = time.monotonic()
            ready = sum(
                1 for status, at in front_ends.values()
                if status == "ready" and now - at < READY_WITHIN_S
            )  # fmt: skip
        return EngineReport(
            status=self.status,
            error=self.error,
            warming=self.warming,
            liveness_problem=self.liveness_problem(),
            saturated=self.saturated,
            stats=self.engine.stats(),
            description=self.describe(),
            devices=self.devices(),
            threads=self.threads,
            front_ends_ready=ready,
            front_ends=workers,
        )

    def liveness_problem(self) -> str | None:
        """Why an orchestrator should restart this process; None while it is alive."""
        if self.status == "failed":
            return self.error or "failed"
        stats = self.engine.stats()
        if stats.state == "new":
            return None
        if not stats.healthy:
            return "the engine's dispatch task died"
        busy_s = stats.busy_for_s
        if busy_s > self.settings.watchdog_s:
            return (
                f"the device worker is stuck: one forward pass has run {busy_s:.0f} s "
                f"(--watchdog-s {self.settings.watchdog_s:g})"
            )
        return None

    @property
    def saturated(self) -> bool:
        """The queue is nearly full: a load balancer should send new traffic elsewhere."""
        stats = self.engine.stats()
        return stats.queue_depth >= self.settings.saturated_at * stats.config.max_queue_size

    def stop_admitting(self) -> None:
        """From now on the status is `draining`. Safe in a signal handler of this
        process's loop (as `loop.add_signal_handler` calls it): it sets a flag and an
        event on the loop's own thread."""
        if self.status != "failed":
            self.status = "draining"
            self.changed.set()

    async def drain(self) -> None:
        """Stop admitting and answer every admitted request, within `drain_timeout_s`."""
        self.stop_admitting()
        if self._warm_up is not None and not self._warm_up.done():
            self._warm_up.cancel()
            await asyncio.gather(self._warm_up, return_exceptions=True)
        if self.engine.state in ("new", "running"):  # the first drain says so, once
            logger.info("draining: %d items queued", self.engine.queue_depth)
        await self.engine.aclose(timeout_s=self.settings.drain_timeout_s)

    async def aclose(self) -> None:
        """Drain, stop the device thread, and log what became of every item."""
        try:
            await self.drain()
        finally:
            if self._sampler is not None:
                self._sampler.cancel()
                await asyncio.gather(self._sampler, return_exceptions=True)
            for runner in self._runners:
                await asyncio.to_thread(runner.close)
            logger.info("stopped: %s", self.item_counts())

    def item_counts(self) -> dict[str, int]:
        """Items admitted and their outcomes so far (the counters of /metrics)."""
        return dict(self.engine.stats().items)


def _set_threads(settings: Settings) -> ThreadsInfo:
    """torch's intra-op threads: `--torch-threads`, else by the CPUs this process may use."""
    budget = cpu_budget()
    if settings.torch_threads is not None:
        count, reason = settings.torch_threads, "asked for (--torch-threads)"
    else:
        count, reason = default_threads(budget)
    set_threads(count)
    logger.info("torch threads: %d (%s); CPUs: %s", count, reason, budget)
    return ThreadsInfo(torch=count, cpus=str(budget), reason=reason)


class LocalClient:
    """The HTTP side's `server.client.EngineClient` for a host in this process."""

    front_end = False

    def __init__(self, host: EngineHost) -> None:
        self.host = host

    @property
    def encoder(self) -> Encoder:
        return self.host.encoder

    @property
    def engine(self) -> Engine[Encoded, Output]:
        return self.host.engine

    @property
    def status(self) -> Status:
        return self.host.status

    def report(self) -> EngineReport:
        return self.host.report()

    def problem(self) -> str | None:
        return None

    async def refresh(self) -> None:
        return None

    async def recent(self, since: float) -> Recent:
        return self.host.timeline.recent(since)

    async def metrics_text(self) -> bytes:
        return generate_latest(self.host.registry)

    async def reconfigure(self, changes: Mapping[str, object]) -> EngineConfig:
        return await self.host.reconfigure(changes)

    def stop_admitting(self) -> None:
        self.host.stop_admitting()

    async def drain(self) -> None:
        await self.host.drain()

    async def aclose(self) -> None:
        await self.host.aclose()
