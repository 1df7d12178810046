"""Holding a p99 target while the load changes: microbatch with and without
`--slo-p99-ms`, under the same open-loop load stepping from 25 % to 75 % of capacity and
back.

    python -m benchmarks.lab.slo --slo-p99-ms 60 --phase-s 40

Capacity is measured first on the server without a target (64 closed-loop clients). Both
servers then get the same Poisson arrivals (one seed), and the report gives, per phase,
what was served and its p50/p99 (client-measured, arrival to reply), the share of 2-second
windows whose p99 met the target, and the controller's changes, read from
`/admin/batching` once a second. Servers run pinned to CPU 0 with one torch thread, the
load generator on CPU 1 (where the machine has two).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import environment
from benchmarks.corpus import builtin
from benchmarks.loadgen import paced, percentile, poisson_arrivals
from benchmarks.processes import pin, server
from benchmarks.runs import seconds_bar
from benchmarks.soak import measure_capacity
from benchmarks.transport import FRESH

DEFAULT_SERVER = "--torch-threads 1"
PHASES = (0.25, 0.75, 0.25)
"""Fractions of capacity, one per phase."""
WINDOW_S = 2.0
RESULTS = Path(__file__).parents[1] / "results"


@dataclass(frozen=True, slots=True)
class Outcome:
    sent_at: float
    """Seconds from the start of the load."""
    latency_s: float
    status: int


@dataclass
class Arm:
    """One server's run: its flags, every request, and its live limits each second."""

    name: str
    server_args: str
    outcomes: list[Outcome] = field(default_factory=list)
    limits: list[tuple[float, int, float, float | None]] = field(default_factory=list)
    """(seconds from the start, max_batch_size, max_wait_ms, the controller's last window
    p99 of queue plus device time in ms, or None) once a second."""
    adjustments: dict[str, float] = field(default_factory=dict)


