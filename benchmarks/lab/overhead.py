"""The server's own cost per request: microbatch with a model that costs nothing, against
a bare FastAPI endpoint returning the same JSON (`benchmarks/trivial.py`), same pinning,
same load, the two alternating round by round. Optionally profiles microbatch (py-spy).

    python -m benchmarks.lab.overhead --concurrency 1,64 --rounds 3 --profile \\
        --report benchmarks/results/overhead-cpu-2core-DATE.md
    python -m benchmarks.lab.overhead --serve --port 8003      # just the zero-cost server
    python -m benchmarks.lab.overhead --concurrency 1,64 --front-end   # and one front-end

`--front-end` adds a third server: one front-end process of `microbatch serve
--workers` (on CPU 0, as the others) on an engine process with the null model (on
CPU 1, beside the load generator: it costs about 20 us per item there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks import environment
from benchmarks.compare import CLIENT_CPU, SERVER_CPU, run_bench
from benchmarks.lab.null_model import NullModel
from benchmarks.loadgen import Load, StepResult
from benchmarks.processes import pin, server
from benchmarks.trivial import EMBEDDING


def null_model(packed_outputs: bool = False) -> NullModel:
    """The model that costs nothing: every text embedded as the bare server's 384 floats.
    `packed_outputs`: as a real model's in an engine process (float32 bytes)."""
    return NullModel(embedding=EMBEDDING, packed_outputs=packed_outputs)


def serve(port: int) -> None:
    """Run microbatch on the null model, with the uvicorn settings `microbatch serve` uses."""
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    settings = Settings(port=port)
    app = create_app(settings, model=null_model())
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=settings.access_log,
                timeout_keep_alive=settings.keep_alive_s)  # fmt: skip


def serve_front_end(port: int) -> None:
    """One front-end of `microbatch serve --workers` on the null model, its engine
    process (the null model, packed outputs as a real model's) on the load's CPU."""
    import multiprocessing

    import uvicorn

    from batcher.remote import socket_dir
    from server.app import create_app
    from server.settings import Settings

    settings = Settings(port=port)
    path = os.path.join(socket_dir(), "engine.sock")
    context = multiprocessing.get_context("spawn")
    engine = context.Process(target=_null_engine, args=(settings, path, os.getpid()))
    engine.start()
    app = create_app(settings, engine_path=path)
    try:
        uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                    log_level="warning", access_log=settings.access_log,
                    timeout_keep_alive=settings.keep_alive_s)  # fmt: skip
    finally:
        engine.terminate()
        engine.join()


def _null_engine(settings: Any, path: str, parent: int) -> None:
    from server import engine_process

    pin(CLIENT_CPU)
    engine_process.run(settings, path, parent, null_model(packed_outputs=True))


BARE, OURS, FRONT = "bare FastAPI", "microbatch, null model", "one front-end, null model"


@dataclass
class Pair:
    """One round at one load: the servers measured back to back."""

    load: str
    bare: StepResult
    ours: StepResult
    front: StepResult | None = None
    cpu_us: dict[str, float] = field(default_factory=dict)
    """Each server process's CPU per request answered, microseconds (warm-up included,
    at the same load): what its req/s would be on a core of its own is 1e6 / this."""

    @property
    def ratio(self) -> float:
        return self.ours.throughput_rps / self.bare.throughput_rps

    @property
    def front_ratio(self) -> float | None:
        return None if self.front is None else self.front.throughput_rps / self.bare.throughput_rps


