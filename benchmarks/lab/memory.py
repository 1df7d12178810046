"""What each process of `microbatch serve --workers N` holds in memory, and which of them
map torch: the supervisor, the engine process, every front-end.

Starts the server (the code of this checkout, or of `--source`, another checkout: the
before of a change), waits until it is ready, sends `--requests` predictions through the
front-ends so that each has served, then reads `/proc/PID/status` (VmRSS: resident;
RssAnon: what is the process's own rather than shared file pages) and `/proc/PID/maps`
(libtorch) of each process. Linux only.

    python -m benchmarks.lab.memory --workers 4 [--source DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchmarks import environment
from benchmarks.processes import server

KEYS = ("VmRSS", "RssAnon", "RssFile")


@dataclass(frozen=True, slots=True)
class Process:
    role: str
    pid: int
    rss_mb: float
    anon_mb: float
    file_mb: float
    libtorch: bool


def read_process(role: str, pid: int) -> Process:
    """`pid`'s resident memory (MiB) and whether it maps torch's shared library."""
    kib = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in KEYS:
            kib[key] = int(value.split()[0])
    maps = Path(f"/proc/{pid}/maps").read_text()
    libtorch = re.search(r"/libtorch(_cpu|_cuda|_python)?\.so", maps) is not None
    mb = {key: kib.get(key, 0) / 1024 for key in KEYS}
    return Process(role, pid, mb["VmRSS"], mb["RssAnon"], mb["RssFile"], libtorch)


def processes(log: str, supervisor: int) -> list[Process]:
    """The supervisor, engine and front-ends, by the pids the supervisor logged."""
    found = re.findall(r"engine process (\d+), front-ends \[([\d, ]+)\]", log)
    if not found:
        raise RuntimeError("the supervisor did not log its children's pids")
    engine, front_ends = found[-1]
    return [
        read_process("supervisor", supervisor),
        read_process("engine", int(engine)),
        *(read_process("front-end", int(p)) for p in front_ends.split(", ")),
    ]


def measure(workers: int, source: Path, requests: int, extra: list[str]) -> list[Process]:
    """Serve `source`'s code with `--workers workers`, load it, and read its processes."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        args = ["server.cli", "serve", "--workers", str(workers), *extra]
        saved, here = os.environ.get("PYTHONPATH"), Path.cwd()
        # The child imports the code under test: `python -m` puts its working directory
        # first on sys.path, and the package's own imports follow PYTHONPATH.
        os.environ["PYTHONPATH"] = str(source)
        os.chdir(source)
        try:
            with server(args, log) as url, httpx.Client(timeout=60) as client:
                for i in range(requests):
                    reply = client.post(f"{url}/predict", json={"text": f"request {i}"})
                    reply.raise_for_status()
                text = log.read_text()
                [*_, supervisor] = re.findall(r"supervisor (\d+): engine process", text)
                return processes(text, int(supervisor))
        finally:
            os.chdir(here)
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved


def _commit(source: Path) -> str | None:
    import subprocess

    done = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--source", type=Path, default=Path.cwd(),
                        help="the checkout whose code is served (default: this one)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", type=Path, help="write the processes and settings here")
    parser.add_argument("serve_args", nargs="*", help="more flags for microbatch serve")
    args = parser.parse_args(argv)
    if not Path("/proc/self/status").exists():
        print("benchmarks.lab.memory needs Linux's /proc", file=sys.stderr)
        return 2
    found = measure(args.workers, args.source.resolve(), args.requests, args.serve_args)
    print(f"{'role':<11} {'pid':>7} {'RSS MiB':>8} {'anon MiB':>9} {'file MiB':>9} libtorch")
    for p in found:
        print(f"{p.role:<11} {p.pid:>7} {p.rss_mb:>8.0f} {p.anon_mb:>9.0f} {p.file_mb:>9.0f} "
              f"{'yes' if p.libtorch else 'no'}")  # fmt: skip
    if args.json is not None:
        record = {
            "settings": {
                "workers": args.workers,
                "requests": args.requests,
                "serve_args": args.serve_args,
                "source_commit": _commit(args.source),
            },
            "environment": environment.describe(),
            "processes": [asdict(p) for p in found],
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
