"""What rolling out a version costs the traffic: the prediction log's throughput cost, a
shadow's cost to the primary's tail, the log's write rate, and the memory an unload
gives back.

Every server runs the built-in all-MiniLM-L6-v2, pinned to CPU 0 with one torch thread;
this load generator runs on CPU 1. Every request says `Cache-Control: no-cache` and its
text is new, so that each is computed.

- `--scenario log`: 64 closed-loop clients on `/predict` for `--duration` s, against a
  server without the log, with the log in SQLite and (where PostgreSQL is installed)
  in a PostgreSQL started here; the setups run in turn, forward then backward (off,
  sqlite, postgresql, postgresql, sqlite, off, ...), `--repeats` times in all, so that a
  drift of the machine's speed over the run weighs on each alike. Reported: requests/s,
  p50/p99, and the rows/s the log wrote meanwhile; then the log's own write rate at
  saturation: rows handed to the writer as fast as it takes them, without a server.
- `--scenario shadow`: one server on two versions of the model (`emb@v1` and `emb@v2`,
  the same files); a Poisson stream of `--rate` requests/s to `emb`, first with no
  shadow, then with every request mirrored to v2, then without again (one PATCH each).
  Reported: the primary's p50/p99 per phase and the mirrored requests compared and
  shed; then v2 is unloaded and the memory it freed is reported.

    python -m benchmarks.lab.versions --scenario log --out benchmarks/results/NAME
    python -m benchmarks.lab.versions --scenario shadow --out benchmarks/results/NAME
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchmarks.corpus import builtin
from benchmarks.environment import command_line, describe, portable_values
from benchmarks.processes import pin, server
from benchmarks.scrape import Scrape

NO_CACHE = {"cache-control": "no-cache"}
SERVE = ["server.cli", "serve", "--torch-threads", "1"]


def counted(value: float) -> float:
    """A counter's growth; a series never created (nothing counted) reads NaN: 0."""
    return 0.0 if math.isnan(value) else value


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class Run:
    setup: str
    repeat: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    failed: int
    log_rows_per_s: float | None
    server_cpu_us_per_request: float
    """The server process's CPU time per answered request (process_cpu_seconds_total):
    what the log costs, less exposed than throughput to a noisy machine."""


async def closed_loop(
    url: str, clients: int, duration: float, seed: int
) -> tuple[list[float], int, float]:
    """`clients` closed-loop clients on /predict, each text new; (latencies, failed, s)."""
    texts = builtin(20_000, seed, 8, 24).texts
    latencies: list[float] = []
    failed = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        end = time.perf_counter() + duration
        counter = iter(range(10**9))

        async def one_client() -> None:
            nonlocal failed
            while time.perf_counter() < end:
                i = next(counter)
                started = time.perf_counter()
                text = f"{texts[i % len(texts)]} #{i}"
                reply = await client.post("/predict", json={"text": text}, headers=NO_CACHE)
                if reply.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failed += 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        return latencies, failed, time.perf_counter() - started


def measure(url: str, setup: str, repeat: int, args: argparse.Namespace) -> Run:
    asyncio.run(closed_loop(url, args.clients, args.warmup, seed=100 + repeat))
    before = Scrape.parse(httpx.get(f"{url}/metrics").text)
    latencies, failed, elapsed = asyncio.run(
        closed_loop(url, args.clients, args.duration, seed=repeat)
    )
    after = Scrape.parse(httpx.get(f"{url}/metrics").text)
    rows = after.since(before, "microbatch_log_rows_written_total")
    cpu_s = after.since(before, "process_cpu_seconds_total")
    return Run(setup, repeat, len(latencies) / elapsed, quantile(latencies, 0.5) * 1e3,
               quantile(latencies, 0.99) * 1e3, failed,
               rows / elapsed if setup != "off" else None,
               cpu_s / max(1, len(latencies)) * 1e6)  # fmt: skip


