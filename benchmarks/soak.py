"""`microbatch soak`: a bounded adversarial run against a real server.

For `--duration-s` (default 300) it sends Poisson traffic at `--load` times the server's
measured capacity, mixed with malformed requests (`--malformed` of the valid rate, five
kinds) and clients that hang up mid-wait (`--disconnects`); in the middle it bursts to
`--overload` times capacity for `--overload-s`. It reports what was sent, answered,
rejected (by status and reason) and lost (no HTTP answer to a request we did not abandon
ourselves: must be 0), the 429 latency, the p99 of admitted requests against their
deadline, and the server's resident memory before, during and after.

    python -m benchmarks.soak                 # starts the default model, pinned
    python -m benchmarks.soak --url http://127.0.0.1:8000 --duration-s 60

Threads: the server is pinned to CPU 0 with one torch thread, the load generator to
CPU 1 (on a machine with at least two), so neither steals the other's core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import environment
from benchmarks.corpus import builtin
from benchmarks.environment import command_line, describe
from benchmarks.loadgen import Request, closed_loop, paced, percentile, poisson_arrivals
from benchmarks.processes import pin, server
from benchmarks.runs import seconds_bar, show_defaults
from benchmarks.scrape import Scrape, mean_request_ms, scrape
from benchmarks.transport import FRESH, AiohttpTransport

DEFAULT_SERVER = "--torch-threads 1 --max-queue-size 256 --request-timeout-s 10"

MALFORMED: dict[str, tuple[bytes, str]] = {
    "bad_json": (b'{"text": "unterminated', "application/json"),
    "wrong_type": (b'{"text": 42}', "application/json"),
    "not_json_content_type": (b"text=hello", "application/x-www-form-urlencoded"),
    "deep_nesting": (b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "application/json"),
    "too_long_text": (json.dumps({"text": "x" * 5000}).encode(), "application/json"),
    "body_too_large": (b'{"text": "' + b"y" * 2_200_000 + b'"}', "application/json"),
}


@dataclass
class Outcome:
    phase: str
    kind: str  # valid | malformed:<name> | disconnect
    status: int  # 0: no HTTP answer
    reason: str  # the error body's `type`, or the transport error's name
    latency_s: float
    sent_at: float = 0.0  # seconds since the soak started


@dataclass
class Report:
    sent: int
    answered_ok: int
    rejected: dict[str, int]
    abandoned_by_client: int
    lost: int
    lost_examples: list[str]
    capacity_rps: float
    valid_rps: float
    overload_rps: float
    overload: dict[str, Any]
    memory_mb: dict[str, float]
    server_counts: dict[str, float]
    timeline: list[dict[str, float]] = field(default_factory=list)
    cpu_steal_percent: float | None = None
    """Of all CPU time during the run, the share the hypervisor gave to other guests:
    on a shared VM, the capacity measured at the start is not the capacity later."""
    config: dict[str, Any] = field(default_factory=dict)


async def measure_capacity(session: aiohttp.ClientSession, texts: list[str], s: float) -> float:
    """Requests/s at saturation: 64 closed-loop clients for `s` seconds."""
    samples = await closed_loop(AiohttpTransport(session), texts, Request(), 64, s, 0.0)
    ok: int = samples.statuses.get("200", 0)
    return ok / s


async def _send(
    session: aiohttp.ClientSession, phase: str, kind: str, body: bytes, ctype: str
) -> Outcome:
    started = time.perf_counter()
    try:
        async with session.post("/predict", data=body, headers={"content-type": ctype}) as r:
            payload = await r.read()
            reason = ""
            if r.status != 200:
                try:
                    reason = str(json.loads(payload).get("type", ""))
                except ValueError:
                    reason = "unparseable"
            return Outcome(phase, kind, r.status, reason, time.perf_counter() - started)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(phase, kind, 0, type(exc).__name__, time.perf_counter() - started)


@dataclass
class HangUp:
    """When a disconnecting client hangs up: once `when()` returns (by default after 5 ms,
    usually while its request waits in the queue); `then()` runs right after it has.
    A test holds its fake model and hangs up while it is held, then lets it go."""

    when: Callable[[], Awaitable[object]] = field(default=lambda: asyncio.sleep(0.005))
    then: Callable[[], object] = field(default=lambda: None)


async def _hang_up(
    session: aiohttp.ClientSession, phase: str, text: str, hang_up: HangUp
) -> Outcome:
    """Send a valid request and abandon it when `hang_up` says, unless answered first."""
    body = json.dumps({"text": text}).encode()
    started = time.perf_counter()
    task = asyncio.create_task(_send(session, phase, "disconnect", body, "application/json"))
    trigger = asyncio.ensure_future(hang_up.when())
    done, _ = await asyncio.wait({task, trigger}, return_when=asyncio.FIRST_COMPLETED)
    trigger.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    hang_up.then()
    return Outcome(phase, "disconnect", 0, "abandoned", time.perf_counter() - started)


async def soak(args: argparse.Namespace, url: str, hang_up: HangUp | None = None) -> Report:
    hang_up = hang_up or HangUp()
    corpus = builtin(2000, seed=7)
    texts = list(corpus.texts)
    rng = random.Random(args.seed)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=args.client_timeout_s)
    async with aiohttp.ClientSession(
        url, connector=connector, timeout=timeout, headers=FRESH
    ) as session:
        observer = AiohttpTransport(session)
        memory: dict[str, float] = {}
        start_metrics = await scrape(observer)
        capacity = args.capacity_rps
        if not capacity:
            async with seconds_bar(args.probe_s, "capacity probe", enabled=True):
                capacity = await measure_capacity(session, texts, args.probe_s)
        memory["before"] = _resident_mb(await scrape(observer))
        valid_rps, overload_rps = capacity * args.load, capacity * args.overload
        print(
            f"capacity {capacity:.1f} req/s; soak at {valid_rps:.1f} req/s, "
            f"burst at {overload_rps:.1f} req/s",
            file=sys.stderr,
        )

        burst_from = (args.duration_s - args.overload_s) / 2
        burst_to = burst_from + args.overload_s
        share = 1 + args.malformed + args.disconnects

        def phase(t: float) -> str:
            return "overload" if burst_from <= t < burst_to else "steady"

        def rate(t: float) -> float:
            return float((overload_rps if phase(t) == "overload" else valid_rps) * share)

        arrivals = poisson_arrivals(rate, args.duration_s, rng)
        started = time.perf_counter()

        async def fire(index: int, scheduled_at: float) -> Outcome:
            due = arrivals[index]
            draw, text = rng.random() * share, rng.choice(texts)
            if draw < 1:
                body = json.dumps({"text": text}).encode()
                outcome = await _send(session, phase(due), "valid", body, "application/json")
            elif draw < 1 + args.malformed:
                name = rng.choice(list(MALFORMED))
                payload, ctype = MALFORMED[name]
                outcome = await _send(session, phase(due), f"malformed:{name}", payload, ctype)
            else:
                outcome = await _hang_up(session, phase(due), text, hang_up)
            outcome.sent_at = due
            return outcome

        peak_mb = [memory["before"]]
        sampler = asyncio.create_task(_sample_memory(observer, peak_mb))
        async with seconds_bar(args.duration_s, "soak", enabled=True) as bar:
            shown = asyncio.create_task(_show_phase(bar, phase, started))
            try:
                outcomes = await paced(arrivals, fire)
            finally:
                shown.cancel()
        sent_s = time.perf_counter() - started
        sampler.cancel()
        await asyncio.sleep(2)  # let the server finish the abandoned ones' bookkeeping
        after = await scrape(observer)
        memory["peak_during"] = max(peak_mb)
        memory["after"] = _resident_mb(after)
        print(f"sent for {sent_s:.1f} s (scheduled {args.duration_s:g} s)", file=sys.stderr)
    return _report(args, outcomes, capacity, valid_rps, overload_rps, memory, start_metrics, after)


async def _show_phase(bar: Any, phase: Any, started: float) -> None:
    """Name the phase (steady or overload) beside the bar, once a second."""
    while True:
        bar.set_postfix_str(phase(time.perf_counter() - started), refresh=False)
        await asyncio.sleep(1)


def _resident_mb(metrics: Scrape) -> float:
    return metrics.value("process_resident_memory_bytes") / 2**20


async def _sample_memory(observer: AiohttpTransport, peak_mb: list[float]) -> None:
    """The server's resident memory every 5 s, on its own task (never delays arrivals)."""
    while True:
        await asyncio.sleep(5)
        metrics = await scrape(observer)
        if metrics:
            peak_mb.append(_resident_mb(metrics))


