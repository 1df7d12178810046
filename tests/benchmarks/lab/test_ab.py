"""benchmarks/lab/ab.sh's arguments (a run needs two servers and minutes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "lab" / "ab.sh"


def test_ab_script_explains_itself_and_refuses_unknown_options() -> None:
    shown = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0
    assert "--rounds" in shown.stdout
    assert "--concurrency" in shown.stdout
    assert "bash benchmarks/lab/ab.sh BEFORE" in shown.stdout
    wrong = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert wrong.returncode == 2
    assert "unknown option --bogus" in wrong.stderr
