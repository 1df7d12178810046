"""The engine-process benchmark end to end, briefly: a real engine process behind a Unix
socket, clients in this one."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.lab import engine_cpu


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