def write_rate(sink_url: str, rows: int = 200_000) -> float:
    """Rows/s the prediction log's writer sustains into `sink_url`: calls of 8 inputs,
    each a 384-wide embedding, handed over as fast as the buffer takes them."""
    from prometheus_client import CollectorRegistry

    from batcher import Result
    from server.calls import Call
    from server.log_sinks import sink_for
    from server.prediction_log import PredictionLog

    class Version:  # what a call and the log read of the answering version
        name, version, encoder = "emb", "1", type("E", (), {"labels": ()})()

        def enter(self) -> None: ...

        def leave(self) -> None: ...

    async def run() -> float:
        log = PredictionLog(sink_for(sink_url), CollectorRegistry(), capacity=50_000)
        await log.start()
        from batcher.models import Encoded, Output

        items = [Encoded(list(range(20)), False)] * 8
        results: list[Result[Output]] = [Result([0.05] * 384, 0.001, 0.002, 8, batch=1)] * 8
        texts = [f"text {i}" for i in range(8)]
        started = time.perf_counter()
        sent = 0
        while sent < rows:
            if log.buffered_rows + 8 > log.capacity:  # full: let the writer drain it
                await asyncio.sleep(0.001)
                continue
            call = Call(Version(), f"r{sent}", "/predict")  # type: ignore[arg-type]
            call.record(texts, None, None, "right", items)  # type: ignore[arg-type]
            log.record(call, results, 5.0)
            sent += 8
        await log.aclose()
        return rows / (time.perf_counter() - started)

    return asyncio.run(run())


def log_scenario(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    setups: dict[str, list[str]] = {"off": [], "sqlite": ["--log-url", f"sqlite:///{tmp}/log.db"]}
    postgres = None
    from benchmarks.lab.postgres import PostgresServer, available

    if available():
        postgres = PostgresServer().start()
        setups["postgresql"] = ["--log-url", postgres.url]
    runs: list[Run] = []
    rates: dict[str, float] = {}
    try:
        for repeat in range(args.repeats):
            # Forward, then backward (off, sqlite, pg, pg, sqlite, off, ...): a drift of the
            # machine's speed over the run weighs on every setup alike.
            order = list(setups.items()) if repeat % 2 == 0 else list(setups.items())[::-1]
            for setup, flags in order:
                log = args.out / f"server-{setup}.log"
                with server([*SERVE, *flags], log, cpu=0) as url:
                    runs.append(measure(url, setup, repeat, args))
                print(asdict(runs[-1]), flush=True)
        rates["sqlite"] = write_rate(f"sqlite:///{tmp}/rate.db")
        if postgres is not None:
            rates["postgresql"] = write_rate(postgres.url)
    finally:
        if postgres is not None:
            postgres.stop()
    lines = ["| setup | run | requests/s | p50 ms | p99 ms | failed | log rows/s "
             "| server CPU µs/request |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        rows = "" if r.log_rows_per_s is None else f"{r.log_rows_per_s:.0f}"
        lines.append(f"| {r.setup} | {r.repeat + 1} | {r.requests_per_s:.1f} | {r.p50_ms:.1f} | "
                     f"{r.p99_ms:.1f} | {r.failed} | {rows} "
                     f"| {r.server_cpu_us_per_request:.0f} |")  # fmt: skip

    def mean(setup: str, field: str) -> float:
        values = [float(getattr(r, field)) for r in runs if r.setup == setup]
        return sum(values) / len(values)

    for setup in setups:
        if setup == "off":
            continue
        ratio = mean(setup, "requests_per_s") / mean("off", "requests_per_s")
        cpu = mean(setup, "server_cpu_us_per_request") / mean("off", "server_cpu_us_per_request")
        lines.append(f"\n{setup}: throughput with the log / without = {ratio:.3f}x; server CPU "
                     f"per request with / without = {cpu:.3f}x (means of {args.repeats} runs "
                     f"each)")  # fmt: skip
    spread = [r.requests_per_s for r in runs if r.setup == "off"]
    lines.append(f"\nthe runs without the log alone ranged {min(spread):.1f} to "
                 f"{max(spread):.1f} requests/s: the machine's own noise")  # fmt: skip
    for sink, rate in rates.items():
        lines.append(f"\nthe log's write rate at saturation, {sink}: {rate:,.0f} rows/s")
    return {"runs": [asdict(r) for r in runs], "write_rates": rates, "summary": lines}


@dataclass
class Phase:
    phase: str
    requests: int
    p50_ms: float
    p99_ms: float
    failed: int
    shadow_compared: float
    shadow_shed: float


async def stream(url: str, rate: float, duration: float, seed: int) -> tuple[list[float], int]:
    rng = random.Random(seed)
    texts = builtin(20_000, seed, 8, 24).texts
    latencies: list[float] = []
    failed = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one(i: int) -> None:
            nonlocal failed
            started = time.perf_counter()
            body = {"text": f"{texts[i % len(texts)]} #{seed}-{i}", "model": "emb"}
            reply = await client.post("/predict", json=body, headers=NO_CACHE)
            if reply.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                failed += 1

        tasks = []
        end = time.perf_counter() + duration
        i = 0
        while time.perf_counter() < end:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))  # the stream's own clock
        await asyncio.gather(*tasks)
    return latencies, failed


