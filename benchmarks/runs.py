"""A benchmark run: load steps against one server (in one process or several), what the
server did during each (from /metrics), and the run's record, table and CSV. What
`microbatch bench`, `compare`, `sweep` and `overhead` share; the loops themselves are in
`benchmarks.loadgen`, the /metrics reader in `benchmarks.scrape`."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from benchmarks import corpus as corpora
from benchmarks import environment
from benchmarks.loadgen import (
    ENDPOINTS,
    Clock,
    Load,
    Request,
    Samples,
    StepResult,
    run_load,
    summarize,
)
from benchmarks.scrape import Scrape, scrape, server_delta
from benchmarks.transport import TransportFactory, aiohttp_transports

START_DELAY_S = 2.0
"""With several processes: time for them to start before the common start."""


@dataclass
class Step:
    """One load step: what to send, how much, for how long."""

    texts: list[str]
    request: Request
    load: Load
    duration_s: float
    warmup_s: float
    seed: int = 0
    kinds: list[str] | None = None
    """The kind of each text (`benchmarks.corpus.Corpus.kinds`), to split latencies by."""


def _split(load: Load, parts: int) -> list[Load]:
    if load.kind == "open":
        return [Load("open", load.value / parts)] * parts
    base, extra = divmod(int(load.value), parts)
    return [Load("closed", base + (1 if i < extra else 0)) for i in range(parts)]


def _child(url: str, step: Step, load: Load, start_at: float, seed: int) -> Samples:
    """One load-generator process: wait for the common start, then run its share."""

    async def go() -> Samples:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        async with aiohttp_transports(url)(_connections(load)) as client:
            return await run_load(
                client, step.texts, step.request, load, step.duration_s, step.warmup_s,
                seed=seed, kinds=step.kinds,
            )  # fmt: skip

    return asyncio.run(go())


def _connections(load: Load) -> int:
    return int(load.value) if load.kind == "closed" else 4096


async def measure(
    step: Step,
    clients: TransportFactory,
    *,
    url: str | None = None,
    processes: int = 1,
    clock: Clock = time.perf_counter,
    progress: bool = False,
    desc: str | None = None,
) -> StepResult:
    """Run one step and scrape /metrics at the start and end of its measured window.

    With `processes` > 1 (needs `url`), the load is split over that many processes.
    `progress` shows a bar of the step's seconds on a terminal, titled `desc` (default:
    the load)."""
    async with clients(4) as observer:
        before = Scrape()

        async def scrape_after_warmup() -> None:
            nonlocal before
            await asyncio.sleep(step.warmup_s + (START_DELAY_S if processes > 1 else 0.0))
            before = await scrape(observer)

        total_s = step.warmup_s + step.duration_s
        async with seconds_bar(total_s, desc or str(step.load), progress):
            snapshot = asyncio.create_task(scrape_after_warmup())
            if processes > 1:
                samples = await _run_processes(step, url, processes)
            else:
                async with clients(_connections(step.load)) as client:
                    samples = await run_load(
                        client, step.texts, step.request, step.load,
                        step.duration_s, step.warmup_s, clock, step.seed, step.kinds,
                    )  # fmt: skip
            await snapshot
        after = await scrape(observer)
    return summarize(step.load, samples, server_delta(before, after))


@asynccontextmanager
async def seconds_bar(total_s: float, desc: str, enabled: bool) -> AsyncIterator[tqdm[Any]]:
    """A progress bar that fills one step a second over `total_s`, on a terminal only (no
    bars in redirected logs); the caller may set its postfix."""
    bar = tqdm(
        total=round(total_s),
        desc=desc,
        unit="s",
        leave=False,
        disable=not (enabled and sys.stderr.isatty()),
        file=sys.stderr,
    )
    ticker = asyncio.create_task(_tick(bar))
    try:
        yield bar
    finally:
        ticker.cancel()
        bar.close()


async def _tick(bar: tqdm[Any]) -> None:
    while True:
        await asyncio.sleep(1)
        bar.update(1)


async def _run_processes(step: Step, url: str | None, processes: int) -> Samples:
    if url is None:
        raise ValueError("--processes needs a URL")
    loop = asyncio.get_running_loop()
    start_at = time.time() + START_DELAY_S  # every process starts its window together
    merged = Samples()
    with ProcessPoolExecutor(processes) as pool:
        futures = [
            loop.run_in_executor(pool, _child, url, step, part, start_at, step.seed + i)
            for i, part in enumerate(_split(step.load, processes))
        ]
        for samples in await asyncio.gather(*futures):
            merged.merge(samples)
    return merged


# -- reporting ---------------------------------------------------------------------------


@dataclass
class Run:
    """One `bench` run: everything needed to reproduce and compare it."""

    label: str
    url: str
    endpoint: str
    corpus: str
    duration_s: float
    warmup_s: float
    processes: int
    command: list[str]
    server: dict[str, Any]
    environment: dict[str, Any]
    steps: list[StepResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Run:
        steps = [StepResult(**s) for s in record["steps"]]
        return cls(**{**record, "steps": steps})


def format_table(steps: Sequence[StepResult]) -> str:
    head = (
        f"{'load':>12} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'batch':>6} {'pad':>5} {'wait ms':>8}  errors"
    )
    rows, nan = [head], float("nan")
    for s in steps:
        lat, srv = s.latency_ms, s.server
        errors = {k: v for k, v in s.statuses.items() if k != "200"} or "-"
        rows.append(
            f"{s.load:>12} {s.throughput_rps:>8.1f} {lat['p50']:>8.1f} {lat['p90']:>8.1f} "
            f"{lat['p99']:>8.1f} {lat['max']:>8.1f} {srv.get('mean_batch_size', nan):>6.1f} "
            f"{srv.get('padding_ratio', nan):>5.2f} {srv.get('mean_queue_wait_ms', nan):>8.1f}  "
            f"{errors}"
        )
    return "\n".join(rows)


SERVER_COLUMNS = ("mean_batch_size", "padding_ratio", "mean_queue_wait_ms")


def write_csv(run: Run, path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["label", "load", "kind", "value", "throughput_rps", "p50_ms", "p90_ms", "p99_ms",
             "max_ms", "requests", "ok", "mean_batch_size", "padding_ratio", "mean_queue_wait_ms",
             "statuses", "url", "endpoint", "corpus", "duration_s", "git_commit"]
        )  # fmt: skip
        for s in run.steps:
            writer.writerow(
                [run.label, s.load, s.kind, s.value, f"{s.throughput_rps:.3f}",
                 *(f"{s.latency_ms[k]:.3f}" for k in ("p50", "p90", "p99", "max")),
                 s.requests, s.ok,
                 *(s.server.get(k, "") for k in SERVER_COLUMNS),
                 json.dumps(s.statuses), run.url, run.endpoint, run.corpus, run.duration_s,
                 run.environment.get("git_commit")]
            )  # fmt: skip


async def server_info(clients: TransportFactory) -> dict[str, Any]:
    async with clients(1) as client:
        status, text = await client.get("/model")
    info: dict[str, Any] = json.loads(text) if status == 200 else {}
    return info


def parse_loads(concurrency: str | None, rate: str | None) -> list[Load]:
    loads = [Load("closed", int(c)) for c in concurrency.split(",")] if concurrency else []
    loads += [Load("open", float(r)) for r in rate.split(",")] if rate else []
    return loads or [Load("closed", c) for c in (1, 4, 16, 64)]


async def bench(
    url: str,
    loads: Sequence[Load],
    *,
    texts: list[str],
    corpus_source: str,
    request: Request,
    duration_s: float,
    warmup_s: float,
    kinds: list[str] | None = None,
    processes: int = 1,
    label: str = "",
    clients: TransportFactory | None = None,
    progress: bool = False,
    on_step: Callable[[StepResult], None] | None = None,
) -> Run:
    clients = clients or aiohttp_transports(url)
    info = await server_info(clients)
    run = Run(
        label=label or str(info.get("batching", {}).get("policy", url)),
        url=url,
        endpoint=request.endpoint,
        corpus=corpus_source,
        duration_s=duration_s,
        warmup_s=warmup_s,
        processes=processes,
        command=environment.command_line(),
        server=info,
        environment=environment.describe(),
    )
    for load in loads:
        step = Step(texts, request, load, duration_s, warmup_s, kinds=kinds)
        result = await measure(step, clients, url=url, processes=processes, progress=progress)
        run.steps.append(result)
        if on_step:
            on_step(result)
    return run


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `--help` name the default of every option that has one (a flag that is off,
    an empty or absent value has none to name), and return the parser."""
    for action in parser._actions:
        default = action.default
        nothing = default is None or default is False or default == ""
        if nothing or default is argparse.SUPPRESS or not action.option_strings:
            continue
        if "%(default)" not in (action.help or ""):
            action.help = (
                f"{action.help} (default: %(default)s)" if action.help else ("default: %(default)s")
            )
    return parser


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", help="closed loop: comma-separated client counts")
    parser.add_argument("--rate", help="open loop: comma-separated Poisson rates, requests/s")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds a step")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds a step")
    texts = parser.add_mutually_exclusive_group()
    texts.add_argument("--corpus", help="one text per line, instead of a built-in workload")
    texts.add_argument(
        "--workload",
        choices=list(corpora.WORKLOADS),
        default="short",
        help="built-in texts: short sentences, RAG chunks (each fills the model's "
        "256-token window), or a mix of 80 %% short queries and 20 %% chunks",
    )
    parser.add_argument(
        "--endpoint",
        default="/predict",
        choices=list(ENDPOINTS),
        help="ours, or OpenAI's embeddings route (ours, or another server's such as "
        "Infinity's /embeddings), one text a request",
    )
    parser.add_argument("--model", default="default", help="OpenAI's routes: the model field")
    parser.add_argument("--texts-per-request", type=int, default=8, help="for /predict/batch")
    parser.add_argument("--processes", type=int, default=1, help="load-generator processes")


def load_corpus(path: str | None, workload: str = "short") -> corpora.Corpus:
    """The texts of the file at `path`, else of the built-in `workload`."""
    return corpora.from_file(path) if path else corpora.workload(workload)