def _report(
    args: argparse.Namespace,
    outcomes: list[Outcome],
    capacity: float,
    valid_rps: float,
    overload_rps: float,
    memory: dict[str, float],
    before: Scrape,
    after: Scrape,
) -> Report:
    rejected: Counter[str] = Counter()
    lost: list[Outcome] = []
    abandoned = 0
    for o in outcomes:
        if o.reason == "abandoned":
            abandoned += 1
        elif o.status == 0:
            lost.append(o)
        elif o.status != 200:
            rejected[f"{o.status} {o.reason}"] += 1
    burst = [o for o in outcomes if o.phase == "overload" and o.kind == "valid"]
    admitted = [o.latency_s for o in burst if o.status == 200]
    too_many = [o.latency_s for o in burst if o.status == 429]

    def items(outcome: str) -> float:
        return after.since(before, "microbatch_items_total", outcome=outcome)

    def ms(values: list[float], q: float) -> float:
        return round(percentile(values, q) * 1000, 1)

    timeline = []
    for start in range(0, int(args.duration_s), 10):
        window = [o for o in outcomes if start <= o.sent_at < start + 10 and o.kind == "valid"]
        ok = [o.latency_s for o in window if o.status == 200]
        refused = [o.latency_s for o in window if o.status == 429]
        timeline.append(
            {
                "from_s": start,
                "valid_sent": len(window),
                "ok": len(ok),
                "ok_p99_ms": ms(ok, 99),
                "429": len(refused),
                "429_p50_ms": ms(refused, 50),
                "504": sum(o.status == 504 for o in window),
            }
        )
    return Report(
        timeline=timeline,
        sent=len(outcomes),
        answered_ok=sum(o.status == 200 for o in outcomes),
        rejected=dict(sorted(rejected.items())),
        abandoned_by_client=abandoned,
        lost=len(lost),
        lost_examples=[f"{o.kind}: {o.reason} after {o.latency_s:.2f}s" for o in lost[:10]],
        capacity_rps=round(capacity, 1),
        valid_rps=round(valid_rps, 1),
        overload_rps=round(overload_rps, 1),
        overload={
            "seconds": args.overload_s,
            "valid_sent": len(burst),
            "admitted_and_answered": len(admitted),
            "admitted_p50_ms": ms(admitted, 50),
            "admitted_p99_ms": ms(admitted, 99),
            "deadline_ms": args.deadline_s * 1000,
            "rejected_429": len(too_many),
            "429_p50_ms": round(percentile(too_many, 50) * 1000, 2),
            "429_p99_ms": round(percentile(too_many, 99) * 1000, 2),
            "504": sum(o.status == 504 for o in burst),
            "429_server_mean_ms": round(mean_request_ms(before, after, "429"), 3),
        },
        memory_mb={k: round(v, 1) for k, v in memory.items()},
        server_counts={
            "admitted": after.since(before, "microbatch_admitted_items_total"),
            "ok": items("ok"),
            "cancelled": items("cancelled"),
            "expired": items("expired"),
            "rejected_full": items("rejected_full"),
            "client_disconnects": after.since(before, "microbatch_client_disconnects_total"),
            "failed": items("failed"),
        },
    )


