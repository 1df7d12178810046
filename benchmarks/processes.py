"""Servers in child processes for the benchmark tools: a free port, readiness, SIGTERM."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def pin(cpu: int) -> None:
    """Pin this process to one CPU (where the OS allows and there is more than one)."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {cpu})


_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def free_port() -> int:
    """A localhost port free now and not handed out before by this process: servers
    started side by side (threads picking ports at once) never get the same one, which
    the kernel may give twice once the probing socket is closed."""
    with _HANDED_OUT_LOCK:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port: int = s.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


@contextmanager
def server(
    args: list[str],
    log: Path,
    *,
    cpu: int | None = None,
    timeout_s: float = 300,
    program: list[str] | None = None,
    ready: str | None = None,
) -> Iterator[str]:
    """Run `python -m <args> --port P` (or `<program> <args> --port P`: another server,
    such as a peer in a virtual environment of its own) pinned to `cpu` if given, until
    `ready` answers 200; yield its URL; stop it with SIGTERM. By default the plain FastAPI
    baselines (`benchmarks.naive`, `benchmarks.trivial`) are ready at /docs; microbatch,
    on any model, at /ready."""
    port = free_port()
    command = [*(program or [sys.executable, "-m"]), *args, "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=None if cpu is None else (lambda: pin(cpu)),
        )
    url = f"http://127.0.0.1:{port}"
    if ready is None:
        ready = "/docs" if args[0] in ("benchmarks.naive", "benchmarks.trivial") else "/ready"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{shlex.join(command)} did not come up; see {log}")
            try:
                if httpx.get(url + ready, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)  # waiting for a child process to come up
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
