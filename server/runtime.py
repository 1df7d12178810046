"""What the app's lifespan builds and the routes use: settings, model, engine, status.

`Runtime` is what routes see. `LocalRuntime` holds the model and the engine in this
process (`microbatch serve`, and `--workers 1`); `server.frontend.FrontEnd` holds a
handle on the engine of another process (`--workers N`, see `server.workers`)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, generate_latest

from batcher import (
    Engine,
    EngineConfig,
    EngineMetrics,
    EngineStats,
    Result,
    State,
    ThreadRunner,
)
from batcher.models import (
    DEFAULT_OPTIONS,
    Encoded,
    GpuMemoryCollector,
    Options,
    Output,
    Task,
    TextModel,
    Token,
    TruncationDirection,
    cpu_budget,
    cuda_devices,
    default_threads,
    set_threads,
)
from server.schemas import ThreadsInfo
from server.settings import Settings
from server.timeline import MAX_LATENCIES, Recent, Timeline
from server.tokenizing import Tokenizer

logger = logging.getLogger("microbatch.server")

Status = Literal["warming", "ready", "draining", "failed"]


@dataclass(frozen=True, slots=True)
class WarmingStep:
    """Where the warm-up is: shape `step` of `steps` on replica `replica` of `replicas`."""

    replica: int
    replicas: int
    step: int
    steps: int
    what: str
    started: float
    """perf_counter at the start of the warm-up."""

    def describe(self) -> str:
        elapsed = time.perf_counter() - self.started
        on = f" on replica {self.replica + 1} of {self.replicas}" if self.replicas > 1 else ""
        return f"warm-up step {self.step} of {self.steps}{on}: {self.what}, {elapsed:.0f} s so far"


class ServedModel(Protocol):
    """What the server needs of a model; `batcher.models.TextModel` is the real one."""

    name: str
    task: Task
    labels: tuple[str, ...]
    max_tokens: int

    def encode_many(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        options: Options = DEFAULT_OPTIONS,
        truncation_direction: TruncationDirection = "right",
    ) -> list[Encoded]:
        """Raises InvalidOption for options the model cannot honour."""
        ...

    def encode_ids(
        self, sequences: Sequence[Sequence[int]], options: Options = DEFAULT_OPTIONS
    ) -> list[Encoded]:
        """Inputs given as token ids, used as they are. Raises InvalidOption."""
        ...

    def tokenize(
        self, texts: Sequence[str], add_special_tokens: bool = True, prompt_name: str | None = None
    ) -> list[list[Token]]: ...

    def cost(self, item: Encoded) -> int: ...

    def predict(self, items: Sequence[Encoded]) -> Sequence[Output]: ...

    def warm_up(
        self, max_batch_size: int, on_step: Callable[[int, int, str], None] | None = None
    ) -> None:
        """Compile and run every shape; `on_step(step, steps, what)` before each."""
        ...

    def describe(self) -> dict[str, object]: ...


class EngineHandle(Protocol):
    """What routes use of the engine: `batcher.Engine` in this process, or
    `server.frontend.EngineView` on an engine in another."""

    @property
    def state(self) -> State: ...

    @property
    def config(self) -> EngineConfig: ...

    def clock(self) -> float: ...

    def stats(self) -> EngineStats: ...

    def check_room(self, n: int = 1) -> None: ...

    async def submit(
        self, payload: Encoded, *, deadline: float | None = None
    ) -> Result[Output]: ...

    async def submit_many(
        self, payloads: Sequence[Encoded], *, deadline: float | None = None
    ) -> list[Result[Output]]: ...


class Runtime(Protocol):
    """What the routes, the middleware and the drain see of the server's state."""

    settings: Settings
    model: ServedModel
    """Encodes and tokenizes inputs; its name, task, labels and token limit."""
    tokenizer: Tokenizer
    disconnects: Counter
    threads: ThreadsInfo | None

    @property
    def status(self) -> Status: ...

    @property
    def error(self) -> str | None: ...

    @property
    def warming(self) -> WarmingStep | None: ...

    @property
    def engine(self) -> EngineHandle: ...

    @property
    def saturated(self) -> bool: ...

    def liveness_problem(self) -> str | None: ...

    def incomplete(self) -> str | None:
        """What `/ready` still waits for once the engine is ready (other processes)."""
        ...

    def describe(self) -> dict[str, object]:
        """The served model, as the process that runs it describes it."""
        ...

    def devices(self) -> list[str]:
        """Each replica's device."""
        ...

    async def refresh(self) -> None:
        """Bring the engine's state up to date before a reader that must not lag."""
        ...

    async def recent(self, since: float) -> Recent: ...

    async def metrics_text(self) -> bytes: ...

    async def reconfigure(self, changes: Mapping[str, object]) -> EngineConfig: ...

    def stop_admitting(self) -> None: ...

    async def drain(self) -> None: ...

    async def aclose(self) -> None: ...


