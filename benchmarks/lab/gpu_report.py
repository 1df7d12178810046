"""`python -m benchmarks.lab.gpu_report DIR [--out NAME]`: the report of a `benchmarks/lab/gpu.sh`
run, written to NAME.md and NAME.png (default: DIR.md and DIR.png beside DIR), from the
files the run left in DIR:

- `environment.json`: the GPU, its driver, torch and CUDA versions (written by gpu.sh);
- `gpu-tests.log`: the output of `pytest -m gpu -q`;
- `ceiling.json`: `benchmarks.ceiling --json`, the raw loop with no HTTP and no queue;
- `compare/`: `benchmarks.compare --out-dir DIR --name compare` (naive vs microbatch);
- `workers-N.json`: `benchmarks.bench --json` against `microbatch serve --workers N`;
- `graphs.json`: the same against `microbatch serve --compile-mode reduce-overhead`;
- `no-collate-ahead.json`: the same against `microbatch serve --collate-ahead off`;
- `skipped.tsv`: the steps `--time-limit` skipped, and why (step, tab, reason).

A piece that is absent or unreadable is reported as missing, with the reason.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.ceiling import CeilingRow
from benchmarks.loadgen import StepResult
from benchmarks.runs import Run

RATIO_CLIENTS = 256
"""The load at which the servers' req/s is held against the ceiling."""
TARGET_RATIO = 0.8
COMPARE_SERVERS = ["microbatch adaptive", "microbatch window", "naive"]
"""The servers of a compare run that predates `servers` in its args.json."""

_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)")
_WORKERS_FILE = re.compile(r"workers-(\d+)\.json")


class Missing(Exception):
    """A piece of the run that is not in its directory, or cannot be read."""


@dataclass(frozen=True, slots=True)
class PytestSummary:
    """pytest's final line, e.g. `3 passed, 1 skipped, 40 deselected in 9.12s`, and its
    counts by outcome (`error` and `warning` in the singular)."""

    line: str
    counts: dict[str, int]

    def count(self, outcome: str) -> int:
        return self.counts.get(outcome, 0)


@dataclass(frozen=True, slots=True)
class Ceiling:
    """The raw loop's best row in one precision."""

    dtype: str
    batch_size: int
    order: str
    items_per_s: float


@dataclass(slots=True)
class GpuRun:
    """What a gpu.sh run left in its directory; `missing` says which pieces are not there
    and why."""

    directory: Path
    environment: dict[str, Any] = field(default_factory=dict)
    tests: PytestSummary | None = None
    ceiling: list[CeilingRow] = field(default_factory=list)
    compare: dict[str, Run] = field(default_factory=dict)
    workers: dict[int, Run] = field(default_factory=dict)
    graphs: Run | None = None
    """`serve --compile-mode reduce-overhead` (CUDA graphs), one process."""
    no_collate_ahead: Run | None = None
    """`serve --collate-ahead off`, one process: the device thread collates every batch."""
    missing: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    """gpu.sh's steps skipped for time (`--time-limit`): step -> why."""


_PIECE_OF_STEP = {"no-collate-ahead": "no_collate_ahead"}
"""gpu.sh's step names that are not the piece's name (`workers-N` are `workers`)."""


def parse_pytest_summary(log: str) -> PytestSummary | None:
    """The counts of pytest's final line (the last line that ends in `in <seconds>s`), or
    None when the log has no such line (pytest crashed or was killed)."""
    for raw in reversed(log.splitlines()):
        line = raw.strip().strip("=").strip()
        if re.search(r"\bin [\d.]+s\b", line):
            counts = {kind.removesuffix("s") if kind.startswith(("error", "warning")) else kind:
                      int(n) for n, kind in _COUNT.findall(line)}  # fmt: skip
            return PytestSummary(line, counts)
    return None