def shadow_scenario(args: argparse.Namespace) -> dict[str, object]:
    from batcher.models import default_source

    source = default_source()
    models = ["--model", f"emb@v1={source}", "--model", f"emb@v2={source}"]
    phases: list[Phase] = []
    with server([*SERVE, *models], args.out / "server-shadow.log", cpu=0) as url:
        asyncio.run(stream(url, args.rate, args.warmup, seed=99))
        for phase, share in (("no shadow", 0.0), ("shadow 100 %", 1.0), ("no shadow, again", 0.0)):
            route = {"emb": {"v1": 1, "shadow": {"v2": share} if share else {}}}
            httpx.patch(f"{url}/admin/routes", json=route).raise_for_status()
            before = Scrape.parse(httpx.get(f"{url}/metrics").text)
            latencies, failed = asyncio.run(stream(url, args.rate, args.duration, seed=len(phases)))
            name = "microbatch_shadow_requests_total"
            deadline = time.monotonic() + 60
            while True:  # every mirrored request compared, shed or failed: read the counters
                after = Scrape.parse(httpx.get(f"{url}/metrics").text)
                settled = after.since(before, name)
                if settled >= share * len(latencies) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)  # the server's state, in the background
            phases.append(Phase(
                phase, len(latencies), quantile(latencies, 0.5) * 1e3,
                quantile(latencies, 0.99) * 1e3, failed,
                counted(after.since(before, name, outcome="compared")),
                counted(after.since(before, name, outcome="shed")),
            ))  # fmt: skip
            print(asdict(phases[-1]), flush=True)
        rss = "process_resident_memory_bytes"
        resident_before = Scrape.parse(httpx.get(f"{url}/metrics").text).value(rss)
        unloaded = httpx.delete(f"{url}/admin/models/emb@v2", timeout=120).json()
        resident_after = Scrape.parse(httpx.get(f"{url}/metrics").text).value(rss)
    lines = ["| phase | requests | p50 ms | p99 ms | failed | mirrored, compared | shed |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in phases:
        lines.append(f"| {p.phase} | {p.requests} | {p.p50_ms:.1f} | {p.p99_ms:.1f} | "
                     f"{p.failed} | {p.shadow_compared:.0f} | {p.shadow_shed:.0f} |")  # fmt: skip
    off = [p.p99_ms for p in phases if p.phase.startswith("no shadow")]
    on = next(p.p99_ms for p in phases if p.phase == "shadow 100 %")
    lines.append(f"\nprimary p99 with shadow 100 % / without = {on / max(off):.2f}x "
                 f"(against the worse of the two phases without; "
                 f"{on / min(off):.2f}x against the better)")  # fmt: skip
    lines.append(f"\nunloading emb@v2 freed {unloaded['freed_bytes'] / 2**20:.1f} MiB "
                 f"({unloaded['measure']}); the process's resident set went from "
                 f"{resident_before / 2**20:.1f} to {resident_after / 2**20:.1f} MiB")  # fmt: skip
    return {"phases": [asdict(p) for p in phases], "unloaded": unloaded,
            "resident_before": resident_before, "resident_after": resident_after,
            "summary": lines}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenario", choices=("log", "shadow"), required=True)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rate", type=float, default=40.0, help="shadow: requests/s")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pin(1)
    with tempfile.TemporaryDirectory() as tmp:
        found = log_scenario(args, Path(tmp)) if args.scenario == "log" else shadow_scenario(args)
    settings = portable_values(vars(args) | {"out": str(args.out)})
    report = {"settings": settings, "command": command_line(), "environment": describe(), **found}
    (args.out / f"{args.scenario}.json").write_text(json.dumps(report, indent=2))
    summary = "\n".join(found["summary"]) + "\n"  # type: ignore[arg-type]
    (args.out / f"{args.scenario}.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
