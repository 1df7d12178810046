"""The supervisor's temporary directory (`server.workers.RunDirectory`): what a killed
server leaves is removed by the next one; a live server's never is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from server.workers import RUN_DIR_PREFIX, RunDirectory, remove_stale_run_dirs

REPO = Path(__file__).resolve().parents[2]
KILLED = """
import os, signal, sys
from server.workers import RunDirectory
directory = RunDirectory(sys.argv[1])
open(os.path.join(directory.metrics, "counter_1.db"), "w").close()
print(directory.path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_server_directory(parent: Path) -> Path:
    """A run directory whose supervisor was SIGKILLed, as it left it."""
    done = subprocess.run(
        [sys.executable, "-c", KILLED, str(parent)], cwd=REPO, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == -9, done.stderr
    left = Path(done.stdout.strip())
    assert (left / "metrics" / "counter_1.db").exists()
    return left


def test_a_killed_servers_directory_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    live = RunDirectory(str(tmp_path))
    left = killed_server_directory(tmp_path)
    unclaimed = tmp_path / f"{RUN_DIR_PREFIX}unclaimed"  # no owner file: not ours to judge
    unclaimed.mkdir()
    (tmp_path / "microbatch-other").mkdir()

    assert remove_stale_run_dirs(str(tmp_path)) == 1

    assert not left.exists()
    assert Path(live.path).is_dir()
    assert Path(live.metrics).is_dir()
    assert unclaimed.is_dir()
    assert (tmp_path / "microbatch-other").is_dir()
    live.remove()
    assert not Path(live.path).exists()


def test_a_new_server_removes_what_a_killed_one_left(tmp_path: Path) -> None:
    left = killed_server_directory(tmp_path)
    directory = RunDirectory(str(tmp_path))
    assert not left.exists()
    assert os.listdir(tmp_path) == [Path(directory.path).name]
    assert Path(directory.socket).parent == Path(directory.path)
    directory.remove()