def rate_schedule(
    capacity_rps: float, phase_s: float, phases: Sequence[float] = PHASES
) -> Callable[[float], float]:
    """Requests per second at time `t`: each phase's fraction of capacity, the last held."""

    def rate(t: float) -> float:
        return capacity_rps * phases[min(int(t // phase_s), len(phases) - 1)]

    return rate


async def drive(url: str, arrivals: list[float], texts: list[str], seed: int, arm: Arm) -> None:
    """Send one request at each arrival, whatever is in flight; record every outcome."""
    rng = random.Random(seed)
    chosen = [rng.choice(texts) for _ in arrivals]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        url, connector=connector, timeout=timeout, headers=FRESH
    ) as session:
        started = time.perf_counter()

        async def fire(index: int, scheduled_at: float) -> Outcome:
            body = json.dumps({"text": chosen[index]}).encode()
            headers = {"content-type": "application/json"}
            try:
                async with session.post("/predict", data=body, headers=headers) as reply:
                    await reply.read()
                    status = reply.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            return Outcome(arrivals[index], time.perf_counter() - scheduled_at, status)

        async def watch() -> None:
            while True:
                async with session.get("/admin/batching") as reply:
                    live = await reply.json()
                at = time.perf_counter() - started
                window = (live.get("slo") or {}).get("last_window") or {}
                limits = (at, live["max_batch_size"], live["max_wait_ms"], window.get("p99_ms"))
                arm.limits.append(limits)
                await asyncio.sleep(1)

        watcher = asyncio.create_task(watch())
        async with seconds_bar(arrivals[-1] if arrivals else 0, arm.name, enabled=True):
            arm.outcomes = await paced(arrivals, fire)
        watcher.cancel()
        async with session.get("/metrics") as reply:
            metrics = await reply.text()
    for line in metrics.splitlines():
        if line.startswith("microbatch_slo_adjustments_total{"):
            action = line.split('action="')[1].split('"')[0]
            arm.adjustments[action] = float(line.rsplit(" ", 1)[1])


def windows(arm: Arm, window_s: float = WINDOW_S) -> list[tuple[float, float | None]]:
    """(window start, p99 ms of the requests sent in it that got 200) per window."""
    if not arm.outcomes:
        return []
    end = max(o.sent_at for o in arm.outcomes)
    rows = []
    start = 0.0
    while start <= end:
        ok = [o.latency_s for o in arm.outcomes if start <= o.sent_at < start + window_s
              and o.status == 200]  # fmt: skip
        rows.append((start, percentile(ok, 99) * 1e3 if ok else None))
        start += window_s
    return rows


def phase_rows(
    arm: Arm, capacity_rps: float, phase_s: float, target_ms: float, phases: Sequence[float]
) -> list[dict[str, Any]]:
    rows = []
    for i, fraction in enumerate(phases):
        lo, hi = i * phase_s, (i + 1) * phase_s
        sent = [o for o in arm.outcomes if lo <= o.sent_at < hi]
        ok = [o.latency_s for o in sent if o.status == 200]
        met = [p99 <= target_ms for start, p99 in windows(arm) if lo <= start < hi and p99]
        rows.append({
            "phase": i + 1,
            "load": fraction,
            "rate_rps": capacity_rps * fraction,
            "served_rps": len(ok) / phase_s,
            "errors": len(sent) - len(ok),
            "p50_ms": percentile(ok, 50) * 1e3 if ok else None,
            "p99_ms": percentile(ok, 99) * 1e3 if ok else None,
            "windows_met": sum(met) / len(met) if met else None,
        })  # fmt: skip
    return rows


def render(report: dict[str, Any]) -> str:
    target = report["slo_p99_ms"]
    lines = [
        f"# SLO controller under a step load ({report['name']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Capacity {report['capacity_rps']:.1f} req/s (64 closed-loop clients, the server "
        f"without a target); open-loop Poisson load of {', '.join(f'{p:.0%}' for p in report['phases'])}"  # noqa: E501
        f" of it, {report['phase_s']:g} s each; target p99 {target:g} ms. Servers: "
        f"`{report['server_args']}` (plus `--slo-p99-ms {target:g}` for the controlled one); "
        f"run {report.get('order', 'without a target first')}, one after the other.",
        "",
        "| server | phase | load | sent req/s | served req/s | errors | p50 ms | p99 ms | 2-s windows with p99 ≤ target |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in report["arms"]:
        for row in arm["phases"]:
            cells = [
                arm["name"], str(row["phase"]), f"{row['load']:.0%}", f"{row['rate_rps']:.1f}",
                f"{row['served_rps']:.1f}", str(row["errors"]), _ms(row["p50_ms"]),
                _ms(row["p99_ms"]),
                "-" if row["windows_met"] is None else f"{row['windows_met']:.0%}",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The controller's changes (`microbatch_slo_adjustments_total`):", ""]
    for arm in report["arms"]:
        if any(arm["adjustments"].values()):
            shown = ", ".join(f"{k} {v:g}" for k, v in sorted(arm["adjustments"].items()))
            lines.append(f"- {arm['name']}: {shown}")
            settings = sorted({(b, w) for _, b, w, _ in arm["limits"]})
            lines.append(
                "  - settings it used: "
                + "; ".join(f"max_batch_size {b}, max_wait_ms {w:g}" for b, w in settings)
            )
    if report.get("plot"):
        lines += ["", f"![p99 per 2-s window]({report['plot']})"]
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot(report: dict[str, Any], arms: list[Arm], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.4]})  # fmt: skip
    for arm in arms:
        rows = [(t + WINDOW_S / 2, p) for t, p in windows(arm) if p is not None]
        top.plot([t for t, _ in rows], [p for _, p in rows], marker=".", label=arm.name)
    top.axhline(report["slo_p99_ms"], color="red", linestyle="--", label="target")
    top.set_yscale("log")
    top.set_ylabel("p99 per 2-s window (ms)")
    load = top.twinx()
    phase_s, capacity = report["phase_s"], report["capacity_rps"]
    xs = [x for i in range(len(report["phases"])) for x in (i * phase_s, (i + 1) * phase_s)]
    load.plot(xs, [capacity * f for f in report["phases"] for _ in (0, 1)], color="grey",
              alpha=0.5, label="offered req/s")  # fmt: skip
    load.set_ylabel("offered req/s")
    controlled = arms[-1]
    at = [row[0] for row in controlled.limits]
    engine = [(row[0], row[3]) for row in controlled.limits if row[3] is not None]
    top.plot([t for t, _ in engine], [p for _, p in engine], linestyle=":", color="purple",
             label="controlled: its window p99 (queue + device)")  # fmt: skip
    top.legend(loc="upper left", fontsize=8)
    bottom.step(at, [row[2] for row in controlled.limits], where="post", label="max_wait_ms")
    bottom.step(at, [row[1] for row in controlled.limits], where="post", label="max_batch_size")
    bottom.set_xlabel("seconds")
    bottom.set_title("the controlled server's live limits", fontsize=9)
    bottom.legend(loc="upper right")
    fig.suptitle(f"p99 target {report['slo_p99_ms']:g} ms under a 25 / 75 / 25 % step load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.lab.slo", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--slo-p99-ms", type=float, required=True, help="the target to hold")
    p.add_argument("--phase-s", type=float, default=40.0, help="seconds of each load step")
    p.add_argument("--phases", default=",".join(str(f) for f in PHASES),
                   help="fractions of capacity, one per step")  # fmt: skip
    p.add_argument("--capacity-rps", type=float, help="skip the capacity probe")
    p.add_argument("--controlled-first", action="store_true",
                   help="run the server with the target first (needs --capacity-rps), to "
                   "tell the controller from the order of the runs")  # fmt: skip
    p.add_argument("--probe-s", type=float, default=15.0)
    p.add_argument("--server-args", default=DEFAULT_SERVER, help="flags for both servers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=f"slo-cpu-{os.cpu_count()}core-{date.today()}")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the report goes")
    args = p.parse_args(argv)
    args.phases = [float(f) for f in args.phases.split(",")]
    if args.controlled_first and args.capacity_rps is None:
        p.error("--controlled-first needs --capacity-rps (measured without a target)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    two_cpus = len(os.sched_getaffinity(0)) >= 2
    server_cpu = 0 if two_cpus else None
    if two_cpus:
        pin(1)
    texts = list(builtin(2000, seed=7).texts)
    base = shlex.split(args.server_args)
    target_flags = ["--slo-p99-ms", f"{args.slo_p99_ms:g}"]
    arms = [Arm("microbatch", args.server_args),
            Arm(f"microbatch --slo-p99-ms {args.slo_p99_ms:g}", args.server_args)]  # fmt: skip
    capacity = args.capacity_rps
    duration = args.phase_s * len(args.phases)
    arrivals: list[float] = []
    args.out.mkdir(parents=True, exist_ok=True)
    runs = list(zip(arms, ([], target_flags), strict=True))
    for arm, flags in reversed(runs) if args.controlled_first else runs:
        log = args.out / f"{args.name}-{'slo' if flags else 'plain'}-server.log"
        with server(["server.cli", "serve", *base, *flags], log, cpu=server_cpu) as url:
            if capacity is None:
                capacity = asyncio.run(_capacity(url, texts, args.probe_s))
                print(f"capacity {capacity:.1f} req/s", file=sys.stderr)
            if not arrivals:
                rate = rate_schedule(capacity, args.phase_s, args.phases)
                arrivals = poisson_arrivals(rate, duration, random.Random(args.seed))
            asyncio.run(drive(url, arrivals, texts, args.seed, arm))
        log.unlink(missing_ok=True)
    assert capacity is not None
    report: dict[str, Any] = {
        "name": args.name,
        "command": environment.command_line(),
        "environment": environment.describe(),
        "slo_p99_ms": args.slo_p99_ms,
        "capacity_rps": capacity,
        "phases": args.phases,
        "phase_s": args.phase_s,
        "server_args": args.server_args,
        "order": "controlled first" if args.controlled_first else "without a target first",
        "plot": f"{args.name}.png",
        "arms": [
            {
                "name": arm.name,
                "phases": phase_rows(arm, capacity, args.phase_s, args.slo_p99_ms, args.phases),
                "adjustments": arm.adjustments,
                "limits": arm.limits,
                "windows": windows(arm),
            }
            for arm in arms
        ],
    }
    plot(report, arms, args.out / f"{args.name}.png")
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(render(report))
    print(render(report))
    return 0


async def _capacity(url: str, texts: list[str], probe_s: float) -> float:
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        aiohttp.ClientSession(url, connector=connector, headers=FRESH) as session,
        seconds_bar(probe_s, "capacity probe", enabled=True),
    ):
        return await measure_capacity(session, texts, probe_s)


if __name__ == "__main__":
    sys.exit(main())
