"""The one /metrics reader reads what prometheus_client itself writes: labelled series,
histograms, counters that appear between two readings."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from benchmarks.scrape import Scrape, mean_request_ms, server_delta


def exposition(registry: CollectorRegistry) -> Scrape:
    return Scrape.parse(generate_latest(registry).decode())


def test_labelled_series_sum_over_the_labels_not_asked_for() -> None:
    registry = CollectorRegistry()
    items = Counter("microbatch_items", "items", ["outcome"], registry=registry)
    duration = Histogram(
        "microbatch_request_duration_seconds", "d", ["route", "status"], registry=registry
    )
    before = exposition(registry)
    items.labels("ok").inc(5)
    items.labels("failed").inc(2)
    duration.labels("/predict", "429").observe(0.002)
    duration.labels("/rerank", "429").observe(0.004)
    duration.labels("/predict", "200").observe(1.0)
    after = exposition(registry)

    assert after.value("microbatch_items_total", outcome="ok") == 5
    assert after.value("microbatch_items_total") == 7
    assert after.since(before, "microbatch_items_total", outcome="failed") == 2
    assert math.isnan(after.value("microbatch_items_total", outcome="missing"))
    assert mean_request_ms(before, after, "429") == 3.0


def test_server_delta_reads_batches_padding_and_wait_between_two_readings() -> None:
    registry = CollectorRegistry()
    size = Histogram("microbatch_batch_size", "s", registry=registry, buckets=(1, 8, 32))
    padded = Counter("microbatch_padded_tokens", "p", registry=registry)
    real = Counter("microbatch_real_tokens", "r", registry=registry)
    wait = Histogram("microbatch_queue_wait_seconds", "w", registry=registry)
    size.observe(100)  # before the window: must not count
    before = exposition(registry)
    for n in (4, 8):
        size.observe(n)
        wait.observe(0.010 * n)
    padded.inc(150)
    real.inc(100)
    delta = server_delta(before, exposition(registry))

    assert delta["batches"] == 2
    assert delta["mean_batch_size"] == 6
    assert delta["padding_ratio"] == 1.5
    assert math.isclose(delta["mean_queue_wait_ms"], 60.0)
    assert server_delta(Scrape(), exposition(registry)) == {}, "the naive server has none"
