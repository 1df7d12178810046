"""`microbatch serve --workers N`: N front-end processes and one engine process.

    supervisor (this process): binds the port, starts the others, watches them
      |-- engine process (`server.engine_process`): the model on its devices, warm-up,
      |     the one queue and its batching (`server.host.EngineHost`), served on a Unix
      |     socket (`batcher.remote`)
      |-- front-end 1..N: uvicorn on the shared listening socket, each the whole app on
            a `server.client.RemoteClient`: HTTP, validation, tokenization, replies; no
            torch, no transformers

- The engine batches the items of every front-end together: one bounded queue, its
  429s and deadlines, `PATCH /admin/batching` (applied in the engine, so every
  front-end sees it), the dashboard's timeline.
- `/metrics`, from any front-end: the engine process's registry, then every
  front-end's counters through prometheus_client's multiprocess mode.
- `/ready` is 200 only once the engine is warm and all N front-ends report ready.
- A front-end that dies is restarted (at most `MAX_RESTARTS` in `RESTART_WINDOW_S`,
  then everything stops with status 1); its queued items are cancelled, as when a
  client hangs up. If the engine process dies, the front-ends' `/health` fails and the
  supervisor stops them and exits 1: never a silent hang.
- SIGTERM or SIGINT (Ctrl-C): every front-end drains (stops admitting, waits for the
  replies of everything it handed the engine) and exits; then the engine drains and
  exits; then the supervisor exits 0. The children run in their own process group, so
  that a Ctrl-C reaches only the supervisor, which orders the shutdown.
- A child whose supervisor disappears (SIGKILL) notices within a second and exits.
  The supervisor's temporary directory (`RunDirectory`: the engine's socket, the
  front-ends' metrics files) is then left behind; the next server removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from server import engine_process
from server.children import child_setup
from server.settings import Settings

logger = logging.getLogger("microbatch.server")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
STOP_GRACE_S = 10.0
"""Beyond the drain timeout: how long a draining child may take to exit before SIGKILL."""
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


RUN_DIR_PREFIX = "microbatch-run-"
OWNER = ".owner"
"""The file a live supervisor holds locked (flock) in its run directory."""


class RunDirectory:
    """The supervisor's temporary directory, only this user can open it: the engine's
    socket and the front-ends' metrics files. Its `OWNER` file stays locked while the
    supervisor lives (a lock, not a pid, so that it holds across pid namespaces: two
    containers sharing /tmp), so that a later server removes what a killed one left
    behind (`remove_stale_run_dirs`), and never a live one's."""

    def __init__(self, parent: str | None = None) -> None:
        remove_stale_run_dirs(parent)
        self.path = tempfile.mkdtemp(prefix=RUN_DIR_PREFIX, dir=parent)
        # Locked before it takes its name: a scan never finds OWNER unlocked while we live.
        claiming = os.path.join(self.path, OWNER + ".new")
        self._owner = os.open(claiming, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(claiming, os.path.join(self.path, OWNER))
        self.socket = os.path.join(self.path, "engine.sock")
        self.metrics = os.path.join(self.path, "metrics")
        os.mkdir(self.metrics)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._owner)


