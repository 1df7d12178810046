"""What a result must record to be reproducible: versions, hardware, commit."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("microbatch", "torch", "transformers", "tokenizers", "fastapi", "uvicorn", "aiohttp")


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def git_commit() -> str | None:
    """HEAD's commit; in a copy of the tree without its repository (a GPU machine given
    the files alone), `GIT_COMMIT` from the environment, as CI systems set it."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GIT_COMMIT") or None
    return out.stdout.strip()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def describe() -> dict[str, object]:
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "gpu": gpu_name(),
        "versions": {p: _version(p) for p in PACKAGES},
    }


_REPO = Path(__file__).resolve().parents[1]
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/[^\s=:,\"']+")
"""An absolute path inside an argument (not a URL's path: that follows a host)."""


def portable(argument: str) -> str:
    """`argument` with every absolute path in it made relative to the repository, or
    cut to its file name when it lies outside: no path of this machine in a result."""

    def relative(match: re.Match[str]) -> str:
        path = Path(match.group(0))
        try:
            return str(path.resolve().relative_to(_REPO))
        except ValueError:
            return path.name

    return _ABSOLUTE_PATH.sub(relative, argument)


def portable_values(values: dict[str, object]) -> dict[str, object]:
    """Parsed arguments as a result records them: every string `portable`."""
    return {k: portable(v) if isinstance(v, str) else v for k, v in values.items()}


def command_line() -> list[str]:
    """This process's command, its program by name only, and no paths of this machine
    (`portable`)."""
    return [Path(sys.argv[0]).name, *(portable(a) for a in sys.argv[1:])]


def hardware_slug() -> str:
    """A file-name-safe name for this machine's hardware: 'cpu-2core' or the GPU's name."""
    gpu = gpu_name()
    if gpu:
        return "gpu-" + "-".join(gpu.lower().replace("nvidia", "").split())
    return f"cpu-{os.cpu_count()}core"


def cpu_times() -> list[int] | None:
    """The machine's cumulative CPU times (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_percent(before: list[int] | None, after: list[int] | None) -> float | None:
    """Percent of CPU time the hypervisor took from this VM between two `cpu_times`."""
    if before is None or after is None or len(before) < 8:
        return None
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta)
    return round(100 * delta[7] / total, 1) if total else None
