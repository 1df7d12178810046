"""What the engine records, as Prometheus metrics in a registry of its own."""

from __future__ import annotations

import contextlib
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from batcher.config import EngineConfig
from batcher.items import LANES, Lane
from batcher.policy import DISPATCH_REASONS, DispatchReason
from batcher.slo import ACTIONS, Adjustment, Judged

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,
    0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
PADDING_BUCKETS = (1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0)
FILL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
OUTCOMES = (
    "ok",
    "failed",
    "expired",
    "cancelled",
    "rejected_full",
    "rejected_deadline",
    "rejected_closed",
)

MODEL = ("model",)
"""The label every engine metric carries."""


@dataclass(slots=True)
class Totals:
    """Running totals of what the metrics record, as plain numbers for readers on the
    loop thread (the server's timeline), which need no registry walk to read them."""

    batches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DISPATCH_REASONS, 0))
    """Batches dispatched, by reason."""
    batch_sizes: Tally[int] = field(default_factory=Tally)
    """Computed batches, by their size."""
    real_tokens: int = 0
    padded_tokens: int = 0
    compute_s: float = 0.0


class _Families:
    """The engine's metric families in one registry, each labelled by model: every
    engine registered there (one per model) takes its own children."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.batch_size = Histogram(
            "microbatch_batch_size", "Items per forward pass.",
            buckets=BATCH_SIZE_BUCKETS, labelnames=MODEL, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "microbatch_queue_wait_seconds",
            "Per item: from admission until its batch reached the device, by lane "
            "(interactive, bulk).",
            buckets=SECONDS_BUCKETS, labelnames=("model", "lane"), registry=r,
        )  # fmt: skip
        self.inference = Histogram(
            "microbatch_inference_seconds",
            "Per batch: device time (collate, forward, split).",
            buckets=SECONDS_BUCKETS, labelnames=MODEL, registry=r,
        )  # fmt: skip
        self.padding_ratio = Histogram(
            "microbatch_padding_ratio",
            "Per batch: padded tokens / real tokens (1.0 = no padding).",
            buckets=PADDING_BUCKETS, labelnames=MODEL, registry=r,
        )  # fmt: skip
        self.padded_tokens = Counter(
            "microbatch_padded_tokens",
            "Tokens computed, padding included.",
            labelnames=MODEL,
            registry=r,
        )
        self.real_tokens = Counter(
            "microbatch_real_tokens", "Tokens of real input computed.", labelnames=MODEL, registry=r
        )
        self.admitted = Counter(
            "microbatch_admitted_items",
            "Items admitted to the queue.",
            labelnames=MODEL,
            registry=r,
        )
        self.coalesced = Counter(
            "microbatch_coalesced_items",
            "Inputs that joined an identical one already queued or computing, instead of "
            "being admitted and computed again.",
            labelnames=MODEL,
            registry=r,
        )
        self.items = Counter(
            "microbatch_items", "Admitted items by outcome.", ["model", "outcome"], registry=r
        )
        self.queue_depth = Gauge(
            "microbatch_queue_depth", "Items waiting to be batched.", labelnames=MODEL, registry=r
        )
        self.out_of_memory = Counter(
            "microbatch_device_out_of_memory",
            "Forward passes that ran out of device memory (the batch was split and retried).",
            labelnames=MODEL,
            registry=r,
        )
        self.memory_cap = Gauge(
            "microbatch_memory_cap_tokens",
            "Padded-token cap learned from out-of-memory errors (0 = none yet).",
            labelnames=MODEL,
            registry=r,
        )
        self.busy_seconds = Gauge(
            "microbatch_device_busy_seconds",
            "How long the forward pass now running has run (0 when idle).",
            labelnames=MODEL,
            registry=r,
        )
        self.replica_batches = Counter(
            "microbatch_replica_batches",
            "Forward passes that succeeded, by replica (device).",
            ["model", "replica"],
            registry=r,
        )
        self.replicas_alive = Gauge(
            "microbatch_replicas_alive",
            "Replicas in rotation (a replica that keeps failing inputs others compute is "
            "taken out).",
            labelnames=MODEL,
            registry=r,
        )
        self.in_flight = Gauge(
            "microbatch_batches_in_flight",
            "Batches handed to the devices and not finished (at most replicas + 1).",
            labelnames=MODEL,
            registry=r,
        )
        self.batches = Counter(
            "microbatch_batches",
            "Batches dispatched, by why they left: idle (a device was free), full "
            "(max_batch_size), tokens (max_batch_tokens), window (max_wait_ms reached), "
            "drain (shutdown).",
            ["model", "reason"],
            registry=r,
        )
        self.fill_ratio = Histogram(
            "microbatch_batch_fill_ratio",
            "Per dispatched batch: items / max_batch_size at the time.",
            buckets=FILL_BUCKETS, labelnames=MODEL, registry=r,
        )  # fmt: skip
        self.oldest_age = Gauge(
            "microbatch_oldest_item_age_seconds",
            "How long the oldest queued item has waited (0 when the queue is empty).",
            labelnames=MODEL,
            registry=r,
        )
        self.compute_seconds = Counter(
            "microbatch_device_compute_seconds",
            "Seconds the devices spent on forward passes, summed over replicas; its rate "
            "over microbatch_replicas_alive is the busy fraction.",
            labelnames=MODEL,
            registry=r,
        )
        self.max_batch_size = Gauge(
            "microbatch_max_batch_size",
            "The live max_batch_size (the SLO controller's choice when one is set).",
            labelnames=MODEL,
            registry=r,
        )
        self.max_wait = Gauge(
            "microbatch_max_wait_seconds",
            "The live max_wait_ms, in seconds (the SLO controller's choice when one is set).",
            labelnames=MODEL,
            registry=r,
        )
        self.slo_target = Gauge(
            "microbatch_slo_target_seconds",
            "The p99 latency target (0: none).",
            labelnames=MODEL,
            registry=r,
        )
        self.slo_p99 = Gauge(
            "microbatch_slo_window_p99_seconds",
            "p99 of queue plus device time over the SLO controller's last judged window.",
            labelnames=MODEL,
            registry=r,
        )
        self.slo_adjustments = Counter(
            "microbatch_slo_adjustments",
            "Changes the SLO controller made, by action: tighten (p99 over the target), "
            "loosen (well under it), back_off (the queue grew, or the target is out of "
            "reach: back towards the configured limits).",
            ["model", "action"],
            registry=r,
        )


_FAMILIES: WeakKeyDictionary[CollectorRegistry, _Families] = WeakKeyDictionary()


class EngineMetrics:
    """Histograms and counters the engine updates; prometheus_client is thread-safe.

    Every metric carries a `model` label: several engines (one per model) may record
    into one registry, each under its own `model`."""

    def __init__(self, registry: CollectorRegistry | None = None, model: str = "") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model = model
        f = _FAMILIES.get(self.registry)
        if f is None:
            f = _FAMILIES[self.registry] = _Families(self.registry)
        self.batch_size = f.batch_size.labels(model)
        self.queue_wait = {lane: f.queue_wait.labels(model, lane) for lane in LANES}
        self.inference = f.inference.labels(model)
        self.padding_ratio = f.padding_ratio.labels(model)
        self.padded_tokens = f.padded_tokens.labels(model)
        self.real_tokens = f.real_tokens.labels(model)
        self.admitted = f.admitted.labels(model)
        self.coalesced = f.coalesced.labels(model)
        self.queue_depth = f.queue_depth.labels(model)
        self.out_of_memory = f.out_of_memory.labels(model)
        self.memory_cap = f.memory_cap.labels(model)
        self.busy_seconds = f.busy_seconds.labels(model)
        self.replicas_alive = f.replicas_alive.labels(model)
        self.in_flight = f.in_flight.labels(model)
        self.fill_ratio = f.fill_ratio.labels(model)
        self.oldest_age = f.oldest_age.labels(model)
        self.compute_seconds = f.compute_seconds.labels(model)
        self.max_batch_size = f.max_batch_size.labels(model)
        self.max_wait = f.max_wait.labels(model)
        self.slo_target = f.slo_target.labels(model)
        self.slo_p99 = f.slo_p99.labels(model)
        self._items = f.items
        self._replica_batches = f.replica_batches
        self._replicas: set[int] = set()
        self._slo_adjustments = f.slo_adjustments
        self.outcome = {name: f.items.labels(model, name) for name in OUTCOMES}
        self.counts: dict[str, int] = dict.fromkeys(("admitted", "coalesced", *OUTCOMES), 0)
        """The same counts as plain numbers, for `Engine.stats()` (loop thread only)."""
        self.totals = Totals()
        self.dispatched = {reason: f.batches.labels(model, reason) for reason in DISPATCH_REASONS}
        for action in ACTIONS:
            f.slo_adjustments.labels(model, action)

    def watch(
        self,
        busy_for: Callable[[], float],
        queue_depth: Callable[[], int],
        oldest_age: Callable[[], float],
        in_flight: Callable[[], int],
        memory_cap: Callable[[], int | None],
        config: Callable[[], EngineConfig],
    ) -> None:
        """The gauges read from the engine at each scrape."""
        self.busy_seconds.set_function(busy_for)
        self.queue_depth.set_function(queue_depth)
        self.oldest_age.set_function(oldest_age)
        self.in_flight.set_function(in_flight)
        self.memory_cap.set_function(lambda: memory_cap() or 0)
        self.max_batch_size.set_function(lambda: config().max_batch_size)
        self.max_wait.set_function(lambda: config().max_wait_s)
        self.slo_target.set_function(lambda: (config().slo_p99_ms or 0) / 1e3)

    def forget(self) -> None:
        """Remove this model's series (it was unloaded): a scrape no longer shows them."""
        f = _FAMILIES[self.registry]
        model = self.model
        labelled = [
            (f.queue_wait, LANES), (f.items, OUTCOMES), (f.batches, DISPATCH_REASONS),
            (f.slo_adjustments, ACTIONS), (f.replica_batches, map(str, self._replicas)),
        ]  # fmt: skip
        for family, values in labelled:
            for value in values:
                with contextlib.suppress(KeyError):
                    family.remove(model, value)
        others = {id(family) for family, _ in labelled}
        for family in vars(f).values():
            if id(family) not in others:  # labelled by model alone
                with contextlib.suppress(KeyError):
                    family.remove(model)

    def replica_batches(self, replica: int) -> Counter:
        """Forward passes that succeeded on `replica`."""
        self._replicas.add(replica)
        return self._replica_batches.labels(self.model, str(replica))

    def record_slo(self, judged: Judged | None, adjustment: Adjustment | None) -> None:
        """The SLO controller judged a window (and maybe changed the limits)."""
        if judged is not None:
            self.slo_p99.set(judged.p99_ms / 1e3)
        if adjustment is not None:
            self._slo_adjustments.labels(self.model, adjustment.action).inc()

    def count(self, outcome: str, n: int = 1) -> None:
        """`n` items ended with `outcome` ("admitted" for admissions, "coalesced" for
        inputs that joined an identical item)."""
        if outcome == "admitted":
            self.admitted.inc(n)
        elif outcome == "coalesced":
            self.coalesced.inc(n)
        else:
            self.outcome[outcome].inc(n)
        self.counts[outcome] += n

    def record_dispatch(self, reason: DispatchReason, size: int, max_batch_size: int) -> None:
        """One batch left the queue, holding `size` items, for `reason`."""
        self.dispatched[reason].inc()
        self.totals.batches[reason] += 1
        self.fill_ratio.observe(size / max_batch_size)

    def record_batch(
        self,
        replica: int,
        inference_time_s: float,
        real_tokens: int,
        padded_tokens: int,
        queue_waits_s: Iterable[float],
        lane: Lane = "interactive",
    ) -> None:
        """One computed batch: its size, device time, tokens and each item's wait."""
        waits = list(queue_waits_s)
        self.batch_size.observe(len(waits))
        self.replica_batches(replica).inc()
        self.inference.observe(inference_time_s)
        self.compute_seconds.inc(inference_time_s)
        totals = self.totals
        totals.batch_sizes[len(waits)] += 1
        totals.real_tokens += real_tokens
        totals.padded_tokens += padded_tokens
        totals.compute_s += inference_time_s
        self.real_tokens.inc(real_tokens)
        self.padded_tokens.inc(padded_tokens)
        self.padding_ratio.observe(padded_tokens / real_tokens if real_tokens else 1.0)
        for wait in waits:
            self.queue_wait[lane].observe(wait)
