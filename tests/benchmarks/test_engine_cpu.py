"""The engine-process benchmark end to end, briefly: a real engine process behind a Unix
socket, clients in this one; and benchmarks/ab.sh's arguments."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from benchmarks import engine_cpu


def test_it_measures_the_engine_process_across_a_real_socket(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    args = "--concurrency 64 --front-ends 2 --duration 1 --warmup 0.5 --json".split()
    code = engine_cpu.main([*args, str(out)])
    assert code == 0
    figures = json.loads(out.read_text())
    assert figures["items"] > 100
    assert 1 < figures["mean_batch"] <= 32  # 64 in flight over one device: batches
    assert figures["engine_cpu_us_per_item"] > 0
    assert all(frames > 0 for frames in figures["frames_sent_per_front_end"])


def test_ab_script_explains_itself_and_refuses_unknown_options() -> None:
    shown = subprocess.run(["bash", "benchmarks/ab.sh", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0
    assert "--rounds" in shown.stdout
    assert "--concurrency" in shown.stdout
    wrong = subprocess.run(["bash", "benchmarks/ab.sh", "--bogus"], capture_output=True, text=True)
    assert wrong.returncode == 2
    assert "unknown option --bogus" in wrong.stderr
