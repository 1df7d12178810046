"""A real PostgreSQL server for tests and benchmarks: Debian's `postgresql` binaries, a
cluster made by `initdb` in a temporary directory, listening on a free localhost port. As root (CI's
containers), it runs as the `postgres` user the package creates: PostgreSQL refuses
root."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.processes import free_port


def binary(name: str) -> str | None:
    """A PostgreSQL program: on PATH, else in Debian's versioned directory."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def available() -> bool:
    return binary("initdb") is not None and binary("postgres") is not None


class PostgresServer:
    """Its own temporary directory (not pytest's, which only root may enter), removed by
    `stop`."""

    def __init__(self) -> None:
        root = self.root = Path(tempfile.mkdtemp(prefix="microbatch-pg-"))
        self.data = root / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(root, "postgres")
        subprocess.run(
            [*self._as_user, str(binary("initdb")), "-D", str(self.data), "-U", "postgres",
             "--auth=trust", "--no-sync", "-E", "UTF8"],
            check=True, capture_output=True,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresServer:
        log = (self.root / "postgres.log").open("ab")
        self.process = subprocess.Popen(
            [*self._as_user, str(binary("postgres")), "-D", str(self.data),
             "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
             "-c", f"unix_socket_directories={self.root}", "-c", "fsync=off"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.root / 'postgres.log').read_text()}")
            if self.ready():
                return self
            time.sleep(0.05)  # polling another process's readiness, not ordering events
        raise RuntimeError("postgres did not answer")

    def ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url, connect_timeout=1).close()
        except psycopg.OperationalError:
            return False
        return True

    def _postmaster(self) -> int | None:
        """The postmaster's pid, from the file it keeps in its data directory."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _signal(self, signum: int) -> None:
        pid = self._postmaster()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would; its children follow it."""
        assert self.process is not None
        self._signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        # The children notice the postmaster's death; wait for the port to close.
        deadline = time.monotonic() + 30
        while self.ready() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (a fast shutdown) and remove its directory."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def rows(self, where: str = "TRUE") -> int:
        import psycopg

        with psycopg.connect(self.url) as conn:
            found = conn.execute(f"SELECT count(*) FROM predictions WHERE {where}").fetchone()
        return int(found[0]) if found else 0
