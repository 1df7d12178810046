"""`microbatch sweep`: try a grid of batching settings on a live server (through
`PATCH /admin/batching`, no restarts), measure each under load, mark the Pareto front of
throughput against p99, and pick the fastest setting that meets a p99 target.

    microbatch sweep --url http://127.0.0.1:8000 --batch-sizes 8,32 --wait-ms 5,50 \\
        --policies adaptive,window --concurrency 16,64 --slo-p99-ms 1500 --apply
    microbatch sweep --serve-args "--no-compile --torch-threads 1" ...   # starts its own
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks import environment
from benchmarks.loadgen import Load, Request, StepResult
from benchmarks.plot import plain_log_axis
from benchmarks.processes import server
from benchmarks.runs import (
    Step,
    add_load_arguments,
    format_table,
    load_corpus,
    measure,
    parse_loads,
    show_defaults,
)
from benchmarks.transport import Transport, TransportFactory, aiohttp_transports

SETTING_KEYS = ("max_batch_size", "max_wait_ms", "policy", "batch_sizing")


@dataclass
class Point:
    setting: dict[str, Any]
    """What the sweep asked for."""
    applied: dict[str, Any]
    """What `GET /admin/batching` read back before measuring."""
    result: StepResult


def grid(
    batch_sizes: Sequence[int], waits_ms: Sequence[float], policies: Sequence[str]
) -> list[dict[str, Any]]:
    return [
        {"max_batch_size": b, "max_wait_ms": w, "policy": p}
        for p, b, w in itertools.product(policies, batch_sizes, waits_ms)
    ]


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point beats on both throughput and p99."""
    front = []
    for i, a in enumerate(points):
        dominated = any(
            b.result.throughput_rps >= a.result.throughput_rps
            and b.result.p99_ms <= a.result.p99_ms
            and (
                b.result.throughput_rps > a.result.throughput_rps
                or b.result.p99_ms < a.result.p99_ms
            )
            for j, b in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def recommend(points: Sequence[Point], slo_p99_ms: float) -> Point | None:
    """The point with the highest throughput whose p99 meets the target and which had
    no errors; None if none does."""
    meeting = [
        p
        for p in points
        if p.result.p99_ms <= slo_p99_ms and p.result.ok == p.result.requests and p.result.ok
    ]
    return max(meeting, key=lambda p: p.result.throughput_rps, default=None)


async def apply_setting(client: Transport, setting: dict[str, Any]) -> dict[str, Any]:
    """PATCH the setting, then read it back; raise if the server did not take it."""
    status, text = await client.patch("/admin/batching", setting)
    if status != 200:
        raise RuntimeError(f"PATCH /admin/batching {setting} answered {status}: {text}")
    applied: dict[str, Any] = json.loads((await client.get("/admin/batching"))[1])
    wrong = {k: (v, applied.get(k)) for k, v in setting.items() if applied.get(k) != v}
    if wrong:
        raise RuntimeError(f"server did not apply {wrong} (asked, read back)")
    return applied


async def sweep(
    clients: TransportFactory,
    settings: Sequence[dict[str, Any]],
    loads: Sequence[Load],
    *,
    texts: list[str],
    request: Request,
    duration_s: float,
    warmup_s: float,
    on_point: Any = None,
    progress: bool = False,
) -> list[Point]:
    points: list[Point] = []
    total = len(settings) * len(loads)
    async with clients(2) as admin:
        original = json.loads((await admin.get("/admin/batching"))[1])
        try:
            for setting in settings:
                applied = await apply_setting(admin, setting)
                for load in loads:
                    step = Step(texts, request, load, duration_s, warmup_s)
                    desc = f"[{len(points) + 1}/{total}] {_brief(setting)} {load}"
                    result = await measure(step, clients, progress=progress, desc=desc)
                    point = Point(setting, applied, result)
                    points.append(point)
                    if on_point:
                        on_point(point)
        finally:
            restore = {k: original[k] for k in SETTING_KEYS}
            await admin.patch("/admin/batching", restore)
    return points


def _brief(setting: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items())


def format_points(points: Sequence[Point]) -> str:
    table = format_table([p.result for p in points]).splitlines()
    lines = [f"{'policy':>8} {'batch':>5} {'wait':>6} " + table[0]]
    for p, row in zip(points, table[1:], strict=True):
        s = p.setting
        lines.append(f"{s['policy']:>8} {s['max_batch_size']:>5} {s['max_wait_ms']:>6g} " + row)
    return "\n".join(lines)


def plot(points: Sequence[Point], path: str, slo_p99_ms: float | None, best: Point | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for policy, marker in (("adaptive", "o"), ("window", "s")):
        chosen = [p for p in points if p.setting["policy"] == policy]
        if chosen:
            ax.scatter(
                [p.result.throughput_rps for p in chosen],
                [p.result.p99_ms for p in chosen],
                marker=marker, label=policy, alpha=0.75,
            )  # fmt: skip
    front = sorted((points[i] for i in pareto_front(points)), key=lambda p: p.result.throughput_rps)
    ax.plot(
        [p.result.throughput_rps for p in front], [p.result.p99_ms for p in front],
        "k--", linewidth=1, label="Pareto front",
    )  # fmt: skip
    for p in front:
        s = p.setting
        ax.annotate(
            f"{s['policy']} {s['max_batch_size']}/{s['max_wait_ms']:g} ms, {p.result.load}",
            (p.result.throughput_rps, p.result.p99_ms), fontsize=7,
            xytext=(4, 4), textcoords="offset points",
        )  # fmt: skip
    if slo_p99_ms is not None:
        ax.axhline(slo_p99_ms, color="red", linewidth=0.8, label=f"p99 target {slo_p99_ms:g} ms")
    if best is not None:
        ax.scatter([best.result.throughput_rps], [best.result.p99_ms], marker="*", s=250,
                   color="gold", edgecolor="black", zorder=5, label="recommended")  # fmt: skip
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("p99 latency (ms)")
    plain_log_axis(ax)
    ax.set_title("microbatch sweep: policy, max batch / max wait, load")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="microbatch sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", help="a running server; default: start one")
    parser.add_argument("--serve-args", default="", help="flags for the server it starts")
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--wait-ms", default="5,20,50")
    parser.add_argument("--policies", default="adaptive,window")
    add_load_arguments(parser)
    parser.add_argument("--slo-p99-ms", type=float, help="pick the fastest setting under this p99")
    parser.add_argument("--apply", action="store_true", help="set the pick on the server")
    parser.add_argument("--json", help="write every point here")
    parser.add_argument("--png", default="sweep.png", help="throughput vs p99 plot")
    parser.set_defaults(duration=10.0, warmup=2.0)
    args = show_defaults(parser).parse_args(argv)
    if args.apply and args.slo_p99_ms is None:
        parser.error("--apply needs --slo-p99-ms")
    if args.processes != 1:
        parser.error("sweep runs one load-generator process")
    settings = grid(
        [int(b) for b in args.batch_sizes.split(",")],
        [float(w) for w in args.wait_ms.split(",")],
        args.policies.split(","),
    )
    loads = parse_loads(args.concurrency, args.rate)
    corpus = load_corpus(args.corpus, args.workload)
    request = Request(args.endpoint, args.texts_per_request, model=args.model)

    def run(url: str) -> int:
        clients = aiohttp_transports(url)
        print(format_points([]))
        points = asyncio.run(
            sweep(clients, settings, loads, texts=corpus.texts, request=request,
                  duration_s=args.duration, warmup_s=args.warmup, progress=True,
                  on_point=lambda p: print(format_points([p]).splitlines()[1], flush=True))
        )  # fmt: skip
        best = recommend(points, args.slo_p99_ms) if args.slo_p99_ms is not None else None
        if args.slo_p99_ms is not None:
            if best is None:
                print(f"\nno setting met p99 <= {args.slo_p99_ms:g} ms without errors")
            else:
                print(f"\nrecommended for p99 <= {args.slo_p99_ms:g} ms: {best.setting} "
                      f"({best.result.throughput_rps:.1f} req/s, p99 {best.result.p99_ms:.0f} ms "
                      f"at {best.result.load})")  # fmt: skip
                if args.apply:
                    httpx.patch(f"{url}/admin/batching", json=best.setting).raise_for_status()
                    print("applied:", httpx.get(f"{url}/admin/batching").json())
        plot(points, args.png, args.slo_p99_ms, best)
        print(f"plot: {args.png}")
        if args.json:
            record = {
                "kind": "sweep",
                "url": url,
                "corpus": corpus.source,
                "command": environment.command_line(),
                "environment": environment.describe(),
                "slo_p99_ms": args.slo_p99_ms,
                "recommended": asdict(best) if best else None,
                "points": [asdict(p) for p in points],
            }
            with open(args.json, "w") as f:
                json.dump(record, f, indent=2)
        return 0 if best is not None or args.slo_p99_ms is None else 1

    if args.url:
        return run(args.url.rstrip("/"))
    log = Path(tempfile.mkdtemp(prefix="microbatch-sweep-")) / "server.log"
    with server(["server.cli", "serve", *shlex.split(args.serve_args)], log) as url:
        return run(url)
