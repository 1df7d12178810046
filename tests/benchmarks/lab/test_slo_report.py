"""The step-load SLO benchmark's arithmetic and report, from made-up outcomes."""

from __future__ import annotations

import pytest

from benchmarks.lab.slo import Arm, Outcome, parse, phase_rows, rate_schedule, render, windows


def arm_with(latency_ms_by_phase: list[float], phase_s: float = 10.0, rps: int = 10) -> Arm:
    arm = Arm("microbatch", "--torch-threads 1")
    for phase, latency_ms in enumerate(latency_ms_by_phase):
        for i in range(int(phase_s * rps)):
            sent_at = phase * phase_s + i / rps
            arm.outcomes.append(Outcome(sent_at, latency_ms / 1e3, 200))
    arm.outcomes.append(Outcome(phase_s + 0.05, 1.0, 429))  # one refusal in phase 2
    return arm


def test_the_schedule_steps_through_the_phases_and_holds_the_last() -> None:
    rate = rate_schedule(200.0, 10.0, (0.25, 0.75, 0.25))
    assert [rate(t) for t in (0, 9.9, 10, 25, 35)] == [50, 50, 150, 50, 50]


def test_windows_and_phases_count_only_answered_requests() -> None:
    arm = arm_with([20, 200, 20])
    rows = phase_rows(arm, 40.0, 10.0, target_ms=100, phases=(0.25, 0.75, 0.25))
    assert [r["p99_ms"] for r in rows] == pytest.approx([20, 200, 20])
    assert [r["errors"] for r in rows] == [0, 1, 0]
    assert [r["windows_met"] for r in rows] == [1.0, 0.0, 1.0]
    assert rows[1]["served_rps"] == pytest.approx(10.0)
    assert rows[1]["rate_rps"] == pytest.approx(30.0)
    assert len(windows(arm)) == 15


def test_the_report_names_each_server_phase_and_change() -> None:
    plain, controlled = arm_with([20, 200, 20]), arm_with([20, 90, 20])
    controlled.name = "microbatch --slo-p99-ms 100"
    controlled.adjustments = {"tighten": 2.0, "loosen": 1.0, "back_off": 0.0}
    controlled.limits = [(0.0, 32, 50.0, None), (1.0, 32, 25.0, 80.0)]
    report = {
        "name": "test", "command": "python -m benchmarks.lab.slo", "slo_p99_ms": 100.0,
        "capacity_rps": 40.0, "phases": [0.25, 0.75, 0.25], "phase_s": 10.0,
        "server_args": "--torch-threads 1", "plot": "test.png",
        "arms": [
            {"name": a.name, "adjustments": a.adjustments, "limits": a.limits,
             "phases": phase_rows(a, 40.0, 10.0, 100.0, (0.25, 0.75, 0.25))}
            for a in (plain, controlled)
        ],
    }  # fmt: skip
    text = render(report)
    assert "| microbatch | 2 | 75% | 30.0 | 10.0 | 1 | 200.0 | 200.0 | 0% |" in text
    assert "| microbatch --slo-p99-ms 100 | 2 | 75% |" in text
    assert "loosen 1, tighten 2" in text
    assert "max_batch_size 32, max_wait_ms 25; max_batch_size 32, max_wait_ms 50" in text
    assert "![p99 per 2-s window](test.png)" in text


def test_the_arguments_need_a_target() -> None:
    args = parse(["--slo-p99-ms", "60", "--phases", "0.2,0.8"])
    assert args.phases == [0.2, 0.8]
    with pytest.raises(SystemExit):
        parse([])