def render(report: Report) -> str:
    o, m, c = report.overload, report.memory_mb, report.server_counts
    rows = [
        "| | |",
        "|---|---|",
        f"| requests sent | {report.sent} |",
        f"| answered 200 | {report.answered_ok} |",
        *(f"| rejected {reason} | {n} |" for reason, n in report.rejected.items()),
        f"| abandoned by the client (disconnect test) | {report.abandoned_by_client} |",
        f"| **lost** (no HTTP answer) | **{report.lost}** |",
        f"| capacity / steady / burst rate | {report.capacity_rps} / {report.valid_rps} / "
        f"{report.overload_rps} req/s |",
        f"| burst: valid sent / admitted and answered / 429 | {o['valid_sent']} / "
        f"{o['admitted_and_answered']} / {o['rejected_429']} |",
        f"| burst: admitted p50 / p99 (deadline) | {o['admitted_p50_ms']} / "
        f"{o['admitted_p99_ms']} ms ({o['deadline_ms']:g} ms) |",
        f"| burst: 429 latency p50 / p99 (client) | {o['429_p50_ms']} / {o['429_p99_ms']} ms |",
        f"| 429: mean time in the server | {o['429_server_mean_ms']} ms |",
        f"| server RSS before / peak / after | {m['before']} / {m['peak_during']} / "
        f"{m['after']} MiB |",
        f"| server: items cancelled by disconnects | {report.server_counts['cancelled']:g} |",
        f"| CPU time stolen by the hypervisor | {report.cpu_steal_percent} % |",
        f"| server: items admitted / answered or settled | {c['admitted']:g} / "
        f"{c['ok'] + c['cancelled'] + c['expired'] + c['failed']:g} |",
    ]
    return "\n".join(rows)


