"""benchmarks/lab/gpu.sh on a machine without a GPU (its options, its dry run, its refusals) and
the report it ends with (benchmarks/lab/gpu_report.py) on a results directory whose files are
written by the real tools' own code: ceiling.main, bench.main, a real pytest run, and a
saved compare run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench, ceiling, environment
from benchmarks.ceiling import CeilingRow
from benchmarks.lab import gpu_bundle, gpu_report
from benchmarks.loadgen import Load, StepResult
from benchmarks.processes import free_port
from benchmarks.runs import Run
from tests.benchmarks.lab.test_gpu_bundle import fake_model_package

REPO = Path(__file__).resolve().parents[3]
SCRIPT = "benchmarks/lab/gpu.sh"
SAVED_COMPARE = REPO / "benchmarks/results/cpu-2core-2026-12-01-after-house-final"
OPTIONS = ["--help", "--dry-run", "--skip-install", "--bundle", "--quick", "--time-limit",
           "--archive", "--name", "--duration", "--workers", "--concurrency",
           "--report-only"]  # fmt: skip

FIGURES = {  # workers -> clients -> (req/s, p50 ms, p99 ms)
    1: {1: (210.0, 4.5, 7.0), 256: (3600.0, 40.0, 90.0)},
    2: {1: (205.0, 4.7, 7.5), 256: (4500.0, 31.0, 70.0)},
}
CEILING = [
    CeilingRow(32, "fifo", 4000.0, 8.0, 7.9, "float16"),
    CeilingRow(32, "grouped", 5000.0, 6.4, 6.3, "float16"),
    CeilingRow(32, "grouped", 2500.0, 12.8, 12.7, "float32"),
]


def script(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """bash benchmarks/lab/gpu.sh ARGS, with this interpreter as its python and, unless `env`
    says otherwise, an nvidia-smi that does not exist (no GPU, whatever the machine)."""
    variables = {**os.environ, "PYTHON": sys.executable,
                 "NVIDIA_SMI": str(tmp_path / "no-nvidia-smi"), **env}  # fmt: skip
    return subprocess.run(
        ["bash", SCRIPT, *args], cwd=REPO, env=variables, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def executable(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_help_names_every_option(tmp_path: Path) -> None:
    done = script("--help", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    for option in OPTIONS:
        assert option in done.stdout
    assert "TORCH_INDEX_URL" in done.stdout


def test_the_dry_run_prints_every_step_and_runs_none(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    python = executable(tmp_path / "python", f'echo "$@" >> {calls}\nexit 1\n')
    name = "gpu-script-test-dry-run"
    done = script("--dry-run", "--skip-install", "--name", name, "--workers", "1,2",
                  tmp_path=tmp_path, PYTHON=str(python))  # fmt: skip

    assert done.returncode == 0, done.stderr
    out, results = done.stdout, f"benchmarks/results/{name}"
    assert (
        f"+ {python} -m pytest -m gpu -q -p no:cacheprovider tests/batcher 2>&1 | tee "
        f"{results}/gpu-tests.log"
    ) in out
    ceiling_json = f"{results}/ceiling.json"
    assert f"-m benchmarks.ceiling --texts 1024 --accuracy-texts 0 --json {ceiling_json}" in out
    assert (
        "-m benchmarks.compare --concurrency 1,4,16,64,256,512 --duration 5 --warmup 2 "
        f"--out-dir {results} --name compare"
    ) in out
    assert f"-m server.cli serve --workers 1 --port 8765 >{results}/workers-1.log" in out
    assert f"-m server.cli serve --workers 2 --port 8765 >{results}/workers-2.log" in out
    for n in (1, 2):
        assert (
            "-m benchmarks.bench http://127.0.0.1:8765 --concurrency 1,4,16,64,256,512 "
            f"--duration 5 --warmup 2 --processes 4 --label 'workers {n}' "
            f"--json {results}/workers-{n}.json"
        ) in out
    assert "--workers 4" not in out
    assert f"serve --compile-mode reduce-overhead --port 8765 >{results}/graphs.log" in out
    assert f"--label 'cuda graphs' --json {results}/graphs.json" in out
    assert f"serve --collate-ahead off --port 8765 >{results}/no-collate-ahead.log" in out
    assert f"--label 'no collate ahead' --json {results}/no-collate-ahead.json" in out
    assert f"-m benchmarks.lab.gpu_report {results}" in out
    assert "pip install" not in out
    assert "total time:" in out
    assert not calls.exists()
    assert not (REPO / results).exists()


def test_the_name_comes_from_the_gpu_and_the_torch_index_from_the_environment(
    tmp_path: Path,
) -> None:
    smi = executable(tmp_path / "nvidia-smi", 'echo "NVIDIA H200"\n')
    done = script("--dry-run", "--duration", "3", tmp_path=tmp_path, NVIDIA_SMI=str(smi),
                  TORCH_INDEX_URL="https://example.invalid/whl/cu999")  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert f"results: benchmarks/results/nvidia-h200-{date.today()}/" in done.stdout
    assert "-m pip install torch==2.13.0 --index-url https://example.invalid/whl/cu999" in (
        done.stdout
    )
    assert "-m pip install -e '.[dev,bench]' torch==2.13.0" in done.stdout
    assert "--duration 3 --warmup 2" in done.stdout


def test_a_short_lease_runs_the_targets_first_and_skips_what_would_not_end_in_time(
    tmp_path: Path,
) -> None:
    """--quick and --time-limit: the dry run keeps the expected time of what it would
    run, so it shows what a lease of that length skips: compare comes last."""
    name = "gpu-script-test-quick"
    done = script("--dry-run", "--skip-install", "--quick", "--time-limit", "540",
                  "--archive", "lease.tar.gz", "--name", name, tmp_path=tmp_path)  # fmt: skip

    assert done.returncode == 0, done.stderr
    out, results = done.stdout, f"benchmarks/results/{name}"
    for n in (1, 4):
        assert (
            "-m benchmarks.bench http://127.0.0.1:8765 --concurrency 1,64,256 --duration 4 "
            f"--warmup 1 --processes 4 --label 'workers {n}' --json {results}/workers-{n}.json"
        ) in out
    assert "--workers 2 " not in out
    assert out.index("serve --workers 4") < out.index("serve --compile-mode reduce-overhead")
    assert "gpu.sh: skipping compare: expected to end near" in done.stderr
    assert "past --time-limit 540 s" in done.stderr
    assert "-m benchmarks.compare" not in out
    assert "gpu.sh: skipped for time (--time-limit 540): " in done.stderr
    last = out.rsplit("\n== ", 1)[1]
    assert "-m benchmarks.lab.gpu_report" in last, "the report is written anyway"
    archive = REPO / "lease.tar.gz"
    assert f"tar -czf {archive} ..." in out, "packed after every step"
    assert out.count(f"tar -czf {archive}") >= 6
    assert not archive.exists()


def test_a_bundle_is_installed_beside_the_machines_torch(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    done = script("--dry-run", "--bundle", str(bundle), "--name", "gpu-script-test-bundle",
                  tmp_path=tmp_path)  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert f"-m benchmarks.lab.gpu_bundle unpack {bundle} " in done.stdout
    assert "+ export PYTHONPATH=" in done.stdout
    assert "pip install" not in done.stdout, "--bundle implies --skip-install"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["--time-limit", "9m"], "--time-limit takes whole seconds, got '9m'"),
        (["--bundle", "no-such-bundle"], "--bundle takes a directory made by"),
        (["--workers", "1,two"], "--workers takes counts like 1,2,4,8, got '1,two'"),
        (["--name"], "--name needs a value"),
    ],
)
def test_a_wrong_option_is_a_usage_error(tmp_path: Path, args: list[str], message: str) -> None:
    done = script("--dry-run", *args, tmp_path=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert "--help lists the options" in done.stderr


def test_every_gpu_test_is_where_gpu_sh_runs_them() -> None:
    """gpu.sh runs `pytest -m gpu tests/batcher`: the rest of the suite needs packages a
    bundle does not carry (the openai SDK, schemathesis, playwright); where they are not
    installed (such a machine), the whole suite cannot be collected to check."""
    for module in ("openai", "schemathesis"):
        pytest.importorskip(module)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
         "-p", "no:cacheprovider", "tests"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert collected, done.stdout
    assert all(line.startswith("tests/batcher/") for line in collected), collected


def test_without_a_gpu_it_stops_before_doing_anything(tmp_path: Path) -> None:
    done = script("--skip-install", "--name", "gpu-script-test-no-gpu", tmp_path=tmp_path)
    assert done.returncode == 1
    assert "no NVIDIA GPU found (nvidia-smi)" in done.stderr
    assert not (REPO / "benchmarks/results/gpu-script-test-no-gpu").exists()


# -- the report --------------------------------------------------------------------------


def write_ceiling(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ceiling.json as `python -m benchmarks.ceiling --json` writes it, of CEILING's rows."""
    monkeypatch.setattr(ceiling, "measure", lambda *args, **kwargs: (CEILING, []))
    assert ceiling.main(["--accuracy-texts", "0", "--json", str(path)]) == 0