def _json(path: Path) -> Any:
    if not path.is_file():
        raise Missing(f"no {path.name}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise Missing(f"{path.name} is unreadable: {exc}") from exc


def _run(path: Path) -> Run:
    try:
        return Run.from_json(_json(path))
    except (KeyError, TypeError) as exc:
        raise Missing(f"{path.name} is not a benchmarks.bench --json file: {exc!r}") from exc


def _tests(directory: Path) -> PytestSummary:
    path = directory / "gpu-tests.log"
    if not path.is_file():
        raise Missing(f"no {path.name}")
    summary = parse_pytest_summary(path.read_text(errors="replace"))
    if summary is None:
        raise Missing(f"{path.name} has no pytest summary line; did pytest finish?")
    return summary


def _ceiling(directory: Path) -> list[CeilingRow]:
    record = _json(directory / "ceiling.json")
    try:
        rows = [CeilingRow(**row) for row in record["rows"]]
    except (KeyError, TypeError) as exc:
        raise Missing(f"ceiling.json is not a benchmarks.ceiling --json file: {exc!r}") from exc
    if not rows:
        raise Missing("ceiling.json has no rows")
    return rows


def _compare(directory: Path) -> dict[str, Run]:
    raw = directory / "compare"
    if not raw.is_dir():
        raise Missing("no compare/ directory")
    names = _json(raw / "args.json").get("servers", COMPARE_SERVERS)
    return {name: _run(raw / f"{name.replace(' ', '-')}.json") for name in names}


def _workers(directory: Path) -> dict[int, Run]:
    found = {int(m[1]): p for p in directory.iterdir() if (m := _WORKERS_FILE.fullmatch(p.name))}
    if not found:
        raise Missing("no workers-N.json")
    return {n: _run(found[n]) for n in sorted(found)}


def load(directory: Path) -> GpuRun:
    """Everything readable in `directory`; what is not goes to `missing`."""
    run = GpuRun(directory)
    readers: dict[str, Callable[[Path], object]] = {
        "environment": lambda d: _json(d / "environment.json"),
        "tests": _tests,
        "ceiling": _ceiling,
        "compare": _compare,
        "workers": _workers,
        "graphs": lambda d: _run(d / "graphs.json"),
        "no_collate_ahead": lambda d: _run(d / "no-collate-ahead.json"),
    }
    for piece, read in readers.items():
        try:
            setattr(run, piece, read(directory))
        except Missing as exc:
            run.missing[piece] = str(exc)
    skipped = directory / "skipped.tsv"
    if skipped.is_file():
        for line in skipped.read_text().splitlines():
            step, _, why = line.partition("\t")
            run.skipped[step] = why
            piece = "workers" if step.startswith("workers-") else _PIECE_OF_STEP.get(step, step)
            if piece in run.missing:
                run.missing[piece] = f"skipped for time: {why}"
    return run


def best_ceiling(rows: list[CeilingRow], dtype: str | None) -> Ceiling | None:
    """The fastest row in `dtype` (in any precision when that one was not measured)."""
    own = [r for r in rows if r.dtype == dtype] or rows
    if not own:
        return None
    best = max(own, key=lambda r: r.sequences_per_s)
    return Ceiling(best.dtype, best.batch_size, best.order, best.sequences_per_s)


def _dtype(run: Run) -> str | None:
    dtype = run.server.get("dtype")
    return str(dtype) if dtype is not None else None


def _closed(run: Run) -> dict[int, StepResult]:
    return {int(s.value): s for s in run.steps if s.kind == "closed"}


def _errors(statuses: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()) if k != "200") or "-"


def _missing(run: GpuRun, piece: str) -> list[str]:
    return [f"**missing** ({run.missing[piece]}).", ""]


def _header(run: GpuRun) -> list[str]:
    env = run.environment
    first = next(iter(run.workers.values()), None)
    fallback = first.environment if first else {}
    gpu = env.get("device") or env.get("gpu") or fallback.get("gpu") or "missing"
    torch = env.get("torch") or fallback.get("versions", {}).get("torch") or "missing"
    commit = env.get("git_commit") or fallback.get("git_commit") or "missing"
    created = env.get("created") or fallback.get("created") or "missing"
    lines = [
        f"# microbatch on {gpu}: front-end scaling against the raw GPU ceiling",
        "",
        f"GPU: {gpu} (driver {env.get('driver') or 'missing'}). torch {torch}, CUDA "
        f"{env.get('cuda') or 'missing'}. Commit {commit}, run {created}. Raw files: "
        f"`{run.directory.name}/`.",
        "",
        *(_missing(run, "environment") if "environment" in run.missing else []),
    ]
    model = (env.get("bundle") or {}).get("model")
    if model:
        lines += [
            f"Installed from a bundle (`benchmarks.lab.gpu_bundle`): the default model's weights "
            f"were carried as {model.get('weights')}; the lowest cosine of its embeddings to "
            f"the original's is {model.get('min_cosine_to_original')}.",
            "",
        ]
    if run.skipped:
        steps = ", ".join(f"`{step}`" for step in run.skipped)
        lines += [f"Skipped for time (`--time-limit`): {steps}.", ""]
    return lines