def measure(urls: dict[str, str], loads: list[Load], args: argparse.Namespace) -> list[Pair]:
    """Each load `rounds` times, the servers alternating (ABBA..., or rotating among
    three), so that a drift of the host's speed hits them alike."""
    pairs = []
    names = list(urls)
    pids = {name: _server_pid(url) for name, url in urls.items()}
    for load in loads:
        for round_ in range(args.rounds):
            if len(names) == 2:
                order = names if round_ % 2 == 0 else names[::-1]
            else:
                order = names[round_ % len(names) :] + names[: round_ % len(names)]
            steps, cpu_us = {}, {}
            for name in order:
                before = _cpu_s(pids[name])
                steps[name] = run_bench(urls[name], [load], name, args).steps[0]
                measured = args.duration / (args.duration + args.warmup)
                spent = (_cpu_s(pids[name]) - before) * measured
                cpu_us[name] = round(spent / max(1, steps[name].ok) * 1e6, 1)
            pairs.append(Pair(str(load), steps[BARE], steps[OURS], steps.get(FRONT), cpu_us))
    return pairs


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(pairs: list[Pair]) -> list[dict[str, Any]]:
    """Per load: the median of each server's rounds, and the range of the round ratios."""
    rows = []
    for load in dict.fromkeys(p.load for p in pairs):
        mine = [p for p in pairs if p.load == load]
        bare = statistics.median(p.bare.throughput_rps for p in mine)
        ours = statistics.median(p.ours.throughput_rps for p in mine)
        rows.append(
            {
                "load": load,
                "bare_rps": round(bare, 1),
                "ours_rps": round(ours, 1),
                "ratio": round(ours / bare, 3),
                "round_ratios": [round(p.ratio, 3) for p in mine],
                "bare_p50_ms": statistics.median(p.bare.latency_ms["p50"] for p in mine),
                "ours_p50_ms": statistics.median(p.ours.latency_ms["p50"] for p in mine),
                "bare_p99_ms": statistics.median(p.bare.latency_ms["p99"] for p in mine),
                "ours_p99_ms": statistics.median(p.ours.latency_ms["p99"] for p in mine),
                "cpu_us": {
                    name: statistics.median(p.cpu_us[name] for p in mine) for name in mine[0].cpu_us
                },
            }
        )
        fronts = [p.front for p in mine if p.front is not None]
        if fronts:
            front = statistics.median(f.throughput_rps for f in fronts)
            rows[-1].update(
                {
                    "front_rps": round(front, 1),
                    "front_ratio": round(front / bare, 3),
                    "front_round_ratios": [round(p.front_ratio or 0.0, 3) for p in mine],
                    "front_p50_ms": statistics.median(f.latency_ms["p50"] for f in fronts),
                    "front_p99_ms": statistics.median(f.latency_ms["p99"] for f in fronts),
                }
            )
    return rows


def render(
    rows: list[dict[str, Any]],
    steal: float | None,
    profile: str | None,
    encoding_format: str | None = None,
) -> str:
    env = environment.describe()
    vectors = encoding_format or "float"
    lines = [
        f"# Server overhead: {env['cpu']} ({env['cpu_count']} CPUs), {date.today()}",
        "",
        "microbatch serving a model that costs nothing (`NullModel`: the same 384 floats "
        "for every text, at once) against a bare FastAPI endpoint returning the same JSON "
        "(`benchmarks/trivial.py`). Both servers on CPU 0, uvloop + httptools; the load "
        f"generator on CPU 1. Commit {env['git_commit']}. CPU time stolen by the hypervisor "
        f"during the run: {steal} %. microbatch sends its vectors as `{vectors}` "
        "(`--encoding-format`); the bare server always sends JSON floats.",
        "",
        "Each load was measured several rounds, the two servers alternating, and the "
        "table gives the median of each; the last column is the ratio of every round.",
        "",
        "| load | bare FastAPI req/s | microbatch req/s | ratio | p50 ms bare / ours "
        "| p99 ms bare / ours | ratio per round |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['load']} | {r['bare_rps']:.0f} | {r['ours_rps']:.0f} | {r['ratio']:.2f}x "
            f"| {r['bare_p50_ms']:.2f} / {r['ours_p50_ms']:.2f} "
            f"| {r['bare_p99_ms']:.2f} / {r['ours_p99_ms']:.2f} "
            f"| {', '.join(f'{x:.2f}' for x in r['round_ratios'])} |"
        )
    fronts = [r for r in rows if "front_rps" in r]
    if fronts:
        lines += [
            "",
            "One front-end process of `microbatch serve --workers` (CPU 0, as the others), "
            "its engine process with the null model on CPU 1 beside the load generator; "
            "the ratio is to the same rounds' bare FastAPI:",
            "",
            "| load | bare FastAPI req/s | one front-end req/s | ratio "
            "| p50 ms | p99 ms | ratio per round |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in fronts:
            lines.append(
                f"| {r['load']} | {r['bare_rps']:.0f} | {r['front_rps']:.0f} "
                f"| {r['front_ratio']:.2f}x | {r['front_p50_ms']:.2f} | {r['front_p99_ms']:.2f} "
                f"| {', '.join(f'{x:.2f}' for x in r['front_round_ratios'])} |"
            )
    if any(r.get("cpu_us") for r in rows):
        lines += [
            "",
            "Each server process's CPU per request answered (median of the rounds, warm-up "
            "included): the req/s it would serve on a core of its own, whatever else "
            "limited the run; the ratio is bare FastAPI's CPU per request to this one's.",
            "",
            "| load | server | CPU µs per request | bare / this |",
            "|---|---|---|---|",
        ]
        for r in rows:
            cpu = r.get("cpu_us") or {}
            for name, us in cpu.items():
                ratio = cpu[BARE] / us if us else 0.0
                lines.append(f"| {r['load']} | {name} | {us:.0f} | {ratio:.2f}x |")
    lines += ["", "Reproduce:", "", "```bash", "python -m " + " ".join(
        ["benchmarks.lab.overhead", *environment.command_line()[1:]]), "```"]  # fmt: skip
    if profile:
        lines += ["", "## Where the microbatch server's time goes (py-spy, all rounds)", "",
                  "```", profile.rstrip(), "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lab.overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--serve", action="store_true", help="only run the null-model server")
    parser.add_argument(
        "--serve-front-end", action="store_true",
        help="only run one front-end on a null-model engine process",
    )  # fmt: skip
    parser.add_argument(
        "--front-end", action="store_true",
        help="also measure one front-end of --workers on a null-model engine process",
    )  # fmt: skip
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="measure each load this many times, the servers alternating (default 3)",
    )  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="profile our server with py-spy")
    parser.add_argument(
        "--encoding-format", choices=["float", "base64"],
        help="ask microbatch for vectors in this encoding (the bare server always sends floats)",
    )  # fmt: skip
    parser.add_argument("--report", help="write the markdown report (and a .json beside it)")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.port)
        return 0
    if args.serve_front_end:
        serve_front_end(args.port)
        return 0
    pin(CLIENT_CPU)
    loads = [Load("closed", int(c)) for c in args.concurrency.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="microbatch-overhead-"))
    cpu_before = environment.cpu_times()
    with contextlib.ExitStack() as stack:
        bare_url = stack.enter_context(
            server(["benchmarks.trivial"], logs / "trivial.log", cpu=SERVER_CPU)
        )
        url = stack.enter_context(
            server(["benchmarks.lab.overhead", "--serve"], logs / "null.log", cpu=SERVER_CPU)
        )
        urls = {BARE: bare_url, OURS: url}
        if args.front_end:
            front = ["benchmarks.lab.overhead", "--serve-front-end"]
            urls[FRONT] = stack.enter_context(server(front, logs / "front.log", cpu=SERVER_CPU))
        profiler = _start_profiler(url, logs / "profile.txt") if args.profile else None
        pairs = measure(urls, loads, args)
        profile = None
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
            profiler.wait(timeout=120)
            profile = top_functions(logs / "profile.txt")
    steal = environment.steal_percent(cpu_before, environment.cpu_times())
    rows = summary(pairs)
    report = render(rows, steal, profile, args.encoding_format)
    print("\n" + report)
    if args.report:
        Path(args.report).write_text(report)
        record = {"summary": rows, "cpu_steal_percent": steal, "environment":
                  environment.describe(), "command": environment.command_line(),
                  "pairs": [asdict(p) for p in pairs]}  # fmt: skip
        Path(args.report).with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


