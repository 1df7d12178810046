"""`microbatch bench URL`: throughput and latency at each load, with what the server did.

microbatch bench http://127.0.0.1:8000 --concurrency 1,4,16,64
microbatch bench http://127.0.0.1:8000 --rate 25,50 --json run.json --csv run.csv --png run.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from benchmarks.loadgen import Request, StepResult
from benchmarks.runs import (
    add_load_arguments,
    bench,
    format_table,
    load_corpus,
    parse_loads,
    show_defaults,
    write_csv,
)


def print_step(step: StepResult) -> None:
    """The step's row of the table, and its latencies by kind of text, if any."""
    print(format_table([step]).splitlines()[1], flush=True)
    for kind, ms in step.latency_ms_by_kind.items():
        line = (
            f"{'':>12} {kind}: {ms['requests']:.0f} requests, p50 {ms['p50']:.1f} ms, "
            f"p90 {ms['p90']:.1f}, p99 {ms['p99']:.1f}, max {ms['max']:.1f}"
        )
        print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="microbatch bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url", nargs="?", help="server to load, e.g. http://127.0.0.1:8000")
    add_load_arguments(parser)
    parser.add_argument("--label", default="", help="name of this run in tables and plots")
    parser.add_argument("--json", help="write the run (settings, environment, steps) here")
    parser.add_argument("--csv", help="write one row per step here")
    parser.add_argument("--png", help="plot throughput against latency for this run here")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="run naive server, microbatch and the ceiling on this machine and write "
        "benchmarks/results/<hardware>-<date>.md (see python -m benchmarks.compare --help)",
    )
    argv = sys.argv[1:] if argv is None else argv
    if "--compare" in argv:  # everything else is compare's (see its --help)
        from benchmarks import compare

        return compare.main([a for a in argv if a != "--compare"])
    args = show_defaults(parser).parse_args(argv)
    if not args.url:
        parser.error("a URL is required (or --compare)")
    corpus = load_corpus(args.corpus, args.workload)
    request = Request(args.endpoint, args.texts_per_request, model=args.model)
    print(format_table([]))
    run = asyncio.run(
        bench(
            args.url.rstrip("/"),
            parse_loads(args.concurrency, args.rate),
            texts=corpus.texts,
            corpus_source=corpus.source,
            request=request,
            duration_s=args.duration,
            warmup_s=args.warmup,
            kinds=corpus.kinds,
            processes=args.processes,
            label=args.label,
            progress=True,
            on_step=print_step,
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(run.to_json(), f, indent=2)
    if args.csv:
        write_csv(run, args.csv)
    if args.png:
        from benchmarks.plot import plot_runs

        plot_runs([run.to_json()], [run.label], args.png, f"microbatch bench: {run.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
