"""Closed-loop load against a running server: N clients, each sends its next request when
its last one returns. Reports throughput, latency percentiles, errors by status, and what
the server did meanwhile (mean batch size and padding, from /metrics before and after).

    python -m benchmarks.loadgen http://127.0.0.1:8000 --concurrency 1,64 --duration 20

No retries: a failure is a data point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

WORDS = (
    "the of and to in is was for on are with as by at from that this be it an or have not "
    "batch queue model server latency throughput device token request response embedding "
    "window policy adaptive padding length sentence vector search index cluster compute"
).split()


def corpus(n: int = 2000, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    """A deterministic corpus of sentences of `min_words` to `max_words` words."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(min_words, max_words))) for _ in range(n)]


@dataclass
class StepResult:
    concurrency: int
    duration_s: float
    requests: int
    throughput_rps: float
    latency_ms: dict[str, float]
    status_counts: dict[str, int]
    server: dict[str, float] = field(default_factory=dict)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def server_delta(before: str, after: str) -> dict[str, float]:
    def d(name: str) -> float:
        return _metric(after, name) - _metric(before, name)

    batches = d("microbatch_batch_size_count")
    return {
        "batches": batches,
        "mean_batch_size": d("microbatch_batch_size_sum") / batches if batches else 0.0,
        "padding_ratio": d("microbatch_padded_tokens_total") / d("microbatch_real_tokens_total")
        if d("microbatch_real_tokens_total")
        else 0.0,
        "mean_queue_wait_ms": 1000
        * d("microbatch_queue_wait_seconds_sum")
        / d("microbatch_queue_wait_seconds_count")
        if d("microbatch_queue_wait_seconds_count")
        else 0.0,
    }


async def closed_loop(
    url: str, texts: list[str], concurrency: int, duration_s: float, warmup_s: float
) -> StepResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with (
        httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client,
        httpx.AsyncClient(base_url=url, timeout=60) as observer,  # never queues behind load
    ):
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        start = time.perf_counter()
        measure_from = start + warmup_s
        stop_at = measure_from + duration_s
        before = ""

        async def worker(index: int) -> None:
            i = index
            while (now := time.perf_counter()) < stop_at:
                text = texts[i % len(texts)]
                i += concurrency
                try:
                    r = await client.post("/predict", json={"text": text})
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if now >= measure_from:
                    latencies.append(time.perf_counter() - now)
                    statuses[status] += 1

        async def snapshot_after_warmup() -> None:
            nonlocal before
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            before = (await observer.get("/metrics")).text

        await asyncio.gather(snapshot_after_warmup(), *(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - measure_from
        after = (await observer.get("/metrics")).text
    ms = np.array(latencies) * 1000
    percentiles = {
        f"p{q}": float(np.percentile(ms, q)) if len(ms) else float("nan") for q in (50, 90, 99)
    }
    percentiles["max"] = float(ms.max()) if len(ms) else float("nan")
    return StepResult(
        concurrency=concurrency,
        duration_s=elapsed,
        requests=len(latencies),
        throughput_rps=statuses["200"] / elapsed,
        latency_ms=percentiles,
        status_counts=dict(statuses),
        server=server_delta(before, after),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per step")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per step")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    texts = corpus()
    results = []
    print(f"{'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'batch':>6} {'pad':>5}  statuses")  # fmt: skip
    for n in (int(c) for c in args.concurrency.split(",")):
        step = asyncio.run(closed_loop(args.url, texts, n, args.duration, args.warmup))
        results.append(step)
        lat, srv = step.latency_ms, step.server
        print(
            f"{n:>7} {step.throughput_rps:>8.1f} {lat['p50']:>8.1f} {lat['p90']:>8.1f} "
            f"{lat['p99']:>8.1f} {srv['mean_batch_size']:>6.1f} {srv['padding_ratio']:>5.2f}  "
            f"{step.status_counts}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