def _start_profiler(url: str, out: Path) -> subprocess.Popen[bytes] | None:
    if not shutil.which("py-spy"):
        print("py-spy is not installed; no profile", file=sys.stderr)
        return None
    return subprocess.Popen(
        ["py-spy", "record", "--pid", str(_server_pid(url)), "--format", "raw", "--rate", "200",
         "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _server_pid(url: str) -> int:
    """The server process on `url`'s port (a front-end's, not its engine process's)."""
    port = url.rsplit(":", 1)[1]
    pattern = rf"benchmarks\.(trivial|lab\.overhead)( --serve| --serve-front-end)? --port {port}$"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


_PREFIX = re.compile(
    r"\((?:[^()]*/site-packages/|[^()]*/lib/python3\.\d+/|[^()]*/(?=(?:batcher|server|benchmarks)/))"
)


def _relative(frame: str) -> str:
    """`f (/any/where/site-packages/pkg/x.py:3)` -> `f (pkg/x.py:3)`: no local paths."""
    return _PREFIX.sub("(", frame)


def top_functions(raw_profile: Path, limit: int = 25) -> str:
    """Self time by function from py-spy's raw (collapsed stacks) output."""
    totals: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    samples = 0
    for line in raw_profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        frames = [_relative(frame) for frame in stack.split(";")]
        leaf = frames[-1]
        totals[leaf] = totals.get(leaf, 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    rows = [f"{samples} samples\n", "self %  function (file:line)"]
    for frame, n in sorted(totals.items(), key=lambda kv: -kv[1])[:limit]:
        rows.append(f"{100 * n / samples:5.1f}  {frame}")
    rows += ["", "inclusive %  function"]
    for frame, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:limit]:
        rows.append(f"{100 * n / samples:5.1f}  {frame}")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
