"""How many torch threads a server should use on a small machine: microbatch once per
`--torch-threads` count, nothing pinned (the server may use every CPU, and the load
generator runs beside it, as on a small box serving its neighbours), each load run on
every server back to back in a rotating order. The question it answers: does leaving a
core to the event loop (HTTP, tokenization, JSON) beat giving torch every core?

    python -m benchmarks.lab.threads --threads 1,2 --concurrency 1,64 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import tempfile
from datetime import date
from pathlib import Path

from benchmarks.compare import Target, interleaved, ratio
from benchmarks.loadgen import Load
from benchmarks.processes import server
from benchmarks.runs import Run


def report(runs: dict[str, Run], args: argparse.Namespace) -> str:
    names = list(runs)
    first = runs[names[0]]
    env = first.environment
    lines = [
        f"# torch threads on {env['cpu']} ({env['cpu_count']} CPUs), {date.today()}",
        "",
        f"microbatch `{' '.join(['serve', args.serve_args]).strip()}` with each "
        "`--torch-threads`, nothing pinned; "
        f"the load generator on the same CPUs. {args.duration:g} s per step after "
        f"{args.warmup:g} s warm-up, {args.rounds} round(s), the servers' order rotating. "
        f"Commit {env['git_commit']}.",
        "",
        f"| load | round | server | req/s | p50 ms | p99 ms | mean batch | vs {names[0]} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, step in enumerate(first.steps):
        for name in names:
            s = runs[name].steps[i]
            batch = f"{s.server['mean_batch_size']:.1f}" if s.server else "-"
            lines.append(
                f"| {step.load} | {i // (len(first.steps) // args.rounds) + 1} | {name} | "
                f"{s.throughput_rps:.1f} | {s.latency_ms['p50']:.1f} | "
                f"{s.latency_ms['p99']:.1f} | {batch} | "
                f"{ratio(s.throughput_rps, step.throughput_rps)} |"
            )
    lines += ["", "```bash", f"python -m benchmarks.lab.threads {shlex.join(sys.argv[1:])}", "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lab.threads",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", default="1,2", help="comma-separated --torch-threads")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--serve-args", default="", help="extra flags for microbatch serve")
    parser.add_argument("--out", help="write the report (and a JSON beside it) here")
    args = parser.parse_args(argv)
    loads = [Load("closed", int(c)) for c in args.concurrency.split(",")] * args.rounds
    logs = Path(tempfile.mkdtemp(prefix="microbatch-threads-"))
    with contextlib.ExitStack() as stack:
        targets: dict[str, Target] = {}
        for count in args.threads.split(","):
            serve = ["server.cli", "serve", *shlex.split(args.serve_args), "--torch-threads", count]
            url = stack.enter_context(server(serve, logs / f"threads-{count}.log"))
            targets[f"{count} torch thread(s)"] = Target(url)
        runs = interleaved(targets, loads, args)
    text = report(runs, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        record = {name: run.to_json() for name, run in runs.items()}
        Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
