"""The overhead benchmark's arithmetic: medians over alternating rounds, and the ratio."""

from __future__ import annotations

from benchmarks.lab.overhead import Pair, render, summary
from benchmarks.loadgen import StepResult


def step(rps: float, p50: float = 1.0, p99: float = 2.0) -> StepResult:
    return StepResult(
        load="64 clients", kind="closed", value=64, duration_s=10, requests=int(rps * 10),
        ok=int(rps * 10), throughput_rps=rps, latency_ms={"p50": p50, "p99": p99},
        statuses={"200": int(rps * 10)}, server={},
    )  # fmt: skip


def test_summary_takes_each_servers_median_and_keeps_every_rounds_ratio() -> None:
    pairs = [
        Pair("64 clients", step(1000), step(600)),
        Pair("64 clients", step(2000), step(700)),  # a fast spell of the host
        Pair("64 clients", step(1100), step(500)),
    ]
    [row] = summary(pairs)
    assert (row["bare_rps"], row["ours_rps"]) == (1100, 600)
    assert row["ratio"] == round(600 / 1100, 3)
    assert row["round_ratios"] == [0.6, 0.35, round(500 / 1100, 3)]


def test_the_report_has_one_row_per_load_and_the_command() -> None:
    rows = summary(
        [Pair("1 client", step(900), step(600)), Pair("64 clients", step(3000), step(1800))]
    )
    report = render(rows, steal=12.5, profile="10 samples\n")
    assert "| 1 client | 900 | 600 | 0.67x |" in report
    assert "| 64 clients | 3000 | 1800 | 0.60x |" in report
    assert "12.5 %" in report
    assert "python -m benchmarks.lab.overhead" in report
