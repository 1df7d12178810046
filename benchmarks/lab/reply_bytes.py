"""How big is an answer, and what does its format cost? Reply bytes and requests/s for
the embedding types a client can ask for.

One server (the built-in all-MiniLM-L6-v2, 384 dimensions, pinned to CPU 0 with one
torch thread; this load generator on CPU 1), `POST /predict` with one short text a
request (`Cache-Control: no-cache`: every text computed), in each format:

- `float`: JSON numbers (the default);
- `base64`: the float32 bytes, base64 (`encoding_format: base64`, OpenAI's default);
- `int8`: JSON integers, by the model's fixed calibration ranges (`embedding_type`);
- `ubinary`: the signs, 8 a byte, as JSON integers;
- `ubinary base64`: those 48 bytes, base64.

Closed loops of 1 and 64 clients, `--duration` seconds each after `--warmup`: requests/s,
p50 and p99 latency, the reply's bytes (whole body, and the embedding field alone) and the
server's CPU per request (`process_cpu_seconds_total` over the requests answered).

    python -m benchmarks.lab.reply_bytes --out benchmarks/results/NAME [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.corpus import builtin
from benchmarks.environment import command_line, describe, portable_values
from benchmarks.processes import pin, server
from benchmarks.scrape import Scrape

SERVE = ["server.cli", "serve", "--torch-threads", "1"]
FORMATS: dict[str, dict[str, str]] = {
    "float": {},
    "base64": {"encoding_format": "base64"},
    "int8": {"embedding_type": "int8"},
    "ubinary": {"embedding_type": "ubinary"},
    "ubinary base64": {"embedding_type": "ubinary", "encoding_format": "base64"},
}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def cpu_seconds(client: aiohttp.ClientSession, url: str) -> float:
    async with client.get(f"{url}/metrics") as reply:
        return Scrape.parse(await reply.text()).value("process_cpu_seconds_total")


async def run(
    client: aiohttp.ClientSession, url: str, body: dict[str, str], clients: int, seconds: float
) -> dict[str, Any]:
    texts = builtin(4000, clients, 8, 15).texts
    latencies: list[float] = []
    sizes: list[int] = []
    field_sizes: list[int] = []
    failed = 0
    stop = time.perf_counter() + seconds

    async def one(k: int) -> None:
        nonlocal failed
        i = k
        while time.perf_counter() < stop:
            started = time.perf_counter()
            payload = {"text": texts[i % len(texts)], **body}
            async with client.post(f"{url}/predict", json=payload,
                                   headers={"cache-control": "no-cache"}) as reply:  # fmt: skip
                data = await reply.read()
            if reply.status != 200:
                failed += 1
                continue
            latencies.append(time.perf_counter() - started)
            sizes.append(len(data))
            field_sizes.append(len(json.dumps(json.loads(data)["embedding"],
                                              separators=(",", ":"))))  # fmt: skip
            i += clients

    cpu_before, started = await cpu_seconds(client, url), time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    cpu = await cpu_seconds(client, url) - cpu_before
    n = len(latencies)
    return {
        **closed_loop(clients, latencies, failed, elapsed, cpu),
        "reply_bytes": sum(sizes) / max(1, n),
        "embedding_bytes": sum(field_sizes) / max(1, n),
    }


def closed_loop(
    clients: int, latencies: list[float], failed: int, elapsed: float, cpu: float
) -> dict[str, Any]:
    """What a closed loop of `clients` measured: requests/s, p50 and p99, and the
    server's CPU (`cpu` seconds) per request answered."""
    n = len(latencies)
    return {
        "clients": clients,
        "requests": n,
        "failed": failed,
        "requests_per_s": n / elapsed,
        "p50_ms": quantile(latencies, 0.5) * 1e3,
        "p99_ms": quantile(latencies, 0.99) * 1e3,
        "server_cpu_us_per_request": cpu / max(1, n) * 1e6,
    }


async def measure(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:
        for clients in (1, 64):
            for name, body in FORMATS.items():
                await run(client, url, body, clients, args.warmup)
                row = {"format": name, **await run(client, url, body, clients, args.duration)}
                print(row, flush=True)
                results.append(row)
    return results


def format_costs(repeat: int = 2000) -> dict[str, float]:
    """Microseconds to turn one 384-float vector into its reply field, in this process, as
    the server's code does it (`server.routes.embedding_types`, `parsing.vector`, orjson):
    what each format adds to a request, apart from the model."""
    import random
    import timeit

    import numpy as np
    import orjson

    from batcher.models import Calibration, Encoded
    from server.routes.embedding_types import as_base64, as_type
    from server.routes.parsing import vector

    rng = random.Random(0)
    row = [rng.gauss(0, 0.05) for _ in range(384)]
    raw = np.array([[rng.gauss(0, 0.05) for _ in range(384)] for _ in range(32)], "<f4")

    class Model:  # what as_type reads of an encoder
        calibration = Calibration(raw.tobytes(), 384, "timing")

    item = [Encoded([1], False)]
    ways = {
        "float": lambda: orjson.dumps(vector(row, "float")),
        "base64": lambda: orjson.dumps(vector(row, "base64")),
        "int8": lambda: orjson.dumps(as_type(Model, item, [row], "int8").tolist()[0]),  # type: ignore[arg-type]
        "ubinary": lambda: orjson.dumps(as_type(Model, item, [row], "ubinary").tolist()[0]),  # type: ignore[arg-type]
        "ubinary base64": lambda: orjson.dumps(as_base64(as_type(Model, item, [row], "ubinary"))),  # type: ignore[arg-type]
    }
    return {name: min(timeit.repeat(way, number=repeat, repeat=5)) / repeat * 1e6
            for name, way in ways.items()}  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| format | clients | reply bytes | embedding bytes | requests/s | p50 ms | p99 ms "
        "| server CPU µs/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['format']} | {r['clients']} | {r['reply_bytes']:.0f} | "
            f"{r['embedding_bytes']:.0f} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['server_cpu_us_per_request']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--costs-only", action="store_true", help="only the in-process costs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pin(1)
    costs = format_costs()
    print({k: round(v, 1) for k, v in costs.items()}, flush=True)
    if args.costs_only:
        return
    with server(SERVE, args.out / "server.log", cpu=0) as url:
        results = asyncio.run(measure(url, args))
    record = {
        "command": command_line(),
        "environment": describe(),
        "settings": portable_values({k: v for k, v in vars(args).items() if k != "out"}),
        "format_costs_us": costs,
        "results": results,
    }
    (args.out / "reply_bytes.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