def write_workers_run(
    path: Path, workers: int, monkeypatch: pytest.MonkeyPatch, label: str | None = None
) -> None:
    """workers-N.json as `python -m benchmarks.bench URL --json` writes it, its steps
    FIGURES[workers]; a few 503s at 256 clients."""
    figures = FIGURES[workers]
    label = label or f"workers {workers}"

    def step(load: Load) -> StepResult:
        rps, p50, p99 = figures[int(load.value)]
        ok = round(rps * 5)
        statuses = {"200": ok} | ({"503": 2} if load.value == 256 else {})
        latency = {"p50": p50, "p90": (p50 + p99) / 2, "p99": p99, "mean": p50, "max": p99 * 2}
        return StepResult(str(load), load.kind, load.value, 5.0, sum(statuses.values()), ok,
                          rps, latency, statuses, {"mean_batch_size": 16.0})  # fmt: skip

    async def fake_bench(url: str, loads: list[Load], **kwargs: object) -> Run:
        return Run(
            label=str(kwargs["label"]), url=url, endpoint="/predict", corpus="builtin",
            duration_s=5.0, warmup_s=2.0, processes=4, command=environment.command_line(),
            server={"name": "all-MiniLM-L6-v2", "device": "cuda:0", "dtype": "float16"},
            environment=environment.describe(), steps=[step(load) for load in loads],
        )  # fmt: skip

    monkeypatch.setattr(bench, "bench", fake_bench)
    clients = ",".join(str(c) for c in figures)
    argv = ["http://127.0.0.1:8765", "--concurrency", clients, "--duration", "5",
            "--warmup", "2", "--processes", "4", "--label", label,
            "--json", str(path)]  # fmt: skip
    assert bench.main(argv) == 0


