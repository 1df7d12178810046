"""What the result cache and the coalescing of identical inputs buy, on the default model:

1. the hit path: one client sending the same text, answered from the cache, against the
   same text computed every time (`Cache-Control: no-cache`), alternating round by round;
2. a load with repeats: 64 clients drawing from a small pool of texts, every request
   asking for a fresh answer (so the cache answers none): on a server that coalesces
   identical inputs in flight (the default) and on one started with `--no-coalesce`,
   with the count of coalesced inputs from `/metrics`.

Servers pinned to CPU 0 (one torch thread), the load on CPU 1.

    python -m benchmarks.lab.cache --report benchmarks/results/cache-cpu-2core-DATE.md
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import httpx

from benchmarks import environment
from benchmarks.compare import CLIENT_CPU, SERVER_CPU
from benchmarks.corpus import builtin
from benchmarks.processes import pin, server
from benchmarks.scrape import Scrape

FRESH = {"cache-control": "no-cache"}


async def one_client(url: str, text: str, n: int, headers: dict[str, str]) -> list[float]:
    """`n` requests of `text` back to back; each one's latency in ms."""
    latencies = []
    async with aiohttp.ClientSession(url, headers=headers) as session:
        for _ in range(n):
            started = time.perf_counter()
            async with session.post("/predict", json={"text": text}) as r:
                await r.read()
                assert r.status == 200, r.status
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def repeats(url: str, pool: list[str], clients: int, duration_s: float) -> float:
    """`clients` closed-loop clients, each text drawn at random from `pool`, every request
    computed afresh; requests per second."""
    done = 0
    stop = time.perf_counter() + duration_s
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, connector=connector, headers=FRESH) as session:

        async def client(seed: int) -> None:
            nonlocal done
            rng = random.Random(seed)
            while time.perf_counter() < stop:
                async with session.post("/predict", json={"text": rng.choice(pool)}) as r:
                    await r.read()
                    assert r.status == 200, r.status
                done += 1

        await asyncio.gather(*(client(k) for k in range(clients)))
    return done / duration_s


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300, help="per round, hit path")
    parser.add_argument("--pool", type=int, default=32, help="distinct texts, load with repeats")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args(argv)
    pin(CLIENT_CPU)
    logs = Path(tempfile.mkdtemp(prefix="microbatch-cache-"))
    texts = builtin().texts
    text = texts[0]
    pool = texts[: args.pool]
    lines: list[str] = []
    with ExitStack() as stack:
        url = stack.enter_context(server(["server.cli", "serve"], logs / "a.log", cpu=SERVER_CPU))
        plain = stack.enter_context(
            server(["server.cli", "serve", "--no-coalesce"], logs / "b.log", cpu=SERVER_CPU)
        )
        asyncio.run(one_client(url, text, 20, FRESH))  # warm the path
        hit_p50, miss_p50, hit_p99, miss_p99 = [], [], [], []
        for _ in range(args.rounds):
            miss = asyncio.run(one_client(url, text, args.requests, FRESH))
            hit = asyncio.run(one_client(url, text, args.requests, {}))
            hit_p50.append(statistics.median(hit))
            miss_p50.append(statistics.median(miss))
            hit_p99.append(percentile(hit, 99))
            miss_p99.append(percentile(miss, 99))
        lines += [
            "## The hit path (one client, the same text)",
            "",
            f"{args.rounds} rounds of {args.requests} requests, alternating; medians of the "
            "rounds.",
            "",
            "| path | p50 ms | p99 ms |",
            "|---|---|---|",
            f"| computed (`Cache-Control: no-cache`) | {statistics.median(miss_p50):.2f} | "
            f"{statistics.median(miss_p99):.2f} |",
            f"| from the cache (`X-Cache: hit`) | {statistics.median(hit_p50):.2f} | "
            f"{statistics.median(hit_p99):.2f} |",
            "",
        ]
        rates: dict[str, list[float]] = {"coalescing": [], "--no-coalesce": []}
        coalesced = []
        for _ in range(args.rounds):
            for name, target in (("coalescing", url), ("--no-coalesce", plain)):
                before = Scrape.parse(httpx.get(f"{target}/metrics").text)
                rates[name].append(asyncio.run(repeats(target, pool, args.clients, args.duration)))
                after = Scrape.parse(httpx.get(f"{target}/metrics").text)
                if name == "coalescing":
                    joined = after.since(before, "microbatch_coalesced_items_total")
                    admitted = after.since(before, "microbatch_admitted_items_total")
                    coalesced.append(joined / (joined + admitted))
        lines += [
            f"## A load with repeats ({args.clients} clients, {args.pool} distinct texts)",
            "",
            f"Every request asks for a fresh answer, so only coalescing can spare work. "
            f"{args.rounds} rounds of {args.duration:g} s, the servers alternating.",
            "",
            "| server | req/s (median) | rounds | inputs coalesced |",
            "|---|---|---|---|",
            f"| default (coalescing) | {statistics.median(rates['coalescing']):.1f} | "
            f"{', '.join(f'{r:.1f}' for r in rates['coalescing'])} | "
            f"{statistics.median(coalesced):.0%} |",
            f"| `--no-coalesce` | {statistics.median(rates['--no-coalesce']):.1f} | "
            f"{', '.join(f'{r:.1f}' for r in rates['--no-coalesce'])} | - |",
            "",
        ]
    env = environment.describe()
    cpu = f"{env.get('cpu')} ({env.get('cpu_count')} CPUs)"
    report = "\n".join(
        [
            f"# The result cache and coalescing: {cpu}",
            "",
            f"Default model, default settings; servers pinned to CPU {SERVER_CPU} (one torch "
            f"thread), the load on CPU {CLIENT_CPU}. Commit {env['git_commit']}.",
            "",
            *lines,
            "## Reproduce",
            "",
            "```bash",
            " ".join(["python -m benchmarks.lab.cache", *environment.command_line()[1:]]),
            "```",
            "",
        ]
    )
    print(report)
    if args.report:
        args.report.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