def _tests_section(run: GpuRun) -> list[str]:
    lines = ["## GPU tests (`pytest -m gpu`)", ""]
    if run.tests is None:
        return lines + _missing(run, "tests")
    t = run.tests
    counts = f"{t.count('passed')} passed, {t.count('failed')} failed, {t.count('skipped')} skipped"
    if t.count("error"):
        counts += f", {t.count('error')} errors"
    return [*lines, f"{counts} (`{t.line}`).", ""]


def _ceiling_section(run: GpuRun, dtype: str | None) -> list[str]:
    lines = ["## Raw GPU ceiling (tokenize + forward + pool; no HTTP, no queue)", ""]
    best = best_ceiling(run.ceiling, dtype)
    if best is None:
        return lines + _missing(run, "ceiling")
    lines.append(
        f"Best in {best.dtype} (the servers' precision): **{best.items_per_s:.1f} items/s** at "
        f"batch {best.batch_size} ({best.order})."
    )
    for other in sorted({r.dtype for r in run.ceiling} - {best.dtype}):
        b = best_ceiling(run.ceiling, other)
        if b is not None:
            lines.append(f"In {b.dtype}: {b.items_per_s:.1f} items/s at batch {b.batch_size} "
                         f"({b.order}).")  # fmt: skip
    return [*lines, ""]