def write_pytest_log(path: Path, tmp_path: Path) -> None:
    """gpu-tests.log from a real `pytest -m gpu -q` (2 passed, 1 failed, 1 skipped)."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    (suite / "test_gpu.py").write_text(textwrap.dedent("""
        import pytest

        pytestmark = pytest.mark.gpu

        def test_one(): pass
        def test_two(): pass
        def test_three(): assert False
        def test_four(): pytest.skip("no CUDA")
    """))  # fmt: skip
    (suite / "test_cpu.py").write_text("def test_cpu(): pass\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
        cwd=suite, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    path.write_text(done.stdout + done.stderr)


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A gpu.sh results directory: every piece, each in its tool's own format."""
    out = tmp_path / "h200-test"
    out.mkdir()
    gpu = {"device": "NVIDIA H200", "device_count": 1, "driver": "570.124.06",
           "torch": "2.13.0+cu128", "cuda": "12.8"}  # fmt: skip
    environment_record = {**environment.describe(), **gpu}  # as gpu.sh writes it
    (out / "environment.json").write_text(json.dumps(environment_record, indent=2))
    write_pytest_log(out / "gpu-tests.log", tmp_path)
    write_ceiling(out / "ceiling.json", monkeypatch)
    for workers in FIGURES:
        write_workers_run(out / f"workers-{workers}.json", workers, monkeypatch)
    # CUDA graphs: the figures of --workers 2, so that they differ from plain compile's.
    write_workers_run(out / "graphs.json", 2, monkeypatch, label="cuda graphs")
    # Not collating ahead: the figures of --workers 2 again (a made-up difference).
    write_workers_run(out / "no-collate-ahead.json", 2, monkeypatch, label="no collate ahead")
    shutil.copytree(SAVED_COMPARE, out / "compare")
    return out


def section(report: str, heading: str) -> str:
    return report.split(heading, 1)[1].split("\n## ", 1)[0]


