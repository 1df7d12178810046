"""benchmarks.lab.memory reads a process's memory and whether it maps torch, from /proc."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.lab.memory import processes, read_process

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")

WAIT = "import sys; {imports}; print('up', flush=True); sys.stdin.read()"


def _held(imports: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", WAIT.format(imports=imports)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "up\n"  # imported, and waiting on stdin
    return child


def test_a_process_that_imported_torch_maps_libtorch_and_holds_more() -> None:
    plain, heavy = _held("import json"), _held("import torch")
    try:
        light = read_process("plain", plain.pid)
        loaded = read_process("torch", heavy.pid)
    finally:
        for child in (plain, heavy):
            child.communicate("")
    assert (light.libtorch, loaded.libtorch) == (False, True)
    assert 0 < light.rss_mb < loaded.rss_mb
    assert light.anon_mb + light.file_mb <= light.rss_mb + 1


def test_the_supervisors_log_names_every_process() -> None:
    child = _held("import json")
    try:
        log = f"... supervisor 1: engine process {child.pid}, front-ends [{child.pid}, {child.pid}]"
        found = processes(log, child.pid)
    finally:
        child.communicate("")
    assert [p.role for p in found] == ["supervisor", "engine", "front-end", "front-end"]
    with pytest.raises(RuntimeError, match="did not log"):
        processes("nothing here", child.pid)
