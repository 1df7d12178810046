"""The comparison's schedule: every load on every server back to back, order rotating."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
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

    def fake_bench(
        url: str, loads: list[Load], label: str, args: object, request: object = None
    ) -> Run:
        measured.append((label, str(loads[0]), policy["now"] if "microbatch" in url else None))
        return Run(label, url, "/predict", "c", 1, 0, 1, [], {}, {}, steps=[])

    monkeypatch.setattr("benchmarks.compare.httpx.patch", fake_patch)
    monkeypatch.setattr(compare, "run_bench", fake_bench)
    targets = {
        "microbatch adaptive": compare.Target("http://microbatch", {"policy": "adaptive"}),
        "microbatch window": compare.Target("http://microbatch", {"policy": "window"}),
        "naive": compare.Target("http://naive"),
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


def test_the_report_puts_each_precision_beside_its_accuracy(tmp_path: Path) -> None:
    """A saved run (the JSON a compare run leaves) re-rendered with a second precision:
    the report's precision table has its speed, its ratio to float32 and its cosines."""
    saved = Path("benchmarks/results/cpu-2core-2026-12-01-after-house-final")
    raw = tmp_path / saved.name
    shutil.copytree(saved, raw)
    adaptive = json.loads((raw / "microbatch-adaptive.json").read_text())
    (raw / "microbatch-float32.json").write_text(json.dumps(adaptive))  # float32, as it ran
    adaptive["server"]["dtype"] = "bfloat16"
    for step in adaptive["steps"]:
        step["throughput_rps"] *= 2
    (raw / "microbatch-adaptive.json").write_text(json.dumps(adaptive))
    args = json.loads((raw / "args.json").read_text())
    args["servers"] = ["microbatch adaptive", "microbatch window", "naive", "microbatch float32"]
    (raw / "args.json").write_text(json.dumps(args))
    ceiling = json.loads((raw / "ceiling.json").read_text())
    ceiling["rows"] += [{**r, "dtype": "bfloat16"} for r in ceiling["rows"]]
    ceiling["accuracy"] = [
        {"dtype": "float32", "texts": 2000, "worst_cosine": 1.0, "p1_cosine": 1.0,
         "mean_cosine": 1.0},
        {"dtype": "bfloat16", "texts": 2000, "worst_cosine": 0.99987, "p1_cosine": 0.99991,
         "mean_cosine": 0.999951},
    ]  # fmt: skip
    (raw / "ceiling.json").write_text(json.dumps(ceiling))

    compare.render(raw, argparse.Namespace())

    report = (tmp_path / f"{saved.name}.md").read_text()
    table = report.split("## Precision: speed beside accuracy")[1].split("## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| float32 |")
            or line.startswith("| bfloat16 |")]  # fmt: skip
    assert rows[0].startswith("| float32 | 106.4 | 87.3 | 1.00x |")
    assert rows[1].startswith("| bfloat16 | 106.4 | 174.7 | 2.00x |")
    assert rows[1].endswith("| 0.99987 | 0.99991 | 0.999951 |")
    assert "microbatch serve --torch-threads 1 --dtype float32" in report
    assert "benchmarks.ceiling --torch-threads 1 --dtypes float32,bfloat16" in report
    assert (tmp_path / f"{saved.name}.png").stat().st_size > 0


