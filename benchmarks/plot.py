"""`microbatch plot RESULT.json... -o curve.png`: throughput against latency, one curve
per run (a `microbatch bench --json` file), e.g. window vs adaptive, or before vs after."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.runs import show_defaults


def load_run(path: str) -> dict[str, Any]:
    run: dict[str, Any] = json.loads(Path(path).read_text())
    if "steps" not in run:
        raise ValueError(f"{path} is not a `microbatch bench --json` file (no 'steps')")
    return run


def plain_log_axis(ax: Any) -> None:
    """A log latency axis with plain numbers (50, 100, 200, not 10^2), and room inside
    the frame for the labels of the points at its edges."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda _y, _pos: ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.12, y=0.12)


def plot_runs(runs: list[dict[str, Any]], labels: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (closed_ax, open_ax) = plt.subplots(1, 2, figsize=(12, 5))
    for run, label in zip(runs, labels, strict=True):
        for kind, ax in (("closed", closed_ax), ("open", open_ax)):
            steps = [s for s in run["steps"] if s["kind"] == kind]
            if not steps:
                continue
            x = [s["throughput_rps"] for s in steps]
            (line,) = ax.plot(
                x, [s["latency_ms"]["p99"] for s in steps], "o-", label=f"{label} p99"
            )
            ax.plot(x, [s["latency_ms"]["p50"] for s in steps], "x:", color=line.get_color(),
                    label=f"{label} p50")  # fmt: skip
            for s, xi in zip(steps, x, strict=True):
                ax.annotate(s["load"], (xi, s["latency_ms"]["p99"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points",
                            annotation_clip=True)  # fmt: skip
    for ax, name in ((closed_ax, "closed loop (N clients)"), (open_ax, "open loop (Poisson rate)")):
        ax.set_title(name)
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel("latency (ms)")
        plain_log_axis(ax)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="microbatch plot", description=__doc__)
    parser.add_argument("results", nargs="+", help="microbatch bench --json files")
    parser.add_argument("-o", "--output", default="curve.png")
    parser.add_argument("--title", default="throughput vs latency")
    args = show_defaults(parser).parse_args(argv)
    runs = [load_run(p) for p in args.results]
    labels = [r.get("label") or Path(p).stem for r, p in zip(runs, args.results, strict=True)]
    plot_runs(runs, labels, args.output, args.title)
    print(args.output)
    return 0