def remove_stale_run_dirs(parent: str | None = None) -> int:
    """Remove the run directories in `parent` (the temporary directory) that this user's
    killed servers left: those whose `OWNER` nobody holds locked. Returns how many."""
    parent = parent or tempfile.gettempdir()
    removed = 0
    with os.scandir(parent) as entries:
        for entry in entries:
            if not entry.name.startswith(RUN_DIR_PREFIX):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
                owner = os.open(os.path.join(entry.path, OWNER), os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue  # not a directory, not ours, or not (yet) claimed
            try:
                fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its supervisor lives
            else:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
            finally:
                os.close(owner)
    if removed:
        logger.info("removed %d temporary directories that killed servers left in %s",
                    removed, parent)  # fmt: skip
    return removed


# A front-end process.


def run_front_end(settings: Settings, path: str, sockets: list[socket.socket]) -> None:
    """A front-end's entry point: uvicorn on the shared sockets, the app on `path`'s
    engine, until SIGTERM (then it drains, see `server.draining`)."""
    child_setup(settings)
    from server import logs
    from server.app import create_app
    from server.draining import DrainingServer

    app = create_app(settings, engine_path=path)
    server = DrainingServer(
        app,
        loop="auto",
        http="httptools",
        lifespan="on",
        log_config=logs.uvicorn_log_config(),
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 1,
        timeout_keep_alive=settings.keep_alive_s,
    )
    # uvicorn raises the signals it caught again once it has shut down; here both end a
    # drained front-end quietly, with status 0 (see server.cli.serve).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: None)
    server.run(sockets=sockets)


# The supervisor.


class Supervisor:
    """Starts the engine and `settings.workers` front-ends, restarts front-ends that
    die, and stops everything in order on SIGTERM/SIGINT (`run` returns the exit
    status)."""

    def __init__(self, settings: Settings, sock: socket.socket) -> None:
        self.settings = settings
        self.sock = sock
        self._context = multiprocessing.get_context("spawn")
        self._run_dir = RunDirectory()
        self.path = self._run_dir.socket
        self.metrics_dir = self._run_dir.metrics
        self.engine: BaseProcess | None = None
        self.front_ends: list[BaseProcess] = []
        self._restarts: deque[float] = deque()
        self._stop = threading.Event()
        self._signals = 0
        self._wake_r, self._wake_w = socket.socketpair()

    def request_stop(self, signum: int, frame: object) -> None:
        """The first signal starts the ordered drain; a second skips the children's wait
        for their last requests (uvicorn's second Ctrl-C); a third kills them."""
        self._signals += 1
        if self._signals == 2:
            logger.warning("second signal: the front-ends stop without waiting")
            self._signal_all(signal.SIGINT, engine=False)  # uvicorn's second Ctrl-C
        elif self._signals > 2:
            logger.warning("third signal: killing the children")
            self._signal_all(signal.SIGKILL)
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        try:
            return self._supervise()
        finally:
            self.sock.close()
            self._run_dir.remove()

    def _supervise(self) -> int:
        settings = self.settings
        # The engine process's metrics stay in its own registry, whatever this process's
        # environment says; the front-ends' go to this run's directory.
        os.environ.pop(METRICS_DIR_VARIABLE, None)
        self.engine = self._context.Process(
            target=engine_process.run,
            args=(settings, self.path, os.getpid()),
            name="microbatch-engine",
        )
        self.engine.start()
        # The front-ends' metrics go to files (prometheus_client reads this variable at
        # import, in each new process); the engine process has started without it.
        os.environ[METRICS_DIR_VARIABLE] = self.metrics_dir
        self.front_ends = [self._start_front_end(i) for i in range(settings.workers)]
        logger.info("supervisor %d: engine process %d, front-ends %s", os.getpid(),
                    self.engine.pid, [p.pid for p in self.front_ends])  # fmt: skip
        while not self._stop.is_set():
            sentinels = [self.engine.sentinel, *(p.sentinel for p in self.front_ends)]
            wait([*sentinels, self._wake_r], timeout=1.0)
            if self._stop.is_set():
                break
            if not self.engine.is_alive():
                logger.error("the engine process exited with status %s; stopping",
                             self.engine.exitcode)  # fmt: skip
                self._stop_front_ends()
                refused = self.engine.exitcode == engine_process.REFUSED
                return engine_process.REFUSED if refused else 1
            for index, process in enumerate(self.front_ends):
                if process.is_alive():
                    continue
                if not self._may_restart():
                    logger.error("front-ends keep dying (%d restarts in %.0f s); stopping",
                                 MAX_RESTARTS, RESTART_WINDOW_S)  # fmt: skip
                    self._stop_front_ends()
                    self._stop_engine()
                    return 1
                logger.error("front-end %d exited with status %s; restarting it",
                             process.pid, process.exitcode)  # fmt: skip
                self._forget(process)
                self.front_ends[index] = self._start_front_end(index)
        logger.info("stopping: draining %d front-ends, then the engine", len(self.front_ends))
        clean = self._stop_front_ends()
        clean = self._stop_engine() and clean
        return 0 if clean else 1

    def _start_front_end(self, index: int) -> BaseProcess:
        process = self._context.Process(
            target=run_front_end,
            args=(self.settings, self.path, [self.sock]),
            name=f"microbatch-front-end-{index}",
        )
        process.start()
        return process

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        self._restarts.append(now)
        return len(self._restarts) <= MAX_RESTARTS

    def _forget(self, process: BaseProcess) -> None:
        """A dead front-end's live gauges no longer count (its counters still do)."""
        from prometheus_client import multiprocess

        if process.pid is not None:
            multiprocess.mark_process_dead(process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    def _signal_all(self, signum: int, engine: bool = True) -> None:
        for process in [*self.front_ends, self.engine if engine else None]:
            if process is not None and process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    def _stop_front_ends(self) -> bool:
        for process in self.front_ends:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        # The front-ends hold their own copies of the listener while they drain; once they
        # are gone, new connections are refused rather than left waiting in the backlog.
        self.sock.close()
        stopped = [self._join(p) for p in self.front_ends]  # every one, whatever the first
        return all(stopped)

    def _stop_engine(self) -> bool:
        if self.engine is None:
            return True
        if self.engine.is_alive() and self.engine.pid is not None:
            os.kill(self.engine.pid, signal.SIGTERM)
        return self._join(self.engine)

    def _join(self, process: BaseProcess) -> bool:
        """Wait for `process` to exit (SIGKILL after the drain timeout and a grace);
        True if it exited with status 0, or by the SIGTERM it was sent before it could
        handle one (while it was still starting: it held nothing to drain)."""
        process.join(self.settings.drain_timeout_s + STOP_GRACE_S)
        if process.is_alive():
            logger.error("%s (%d) did not stop in time; killing it", process.name, process.pid)
            process.kill()
            process.join()
        return process.exitcode in (0, -signal.SIGTERM)


def supervise(settings: Settings, sock: socket.socket) -> int:
    """Run `settings.workers` front-ends on one engine process, all serving `sock`
    (`server.preflight.listen`'s)."""
    host, port = sock.getsockname()[:2]
    logger.info("listening on http://%s:%d with %d front-ends", host, port, settings.workers)
    return Supervisor(settings, sock).run()