@contextmanager
def _target(args: argparse.Namespace) -> Iterator[str]:
    if args.url:
        yield args.url
        return
    log = Path(args.server_log)
    serve_args = ["server.cli", "serve", *shlex.split(args.server_args)]
    with server(serve_args, log, cpu=0) as url:
        yield url


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="microbatch soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server; default: start one (see --server-args)")
    p.add_argument("--server-args", default=DEFAULT_SERVER, help="flags for `serve`")
    p.add_argument("--server-log", default="soak-server.log")
    p.add_argument("--duration-s", type=float, default=300.0)
    p.add_argument("--overload-s", type=float, default=60.0, help="length of the burst")
    p.add_argument("--load", type=float, default=0.5, help="steady rate / capacity")
    p.add_argument("--overload", type=float, default=3.0, help="burst rate / capacity")
    p.add_argument("--malformed", type=float, default=0.1, help="malformed / valid requests")
    p.add_argument("--disconnects", type=float, default=0.05, help="hang-ups / valid requests")
    p.add_argument("--capacity-rps", type=float, help="skip the capacity probe")
    p.add_argument("--probe-s", type=float, default=15.0)
    p.add_argument("--deadline-s", type=float, default=10.0, help="the server's request timeout")
    p.add_argument("--client-timeout-s", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report and environment here")
    args = show_defaults(p).parse_args(argv)
    if args.overload_s > args.duration_s:
        p.error("--overload-s must not exceed --duration-s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    with _target(args) as url:
        if not args.url:
            pin(1)  # the load generator on the other core
        cpu_before = environment.cpu_times()
        report = asyncio.run(soak(args, url))
        report.cpu_steal_percent = environment.steal_percent(cpu_before, environment.cpu_times())
    report.config = environment.portable_values(
        {k: v for k, v in vars(args).items() if k not in ("json",)}
    )
    print(render(report))
    if args.json:
        document = {"report": asdict(report), "environment": describe(), "command": command_line()}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0 if report.lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
