#!/usr/bin/env python3
"""The two commands of a fresh checkout, with nothing before them:

    python3 dev.py serve [FLAGS]   # set up what is missing, then `microbatch serve FLAGS`
    python3 dev.py test [ARGS]     # set up what is missing, then `pytest ARGS`

Set-up makes `.venv` (a virtual environment in the checkout) and installs into it torch
and microbatch with its `dev` extra (the test tools, the reference library, the linters,
the docs): on a machine without an NVIDIA driver, the CPU build of torch that
constraints.txt pins (a looser requirement would pull several GB of CUDA packages); where
a driver is present, pip's default torch, a CUDA build, and no pins. It records what it
installed from (pyproject.toml, constraints.txt, the torch build) in
`.venv/microbatch-setup.json` and does nothing the next time while those are unchanged:
a second run starts at once.

Only the standard library: a fresh machine with Python 3.11+ has all it needs (no make,
no tool to install first). `python3 dev.py setup` only sets up; `--dry-run` prints the
commands instead of running them. People who manage their own environments can run the
same pip commands themselves (docs/getting-started.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / "microbatch-setup.json"
INPUTS = ("pyproject.toml", "constraints.txt")
MIN_PYTHON = (3, 11)


def has_nvidia_driver() -> bool:
    """Whether this machine has an NVIDIA driver loaded (then torch's CUDA build)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def venv_python(venv: Path = VENV) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def wanted(root: Path, cuda: bool) -> dict[str, str]:
    """What an environment is set up from: its inputs' digests and the torch build."""
    digests = {name: hashlib.sha256((root / name).read_bytes()).hexdigest()[:16] for name in INPUTS}
    return {**digests, "torch": "cuda" if cuda else "cpu"}


def plan(root: Path, cuda: bool) -> list[list[str]]:
    """The commands that bring `root/.venv` to what `wanted` describes; none if it is."""
    venv = root / ".venv"
    stamp = venv / STAMP.name
    python = str(venv_python(venv))
    if venv_python(venv).exists() and stamp.exists():
        try:
            if json.loads(stamp.read_text()) == wanted(root, cuda):
                return []
        except ValueError:
            pass  # a damaged record: set up again
    pip = [python, "-m", "pip", "install", "--quiet"]
    commands = []
    if not venv_python(venv).exists():
        commands.append([sys.executable, "-m", "venv", str(venv)])
    commands.append([*pip, "--upgrade", "pip"])
    if cuda:
        commands.append([*pip, "torch"])
        commands.append([*pip, "-e", f"{root}[dev]"])
    else:
        constraints = str(root / "constraints.txt")
        commands.append([*pip, "torch", "-c", constraints])
        commands.append([*pip, "-e", f"{root}[dev]", "-c", constraints])
    return commands


def set_up(root: Path, cuda: bool, dry_run: bool) -> None:
    """Bring `root/.venv` up to date; a second dev.py started meanwhile waits for it."""
    with _locked(root / ".venv.lock"):
        _set_up(root, cuda, dry_run)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not on Windows: one at a time is then the user's care
        yield
        return
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _set_up(root: Path, cuda: bool, dry_run: bool) -> None:
    commands = plan(root, cuda)
    if not commands:
        return
    build = "CUDA (an NVIDIA driver is present)" if cuda else "CPU"
    print(f"dev.py: setting up .venv with torch's {build} build", file=sys.stderr, flush=True)
    for command in commands:
        print("+ " + " ".join(command), file=sys.stderr, flush=True)
        if not dry_run:
            subprocess.run(command, check=True)
    if not dry_run:
        (root / ".venv" / STAMP.name).write_text(json.dumps(wanted(root, cuda), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 dev.py",
        description=__doc__.split("\n\n")[0].strip(),
        allow_abbrev=False,  # every other flag is microbatch's or pytest's
    )
    parser.add_argument("command", choices=["serve", "test", "setup"])
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument(
        "--cuda",
        choices=["auto", "yes", "no"],
        default="auto",
        help="torch's CUDA build: auto (where an NVIDIA driver is present)",
    )
    args, rest = parser.parse_known_args(argv)
    if sys.version_info < MIN_PYTHON:
        print(f"dev.py: microbatch needs Python {'.'.join(map(str, MIN_PYTHON))}+, "
              f"this is {sys.version.split()[0]}", file=sys.stderr)  # fmt: skip
        return 2
    cuda = has_nvidia_driver() if args.cuda == "auto" else args.cuda == "yes"
    try:
        set_up(ROOT, cuda, args.dry_run)
    except subprocess.CalledProcessError as exc:
        print(f"dev.py: set-up failed ({exc.returncode}): {' '.join(exc.cmd)}", file=sys.stderr)
        return 1
    if args.command == "setup":
        return 0
    program = ["microbatch", "serve"] if args.command == "serve" else ["pytest"]
    executable = venv_python().parent / program[0]
    command = [str(executable), *program[1:], *rest]
    if args.dry_run:
        print("+ " + " ".join(command), file=sys.stderr)
        return 0
    os.chdir(ROOT)
    # The program takes this process's place: Ctrl-C and SIGTERM reach it directly.
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