def test_the_report_holds_the_figures_and_the_ratio_to_the_ceiling(results: Path) -> None:
    done = script("--report-only", str(results), tmp_path=results.parent)
    assert done.returncode == 0, done.stderr

    report = (results.parent / "h200-test.md").read_text()
    assert report.startswith("# microbatch on NVIDIA H200:")
    assert "(driver 570.124.06). torch 2.13.0+cu128, CUDA 12.8." in report
    assert "2 passed, 1 failed, 1 skipped (`" in section(report, "## GPU tests")
    assert "**5000.0 items/s** at batch 32 (grouped)" in section(report, "## Raw GPU ceiling")
    assert "In float32: 2500.0 items/s at batch 32 (grouped)." in report
    table = section(report, "## Throughput and latency by front-end workers")
    assert "| 1 | 1 | 210.0 | 4.5 | 7.0 | - |" in table
    assert "| 1 | 256 | 3600.0 | 40.0 | 90.0 | 503: 2 |" in table
    assert "| 2 | 256 | 4500.0 | 31.0 | 70.0 | 503: 2 |" in table
    ratios = section(report, "## 256 clients against the ceiling (target >= 0.8)")
    assert "| 1 | 3600.0 | 5000.0 | 0.72 | no |" in ratios
    assert "| 2 | 4500.0 | 5000.0 | 0.90 | yes |" in ratios
    saved = json.loads((results / "compare/microbatch-adaptive.json").read_text())
    one_client = next(s for s in saved["steps"] if s["kind"] == "closed" and s["value"] == 1)
    compared = section(report, "## Naive vs microbatch")
    assert f"| 1 | {one_client['throughput_rps']:.1f} |" in compared
    assert "[h200-test/compare.md](h200-test/compare.md)" in compared
    assert "![req/s against clients, by workers](h200-test.png)" in report
    graphs = section(report, "## CUDA graphs against plain compile")
    assert "| 256 | 3600.0 | 4500.0 | 1.25 | 90.0 | 70.0 |" in graphs
    ahead = section(report, "## Collating ahead against not")
    assert "| off req/s | ahead req/s |" in ahead
    assert "| 256 | 4500.0 | 3600.0 | 0.80 | 70.0 | 90.0 |" in ahead
    assert "missing" not in report
    assert (results.parent / "h200-test.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_pieces_are_reported_as_missing(results: Path) -> None:
    (results / "ceiling.json").unlink()
    shutil.rmtree(results / "compare")
    (results / "gpu-tests.log").write_text("....\n")  # pytest killed before its summary
    (results / "graphs.json").unlink()
    (results / "no-collate-ahead.json").unlink()

    assert gpu_report.main([str(results), "--out", str(results.parent / "partial")]) == 0

    report = (results.parent / "partial.md").read_text()
    assert "**missing** (no ceiling.json)." in section(report, "## Raw GPU ceiling")
    ratios = section(report, "## 256 clients against the ceiling")
    assert "| 1 | 3600.0 | missing (no ceiling.json) | missing | - |" in ratios
    assert "**missing** (no compare/ directory)." in section(report, "## Naive vs microbatch")
    assert "has no pytest summary line" in section(report, "## GPU tests")
    assert "**missing** (no graphs.json)." in section(report, "## CUDA graphs")
    assert "**missing** (no no-collate-ahead.json)." in section(report, "## Collating ahead")
    assert "| 2 | 256 | 4500.0 | 31.0 | 70.0 | 503: 2 |" in report
    assert (results.parent / "partial.png").read_bytes()[:4] == b"\x89PNG"


def test_steps_skipped_for_time_are_reported_as_skipped(results: Path) -> None:
    (results / "compare").rename(results.parent / "not-here")
    (results / "no-collate-ahead.json").unlink()
    why = "expected to end near 600 s (started at 500 s), past --time-limit 540 s"
    (results / "skipped.tsv").write_text(f"no-collate-ahead\t{why}\ncompare\t{why}\n")
    record = json.loads((results / "environment.json").read_text())
    model = {"weights": "float16 (unpack widens them to float32)",
             "min_cosine_to_original": 0.999999}  # fmt: skip
    record["bundle"] = {"model": model}  # as gpu.sh writes it after --bundle
    (results / "environment.json").write_text(json.dumps(record))

    assert gpu_report.main([str(results), "--out", str(results.parent / "short")]) == 0

    report = (results.parent / "short.md").read_text()
    assert "Skipped for time (`--time-limit`): `no-collate-ahead`, `compare`." in report
    assert (
        "weights were carried as float16 (unpack widens them to float32); the lowest "
        "cosine of its embeddings to the original's is 0.999999." in report
    )
    assert f"**missing** (skipped for time: {why})." in section(report, "## Naive vs microbatch")
    assert f"**missing** (skipped for time: {why})." in section(report, "## Collating ahead")
    assert "| 2 | 4500.0 | 5000.0 | 0.90 | yes |" in report


def test_an_empty_directory_is_a_report_of_missing_pieces(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert gpu_report.main([str(tmp_path / "empty")]) == 0
    report = (tmp_path / "empty.md").read_text()
    assert report.startswith("# microbatch on missing:")
    for reason in ("no environment.json", "no gpu-tests.log", "no ceiling.json",
                   "no workers-N.json", "no compare/ directory"):  # fmt: skip
        assert f"**missing** ({reason})." in report


def test_pytest_summary_lines_are_parsed() -> None:
    summary = gpu_report.parse_pytest_summary(
        "x\n===== 3 passed, 1 skipped, 2 errors, 1 warning, 500 deselected in 75.20s "
        "(0:01:15) =====\n"
    )
    assert summary is not None
    assert summary.counts == {"passed": 3, "skipped": 1, "error": 2, "warning": 1,
                              "deselected": 500}  # fmt: skip
    assert gpu_report.parse_pytest_summary("no tests ran in 0.01s\n") is not None
    assert gpu_report.parse_pytest_summary("collecting ...\n") is None


@pytest.mark.slow
def test_a_whole_run_on_the_cpu_leaves_its_report_in_the_archive(tmp_path: Path) -> None:
    """Not a dry run: gpu.sh's own steps (servers started and stopped, the load, the
    report and the archive after every step, a failed step) run for real, on the CPU
    (GPU_SH_ON_CPU), with servers of the null model (`benchmarks.lab.overhead --serve`) in
    place of the real one; the tests, the ceiling and compare are stand-ins, the
    ceiling one failing. A small bundle is unpacked for the run and removed after it."""
    python = executable(tmp_path / "python", textwrap.dedent(f"""\
        case "$1 $2" in
          "-m pytest") echo "1 skipped in 0.01s"; exit 0 ;;
          "-m benchmarks.ceiling") echo "no ceiling here" >&2; exit 3 ;;
          "-m benchmarks.compare") exit 0 ;;
          "-m server.cli")
            port=""; previous=""
            for arg in "$@"; do [ "$previous" = --port ] && port=$arg; previous=$arg; done
            exec {sys.executable} -m benchmarks.lab.overhead --serve --port "$port" ;;
        esac
        exec {sys.executable} "$@"
    """))  # fmt: skip
    smi = executable(tmp_path / "nvidia-smi", 'echo "Rehearsal CPU"\n')
    name, archive = "gpu-script-test-on-cpu", tmp_path / "results.tar.gz"
    bundle, temporary = tmp_path / "bundle", tmp_path / "tmp"
    (bundle / "wheels").mkdir(parents=True)
    temporary.mkdir()
    weights = {"w": np.array([0.5, 0.25], dtype=np.float32)}
    gpu_bundle.copy_package(fake_model_package(tmp_path, weights), bundle / "model" / "fake_model",
                            "float16")  # fmt: skip
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    manifest = {"python_version": python_version,
                "model": {"package": "fake_model", "weights": "float16"}}  # fmt: skip
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    try:
        done = subprocess.run(
            ["bash", SCRIPT, "--bundle", str(bundle), "--name", name, "--workers", "1",
             "--concurrency", "1,4", "--duration", "0.5", "--warmup", "0.2",
             "--processes", "1", "--port", str(free_port()), "--time-limit", "3600",
             "--archive", str(archive)],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHON": str(python), "NVIDIA_SMI": str(smi),
                 "GPU_SH_ON_CPU": "1", "TMPDIR": str(temporary)},
        )  # fmt: skip
        assert done.returncode == 1, done.stdout + done.stderr
        assert "the ceiling failed (exit status 3)" in done.stderr
        assert "failed steps: the ceiling" in done.stderr
        with tarfile.open(archive) as packed:
            names = set(packed.getnames())
            report = packed.extractfile(f"{name}.md")
            assert report is not None
            text = report.read().decode()
        for piece in ("workers-1.json", "graphs.json", "no-collate-ahead.json",
                      "environment.json", "gpu-tests.log"):  # fmt: skip
            assert f"{name}/{piece}" in names
        assert f"{name}.png" in names
        table = section(text, "## Throughput and latency by front-end workers")
        assert "| 1 | 1 |" in table
        assert "| 1 | 4 |" in table
        assert "**missing** (no ceiling.json)." in section(text, "## Raw GPU ceiling")
        assert "1 skipped" in section(text, "## GPU tests")
        assert "the default model's weights were carried as float16" in text
        assert "install the bundle" in done.stdout
        assert not list(temporary.glob("microbatch-bundle.*")), "the unpacked bundle is removed"
    finally:
        for leftover in (f"{name}", f"{name}.md", f"{name}.png"):
            shutil.rmtree(REPO / "benchmarks/results" / leftover, ignore_errors=True)
            (REPO / "benchmarks/results" / leftover).unlink(missing_ok=True)
