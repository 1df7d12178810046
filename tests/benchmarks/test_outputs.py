"""`bench` records everything a result needs, and `plot` draws from those files."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path

import pytest
from asgi_lifespan import LifespanManager

from benchmarks import plot
from benchmarks.loadgen import Load, Request
from benchmarks.runs import bench, write_csv
from benchmarks.transport import asgi_transports
from server.app import create_app
from server.settings import Settings
from tests.server.fakes import FakeTextModel


@pytest.mark.asyncio
async def test_a_run_records_settings_environment_and_steps_and_plots(tmp_path: Path) -> None:
    app = create_app(Settings(max_batch_size=8), model=FakeTextModel())  # type: ignore[arg-type]
    async with LifespanManager(app) as manager:
        clients = asgi_transports(manager.app)
        async with clients(1) as client:
            while (await client.get("/ready"))[0] != 200:  # noqa: ASYNC110 (server state)
                await asyncio.sleep(0.005)  # lets the warm-up thread's result reach the loop
        run = await bench(
            "http://test", [Load("closed", 4), Load("open", 50)], texts=["a", "bb"],
            corpus_source="test", request=Request(), duration_s=0.5, warmup_s=0.1,
            clients=clients,
        )  # fmt: skip
    record = run.to_json()
    assert record["server"]["batching"]["max_batch_size"] == 8
    assert record["environment"]["versions"]["microbatch"]
    assert record["label"] == "adaptive"
    assert [s["load"] for s in record["steps"]] == ["4 clients", "50 req/s"]
    assert all(s["ok"] > 0 and s["server"]["mean_batch_size"] >= 1 for s in record["steps"])

    results = tmp_path / "run.json"
    results.write_text(json.dumps(record))
    write_csv(run, str(tmp_path / "run.csv"))
    rows = list(csv.DictReader((tmp_path / "run.csv").open()))
    assert [r["load"] for r in rows] == ["4 clients", "50 req/s"]
    assert float(rows[0]["throughput_rps"]) == pytest.approx(run.steps[0].throughput_rps, rel=1e-3)

    png = tmp_path / "curve.png"
    assert plot.main([str(results), str(results), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_refuses_a_file_that_is_not_a_bench_result(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a `microbatch bench --json` file"):
        plot.load_run(str(bad))


def test_the_bench_command_writes_its_plot_and_speaks_of_one_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import bench as bench_command
    from tests.server.live import threaded_server

    app = create_app(Settings(), model=FakeTextModel())  # type: ignore[arg-type]
    png = tmp_path / "run.png"
    with threaded_server(app) as url:
        argv = f"{url} --concurrency 1 --duration 0.3 --warmup 0.1 --png {png}".split()
        assert bench_command.main(argv) == 0
    out = capsys.readouterr()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "    1 client " in out.out
    assert "s/s]" not in out.err, "no progress bars off a terminal"


def test_a_recorded_command_holds_no_path_of_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import environment

    repo = Path(environment.__file__).resolve().parents[1]
    inside = repo / "benchmarks" / "results" / "run" / "r1.json"
    argv = [str(repo / "benchmarks" / "bench.py"), "http://127.0.0.1:8765/predict", "--json",
            str(inside), f"--log={tmp_path / 'server.log'}", "--server-args",
            f"--workers 2 --out {tmp_path / 'out'}"]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    assert environment.command_line() == [
        "bench.py",
        "http://127.0.0.1:8765/predict",
        "--json",
        "benchmarks/results/run/r1.json",
        "--log=server.log",
        "--server-args",
        "--workers 2 --out out",
    ]


def test_a_copy_of_the_tree_without_git_records_the_commit_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU machine given the files alone (no .git) runs `GIT_COMMIT=... gpu.sh`."""
    from benchmarks import environment

    monkeypatch.chdir(tmp_path)  # no repository here
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    assert environment.git_commit() is None
    monkeypatch.setenv("GIT_COMMIT", "531f93c")
    assert environment.git_commit() == "531f93c"
