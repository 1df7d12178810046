"""The load generator's core, used by every tool (bench, sweep, compare, soak):
closed-loop clients and open-loop Poisson arrivals, measured on an injectable clock, with
no retries (a failure is a data point), and one definition of a latency percentile.

Latency in the open loop is measured from each request's *scheduled* arrival, so a slow
client or server cannot hide queueing delay (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from benchmarks.transport import Transport

Clock = Callable[[], float]
LoadKind = Literal["closed", "open"]
T = TypeVar("T")

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float] | np.ndarray[Any, Any], q: float) -> float:
    """The `q`-th percentile (0-100) of `values`, linearly interpolated between the
    closest ranks (numpy's default); NaN when there are none. Every tool reports this
    one."""
    return float(np.percentile(values, q)) if len(values) else math.nan


@dataclass(frozen=True)
class Load:
    """`closed`: `value` clients in a loop; `open`: Poisson arrivals at `value` requests/s."""

    kind: LoadKind
    value: float

    def __str__(self) -> str:
        if self.kind == "open":
            return f"{self.value:g} req/s"
        clients = int(self.value)
        return f"{clients} client" if clients == 1 else f"{clients} clients"


OPENAI_ENDPOINTS = ("/v1/embeddings", "/embeddings")
"""OpenAI's embeddings route: ours, and where servers such as Infinity serve it."""
ENDPOINTS = ("/predict", "/predict/batch", *OPENAI_ENDPOINTS)


@dataclass(frozen=True)
class Request:
    endpoint: str = "/predict"
    texts_per_request: int = 1
    """For /predict/batch: texts in each request."""
    encoding_format: str | None = None
    """Ask for vectors as `float` or `base64` (None: the server's default, floats)."""
    model: str = "default"
    """OpenAI's routes: the `model` field of each request."""

    def body(self, texts: list[str], index: int) -> dict[str, object]:
        extra = {} if self.encoding_format is None else {"encoding_format": self.encoding_format}
        if self.endpoint == "/predict/batch":
            n = len(texts)
            batch = [texts[(index + k) % n] for k in range(self.texts_per_request)]
            return {"texts": batch, **extra}
        if self.endpoint in OPENAI_ENDPOINTS:  # one text a request, as /predict sends
            return {"input": texts[index % len(texts)], "model": self.model, **extra}
        return {"text": texts[index % len(texts)], **extra}


@dataclass
class Samples:
    """Raw observations of the measured window (warm-up excluded)."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    duration_s: float = 0.0
    by_kind: dict[str, list[float]] = field(default_factory=dict)
    """The latencies again, by the kind of text each request sent (the mix's queries and
    chunks), when the texts have kinds."""

    def record(self, latency_s: float, status: str, kind: str | None) -> None:
        self.latencies_s.append(latency_s)
        self.statuses[status] += 1
        if kind is not None:
            self.by_kind.setdefault(kind, []).append(latency_s)

    def merge(self, other: Samples) -> None:
        self.latencies_s += other.latencies_s
        self.statuses.update(other.statuses)
        self.duration_s = max(self.duration_s, other.duration_s)
        for kind, latencies in other.by_kind.items():
            self.by_kind.setdefault(kind, []).extend(latencies)


@dataclass
class StepResult:
    load: str
    kind: LoadKind
    value: float
    duration_s: float
    requests: int
    ok: int
    throughput_rps: float
    """Successful requests per second of the measured window."""
    latency_ms: dict[str, float]
    statuses: dict[str, int]
    server: dict[str, float]
    latency_ms_by_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    """p50/p90/p99/max and the request count, by the kind of text sent (see Samples)."""

    @property
    def p99_ms(self) -> float:
        return self.latency_ms["p99"]


def poisson_arrivals(
    rate: float | Callable[[float], float], duration_s: float, rng: random.Random
) -> list[float]:
    """Arrival offsets (seconds from 0) of a Poisson process of `rate` per second; `rate`
    may be a function of the time (piecewise: a steady load with a burst)."""
    rate_at = rate if callable(rate) else lambda _t: rate
    arrivals: list[float] = []
    t = 0.0
    while True:
        now_rate = rate_at(t)
        if now_rate <= 0:
            raise ValueError(f"rate must be > 0, got {now_rate}")
        t += rng.expovariate(now_rate)
        if t >= duration_s:
            return arrivals
        arrivals.append(t)


async def paced(
    arrivals: Iterable[float],
    fire: Callable[[int, float], Coroutine[Any, Any, T]],
    clock: Clock = time.perf_counter,
) -> list[T]:
    """Start `fire(index, scheduled_at)` at each arrival offset (seconds from now, on
    `clock`), whatever is still in flight, and return their results in order. Arrivals
    keep an absolute schedule: a late start is caught up, never shifts the rest."""
    start = clock()
    tasks = []
    for index, offset in enumerate(arrivals):
        delay = start + offset - clock()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing arrivals is the generator's job
        tasks.append(asyncio.create_task(fire(index, start + offset)))
    return list(await asyncio.gather(*tasks))


def kind_of(kinds: Sequence[str] | None, request: Request, index: int) -> str | None:
    """The kind of the text request `index` sends, when the texts have kinds and each
    request sends one text."""
    if kinds is None or request.endpoint == "/predict/batch":
        return None
    return kinds[index % len(kinds)]


async def closed_loop(
    client: Transport,
    texts: list[str],
    request: Request,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    clock: Clock = time.perf_counter,
    kinds: Sequence[str] | None = None,
) -> Samples:
    """`concurrency` clients, each sending its next request when its last one returns.
    `kinds` (one per text) splits the latencies by the kind of text sent."""
    samples = Samples()
    measure_from = clock() + warmup_s
    stop_at = measure_from + duration_s

    async def client_loop(index: int) -> None:
        while (sent_at := clock()) < stop_at:
            status = await client.post(request.endpoint, request.body(texts, index))
            sent = index
            index += concurrency
            if sent_at >= measure_from:
                samples.record(clock() - sent_at, status, kind_of(kinds, request, sent))

    await asyncio.gather(*(client_loop(k) for k in range(concurrency)))
    samples.duration_s = duration_s
    return samples


async def open_loop(
    client: Transport,
    texts: list[str],
    request: Request,
    rate: float,
    duration_s: float,
    warmup_s: float,
    seed: int = 0,
    clock: Clock = time.perf_counter,
    kinds: Sequence[str] | None = None,
) -> Samples:
    """Poisson arrivals at `rate`/s, each sent at its time whatever is still in flight."""
    samples = Samples()
    arrivals = poisson_arrivals(rate, warmup_s + duration_s, random.Random(seed))
    measure_from = clock() + warmup_s

    async def one(index: int, scheduled: float) -> None:
        status = await client.post(request.endpoint, request.body(texts, index))
        if scheduled >= measure_from:
            samples.record(clock() - scheduled, status, kind_of(kinds, request, index))

    await paced(arrivals, one, clock)
    samples.duration_s = duration_s
    return samples


async def run_load(
    client: Transport,
    texts: list[str],
    request: Request,
    load: Load,
    duration_s: float,
    warmup_s: float,
    clock: Clock = time.perf_counter,
    seed: int = 0,
    kinds: Sequence[str] | None = None,
) -> Samples:
    if load.kind == "closed":
        return await closed_loop(
            client, texts, request, int(load.value), duration_s, warmup_s, clock, kinds
        )
    return await open_loop(
        client, texts, request, load.value, duration_s, warmup_s, seed, clock, kinds
    )


def _latency_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000.0
    latency = {f"p{q}": percentile(ms, q) for q in PERCENTILES}
    if len(ms):
        latency |= {"mean": float(ms.mean()), "max": float(ms.max())}
    else:
        latency |= dict.fromkeys(("mean", "max"), math.nan)
    return latency


def summarize(load: Load, samples: Samples, server: dict[str, float]) -> StepResult:
    latency = _latency_ms(samples.latencies_s)
    by_kind = {
        kind: {**_latency_ms(latencies), "requests": float(len(latencies))}
        for kind, latencies in sorted(samples.by_kind.items())
    }
    ok = samples.statuses.get("200", 0)
    return StepResult(
        load=str(load),
        kind=load.kind,
        value=load.value,
        duration_s=samples.duration_s,
        requests=len(samples.latencies_s),
        ok=ok,
        throughput_rps=ok / samples.duration_s if samples.duration_s else 0.0,
        latency_ms=latency,
        statuses=dict(samples.statuses),
        server=server,
        latency_ms_by_kind=by_kind,
    )