GC_GEN0_THRESHOLD = 10_000
"""Net allocations between young-generation collections (Python's default: 700)."""


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for serving, once the model is warm.

    What exists then (torch, transformers, the model) lives as long as the process:
    `gc.freeze` takes it out of every later collection. And with 64 requests in flight,
    their live coroutines, futures and dicts crossed Python's default threshold of 700
    net allocations every few requests: collections took about a tenth of the server's
    CPU under load (measured with `gc.callbacks` on the null-model server of
    `benchmarks/overhead.py`).
    Short-lived objects die by reference counting anyway; the collector is only needed
    for cycles, and a higher threshold still finds them."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(GC_GEN0_THRESHOLD, gen0), gen1, gen2)


class LocalRuntime:
    """One per app, fully built by `LocalRuntime.load` inside the lifespan: the models, the
    engine and its device threads exist for as long as the app serves. Routes reach it
    through `RuntimeDep` (the predict routes through `request.state`, see
    `server.routes.parsing.runtime_of`)."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        models: Sequence[ServedModel],
        latencies: deque[float] | None = None,
    ) -> None:
        if not models:
            raise ValueError("a runtime needs at least one model")
        self.settings = settings
        self.registry = registry
        self.status: Status = "warming"
        self.error: str | None = None
        self.models = list(models)
        """One per replica (device)."""
        self.model = self.models[0]
        """The first replica's model: it encodes inputs and describes the model."""
        self.tokenizer = Tokenizer(self.model)
        """Tokenizes the requests' texts off the loop, in batches."""
        self._runners = [
            ThreadRunner(m, thread_name=f"microbatch-device-{i}") for i, m in enumerate(self.models)
        ]
        self.engine: Engine[Encoded, Output] = Engine(
            self._runners, settings.engine_config(), metrics=EngineMetrics(registry)
        )
        self.disconnects = Counter(
            "microbatch_client_disconnects",
            "Requests whose client went away while their items waited (not computed).",
            registry=registry,
        )
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

    @classmethod
    async def load(
        cls,
        settings: Settings,
        registry: CollectorRegistry,
        model: ServedModel | Sequence[ServedModel] | None = None,
        latencies: deque[float] | None = None,
    ) -> LocalRuntime:
        """Load the model named by `settings` (or take `model`), one replica per device
        (off the loop), and start warming it up in the background. `latencies` is where
        the middleware leaves request times for the timeline. Raises ModelLoadError or
        ValueError: startup then fails."""
        threads = None
        if model is None:
            threads = _set_threads(settings)
            models: list[ServedModel] = []
            devices = settings.device_list()
            started = time.perf_counter()
            for replica, device in enumerate(devices, start=1):
                options = settings.load_options(device)
                logger.info("loading %d/%d: %s on %s", replica, len(devices),
                            options.source or "the built-in model", device)  # fmt: skip
                models.append(await asyncio.to_thread(TextModel.load, options))
                logger.info("loaded %d/%d, %.1fs so far", replica, len(devices),
                            time.perf_counter() - started)  # fmt: skip
        elif isinstance(model, Sequence):
            models = list(model)
        else:
            models = [model]
        runtime = cls(settings, registry, models, latencies)
        runtime.threads = threads
        if model is None and (gpus := cuda_devices([str(m.describe()["device"]) for m in models])):
            registry.register(GpuMemoryCollector(gpus))
        warm_up = runtime._warm_and_start(runtime.engine)
        runtime._warm_up = asyncio.create_task(warm_up, name="microbatch-warm-up")
        runtime._sampler = asyncio.create_task(runtime.timeline.run(), name="microbatch-timeline")
        return runtime

    async def _warm_and_start(self, engine: Engine[Encoded, Output]) -> None:
        try:
            # One replica after the other: torch.compile is not made for parallel tracing.
            size = engine.configured.max_batch_size
            started = time.perf_counter()
            for replica, (runner, model) in enumerate(zip(self._runners, self.models, strict=True)):
                await runner.call(model.warm_up, size, self._step_reporter(replica, started))
            self.warming = None
            self._warmed_batch_size = size
            await engine.start()
        except Exception as exc:
            logger.exception("warm-up failed; the server stays unready")
            self.status, self.error = "failed", f"warm-up failed: {type(exc).__name__}: {exc}"
            return
        tune_gc()
        self.status = "ready"
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
            for runner, model in zip(self._runners, self.models, strict=True):
                await runner.call(model.warm_up, config.max_batch_size)
            self._warmed_batch_size = config.max_batch_size
        return engine.reconfigure(**changes)

    def incomplete(self) -> str | None:
        return None

    def describe(self) -> dict[str, object]:
        return self.model.describe()

    def devices(self) -> list[str]:
        return [str(m.describe().get("device")) for m in self.models]

    async def refresh(self) -> None:
        return None

    async def recent(self, since: float) -> Recent:
        return self.timeline.recent(since)

    async def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

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
        """From now on `/ready` and new predictions answer 503 (safe in a signal handler)."""
        if self.status != "failed":
            self.status = "draining"

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
            await self.tokenizer.aclose()
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
