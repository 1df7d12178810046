"""What the server did, from its /metrics: one reader, on prometheus_client's parser of
the text format, for every tool (bench, sweep, compare, soak)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.transport import Transport


@dataclass(frozen=True)
class Scrape:
    """One reading of /metrics: every sample, by name and labels."""

    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        return cls(samples)

    def __bool__(self) -> bool:
        return bool(self.samples)

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`; NaN when
        there is none."""
        wanted = set(labels.items())
        found = [v for (n, ls), v in self.samples.items() if n == name and wanted <= ls]
        return math.fsum(found) if found else math.nan

    def since(self, before: Scrape, name: str, **labels: str) -> float:
        """How much a counter grew since `before` (a series absent then counts from 0)."""
        earlier = before.value(name, **labels)
        return self.value(name, **labels) - (0.0 if math.isnan(earlier) else earlier)


async def scrape(client: Transport) -> Scrape:
    """The server's /metrics, or an empty Scrape when it has none (the naive server)."""
    status, text = await client.get("/metrics")
    return Scrape.parse(text) if status == 200 else Scrape()


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def server_delta(before: Scrape, after: Scrape) -> dict[str, float]:
    """Mean batch size, padding ratio and mean queue wait between two scrapes."""
    if not before or not after:
        return {}

    def d(name: str) -> float:
        return after.since(before, name)

    return {
        "batches": d("microbatch_batch_size_count"),
        "mean_batch_size": _ratio(d("microbatch_batch_size_sum"), d("microbatch_batch_size_count")),
        "padding_ratio": _ratio(
            d("microbatch_padded_tokens_total"), d("microbatch_real_tokens_total")
        ),
        "mean_queue_wait_ms": 1000
        * _ratio(d("microbatch_queue_wait_seconds_sum"), d("microbatch_queue_wait_seconds_count")),
    }


def mean_request_ms(before: Scrape, after: Scrape, status: str) -> float:
    """Mean time in the server (middleware in to reply out) of the requests answered with
    `status` between two scrapes: the part of the client's latency that is the server's."""
    total = after.since(before, "microbatch_request_duration_seconds_sum", status=status)
    count = after.since(before, "microbatch_request_duration_seconds_count", status=status)
    return 1000 * _ratio(total, count)