def test_the_report_puts_microbatch_beside_the_peer_load_by_load(tmp_path: Path) -> None:
    """A saved run re-rendered with a peer's runs (as `--peer-venv` leaves them): the
    report's peer table has microbatch's ratios to it, load by load."""
    saved = Path("benchmarks/results/cpu-2core-2026-12-01-after-house-final")
    raw = tmp_path / saved.name
    shutil.copytree(saved, raw)
    adaptive = json.loads((raw / "microbatch-adaptive.json").read_text())
    peer = json.loads((raw / "naive.json").read_text())
    peer["label"], peer["endpoint"] = "infinity bfloat16", "/embeddings"
    for step in peer["steps"]:
        step["throughput_rps"] /= 2
    (raw / "infinity-bfloat16.json").write_text(json.dumps(peer))
    args = json.loads((raw / "args.json").read_text())
    args["servers"] = ["microbatch adaptive", "microbatch window", "naive", "infinity bfloat16"]
    (raw / "args.json").write_text(json.dumps(args))

    compare.render(raw, argparse.Namespace())

    report = (tmp_path / f"{saved.name}.md").read_text()
    table = report.split("## Against the peer")[1].split("## ")[0]
    rows = [line for line in table.splitlines() if "| infinity bfloat16 |" in line]
    assert len(rows) == len(adaptive["steps"])
    first, theirs = adaptive["steps"][0], peer["steps"][0]
    want = first["throughput_rps"] / theirs["throughput_rps"]
    assert rows[0].startswith(f"| {first['load']} | infinity bfloat16 | {want:.2f}x |")
    assert "| infinity bfloat16 |" in report.split("## Throughput and latency")[1]


def test_a_settings_variant_runs_on_the_same_server_and_gets_its_own_table(
    tmp_path: Path,
) -> None:
    """`--variant LABEL=JSON`: a saved run re-rendered with a variant's run: the report
    has its ratios to the defaults and the PATCH that reproduces it, and the variant is
    not mistaken for a precision."""
    label, body = compare.parse_variant('unbounded={"max_overtakes": null}')
    assert (label, body) == ("unbounded", {"max_overtakes": None})
    with pytest.raises(argparse.ArgumentTypeError):
        compare.parse_variant("no-json")
    saved = Path("benchmarks/results/cpu-2core-2026-12-01-after-house-final")
    raw = tmp_path / saved.name
    shutil.copytree(saved, raw)
    adaptive = json.loads((raw / "microbatch-adaptive.json").read_text())
    variant = json.loads(json.dumps(adaptive))
    for step in variant["steps"]:
        step["throughput_rps"] /= 2
    (raw / "microbatch-unbounded.json").write_text(json.dumps(variant))
    args = json.loads((raw / "args.json").read_text())
    args["servers"] = ["microbatch adaptive", "microbatch window", "naive", "microbatch unbounded"]
    args["variants"] = {label: body}
    (raw / "args.json").write_text(json.dumps(args))

    compare.render(raw, argparse.Namespace())

    report = (tmp_path / f"{saved.name}.md").read_text()
    table = report.split("## Settings variants")[1].split("## ")[0]
    rows = [line for line in table.splitlines() if "| unbounded |" in line]
    assert len(rows) == len(adaptive["steps"])
    assert rows[0].startswith(f"| {adaptive['steps'][0]['load']} | unbounded | 2.00x | 1.00x |")
    assert '"max_overtakes": null' in report
    assert "--dtype unbounded" not in report
    assert "## Precision" not in report


def test_every_microbatch_target_restores_the_settings_a_variant_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    live: dict[str, Any] = {}
    seen: list[tuple[str, dict[str, Any]]] = []

    def fake_patch(url: str, json: dict[str, Any]) -> Any:
        live.update(json)
        return type("Reply", (), {"raise_for_status": lambda self: None})()

    def fake_bench(
        url: str, loads: list[Load], label: str, args: object, request: object = None
    ) -> Run:
        seen.append((label, dict(live)))
        return Run(label, url, "/predict", "c", 1, 0, 1, [], {}, {}, steps=[])

    monkeypatch.setattr("benchmarks.compare.httpx.patch", fake_patch)
    monkeypatch.setattr(compare, "run_bench", fake_bench)
    defaults = {"policy": "adaptive", "max_overtakes": 1}
    targets = {
        "microbatch adaptive": compare.Target("http://m", defaults),
        "microbatch unbounded": compare.Target("http://m", defaults | {"max_overtakes": None}),
    }
    compare.interleaved(targets, [Load("closed", c) for c in (1, 4, 16)], argparse.Namespace())
    for label, settings in seen:
        want = None if label.endswith("unbounded") else 1
        assert settings["max_overtakes"] == want, (label, settings)
