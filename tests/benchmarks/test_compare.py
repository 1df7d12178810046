"""The comparison's schedule: every load on every server back to back, order rotating."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from benchmarks import compare
from benchmarks.loadgen import Load
from benchmarks.runs import Run


def test_each_load_runs_on_every_server_and_each_server_leads_in_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    measured: list[tuple[str, str, str | None]] = []
    policy: dict[str, str | None] = {"now": None}

    def fake_patch(url: str, json: dict[str, Any]) -> Any:
        policy["now"] = json["policy"]
        return type("Reply", (), {"raise_for_status": lambda self: None})()

    def fake_bench(url: str, loads: list[Load], label: str, args: object) -> Run:
        measured.append((label, str(loads[0]), policy["now"] if "microbatch" in url else None))
        return Run(label, url, "/predict", "c", 1, 0, 1, [], {}, {}, steps=[])

    monkeypatch.setattr("benchmarks.compare.httpx.patch", fake_patch)
    monkeypatch.setattr(compare, "run_bench", fake_bench)
    targets = {
        "microbatch adaptive": ("http://microbatch", "adaptive"),
        "microbatch window": ("http://microbatch", "window"),
        "naive": ("http://naive", None),
    }
    loads = [Load("closed", c) for c in (1, 4, 16)]
    runs = compare.interleaved(targets, loads, argparse.Namespace())

    assert set(runs) == set(targets)
    for i, load in enumerate(loads):
        block = measured[3 * i : 3 * i + 3]
        assert {label for label, _, _ in block} == set(targets)
        assert {step for _, step, _ in block} == {str(load)}
    assert [block[0] for block in measured[::3]] == list(targets)  # each leads once
    for label, _, live_policy in measured:  # the policy was set before each of its steps
        if label.startswith("microbatch"):
            assert live_policy == label.split()[1]