def _workers_section(run: GpuRun) -> list[str]:
    lines = ["## Throughput and latency by front-end workers (`microbatch serve --workers N`)", ""]
    if not run.workers:
        return lines + _missing(run, "workers")
    lines += [
        "| workers | clients | req/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for n, bench in run.workers.items():
        for clients, s in sorted(_closed(bench).items()):
            lines.append(
                f"| {n} | {clients} | {s.throughput_rps:.1f} | {s.latency_ms['p50']:.1f} | "
                f"{s.latency_ms['p99']:.1f} | {_errors(s.statuses)} |"
            )
    return [*lines, ""]


def _ratio_section(run: GpuRun) -> list[str]:
    lines = [f"## {RATIO_CLIENTS} clients against the ceiling (target >= {TARGET_RATIO})", ""]
    if not run.workers:
        return lines + _missing(run, "workers")
    lines += [
        f"| workers | req/s at {RATIO_CLIENTS} clients | ceiling items/s | ratio | target met |",
        "|---|---|---|---|---|",
    ]
    for n, bench in run.workers.items():
        step = _closed(bench).get(RATIO_CLIENTS)
        best = best_ceiling(run.ceiling, _dtype(bench))
        req = f"{step.throughput_rps:.1f}" if step else f"missing (no {RATIO_CLIENTS}-client step)"
        top = f"{best.items_per_s:.1f}" if best else f"missing ({run.missing.get('ceiling')})"
        ratio, met = "missing", "-"
        if step and best and best.items_per_s > 0:
            value = step.throughput_rps / best.items_per_s
            ratio, met = f"{value:.2f}", "yes" if value >= TARGET_RATIO else "no"
        lines.append(f"| {n} | {req} | {top} | {ratio} | {met} |")
    return [*lines, ""]


def _one_setting(
    run: GpuRun,
    heading: str,
    runs: tuple[tuple[str, str, Run | None], tuple[str, str, Run | None]],
    note: str,
) -> list[str]:
    """Two one-process runs that differ in one setting, each given as (its name in the
    table, its piece of the run, the run): req/s and p99 by clients, and the ratio of the
    second's req/s to the first's."""
    lines = [heading, ""]
    (first, first_piece, a_run), (second, second_piece, b_run) = runs
    if a_run is None or b_run is None:
        return lines + _missing(run, first_piece if a_run is None else second_piece)
    a_steps, b_steps = _closed(a_run), _closed(b_run)
    lines += [
        note,
        "",
        f"| clients | {first} req/s | {second} req/s | ratio | {first} p99 ms | {second} p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for c in sorted(set(a_steps) & set(b_steps)):
        a, b = a_steps[c], b_steps[c]
        ratio = b.throughput_rps / a.throughput_rps if a.throughput_rps else 0.0
        lines.append(
            f"| {c} | {a.throughput_rps:.1f} | {b.throughput_rps:.1f} | {ratio:.2f} | "
            f"{a.latency_ms['p99']:.1f} | {b.latency_ms['p99']:.1f} |"
        )
    return [*lines, ""]


def _graphs_section(run: GpuRun) -> list[str]:
    return _one_setting(
        run,
        "## CUDA graphs against plain compile (`--compile-mode reduce-overhead`)",
        (("plain", "workers", run.workers.get(1)), ("graphs", "graphs", run.graphs)),
        "One process each (`--workers 1`); the ratio is CUDA graphs' req/s to plain "
        "compile's. Keep the mode the numbers support.",
    )


def _collate_section(run: GpuRun) -> list[str]:
    return _one_setting(
        run,
        "## Collating ahead against not (`--collate-ahead off`)",
        (
            ("off", "no_collate_ahead", run.no_collate_ahead),
            ("ahead", "workers", run.workers.get(1)),
        ),
        "One process each: `--collate-ahead off` (the device thread pads every batch "
        "itself) and `--workers 1` (on CUDA, a batch waiting for the device is padded into "
        "pinned memory on a second thread); the ratio is collating ahead's req/s to off's. "
        "Keep the default the numbers support.",
    )


def _compare_section(run: GpuRun) -> list[str]:
    lines = ["## Naive vs microbatch (`benchmarks.compare`, servers pinned to one CPU)", ""]
    if not run.compare:
        return lines + _missing(run, "compare")
    names = list(run.compare)
    steps = {name: _closed(r) for name, r in run.compare.items()}
    loads = sorted({c for s in steps.values() for c in s})
    lines += [
        "req/s by server:",
        "",
        "| clients | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for c in loads:
        cells = [f"{steps[n][c].throughput_rps:.1f}" if c in steps[n] else "-" for n in names]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    report = f"{run.directory.name}/compare.md"
    return [*lines, "", f"Its full report: [{report}]({report}).", ""]


def render(run: GpuRun, plot_name: str) -> str:
    """The markdown report of `run`, its plot referred to as `plot_name`."""
    dtype = next((d for r in run.workers.values() if (d := _dtype(r))), None)
    lines = [
        *_header(run),
        *_tests_section(run),
        *_ceiling_section(run, dtype),
        *_workers_section(run),
        *_ratio_section(run),
        f"![req/s against clients, by workers]({plot_name})",
        "",
        *_graphs_section(run),
        *_collate_section(run),
        *_compare_section(run),
    ]
    return "\n".join(lines)


def plot(run: GpuRun, path: Path) -> None:
    """req/s against clients, one line per workers count, and the ceiling (and the target,
    `TARGET_RATIO` of it) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ticks: set[int] = set()
    for n, bench in run.workers.items():
        closed = sorted(_closed(bench).items())
        ticks |= {c for c, _ in closed}
        ax.plot([c for c, _ in closed], [s.throughput_rps for _, s in closed], "o-",
                label=f"--workers {n}")  # fmt: skip
    dtype = next((d for r in run.workers.values() if (d := _dtype(r))), None)
    best = best_ceiling(run.ceiling, dtype)
    if best is not None:
        ax.axhline(best.items_per_s, color="black", linestyle="--",
                   label=f"raw GPU ceiling ({best.dtype}, batch {best.batch_size})")  # fmt: skip
        ax.axhline(TARGET_RATIO * best.items_per_s, color="grey", linestyle=":",
                   label=f"target: {TARGET_RATIO:g} x ceiling")  # fmt: skip
    if ticks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    missing = [f"{piece}: {why}" for piece, why in run.missing.items() if piece in ("workers",
               "ceiling")]  # fmt: skip
    if missing:
        ax.text(0.98, 0.02, "missing\n" + "\n".join(missing), transform=ax.transAxes,
                ha="right", va="bottom", fontsize=9, color="grey")  # fmt: skip
    ax.set_xlabel("closed-loop clients")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    ax.set_title(f"{run.environment.get('device') or run.directory.name}: req/s by workers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lab.gpu_report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", type=Path, help="the results directory of a gpu.sh run")
    parser.add_argument("--out", help="write OUT.md and OUT.png (default: DIR.md and DIR.png)")
    args = parser.parse_args(argv)
    directory: Path = args.directory
    if not directory.is_dir():
        parser.error(f"{directory} is not a directory (a benchmarks/lab/gpu.sh results directory)")
    out = args.out or str(directory.parent / directory.name)
    run = load(directory)
    plot_path = Path(f"{out}.png")
    plot(run, plot_path)
    report = Path(f"{out}.md")
    report.write_text(render(run, plot_path.name))
    print(f"wrote {report} and {plot_path}")
    for piece, why in run.missing.items():
        print(f"missing {piece}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
