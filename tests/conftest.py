"""Shared fixtures: tiny models built from a config (nothing is downloaded), and a real
`microbatch serve` process on a free localhost port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from benchmarks.processes import free_port
from tests.tiny_models import save_bert

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `reference` need sentence-transformers: where it is not installed
    (it comes with the dev extra, or with the default model's package) they skip."""
    import importlib.util

    if importlib.util.find_spec("sentence_transformers") is not None:
        return
    skip = pytest.mark.skip(reason="sentence-transformers is not installed")
    for item in items:
        if "reference" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    labels = {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    return save_bert(tmp_path_factory.mktemp("tiny-classifier"), head=True, **labels)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bert(tmp_path_factory.mktemp("tiny-encoder"))


@dataclass
class ServerProcess:
    """`microbatch serve` in a child process; `url` answers once `start` returns."""

    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    startup_s: float = 0.0
    ready_statuses: tuple[int, ...] = ()
    grpc: bool = False
    """Serve gRPC too, on a free port (`grpc_target`)."""
    grpc_target: str = ""

    def start(self, timeout_s: float = 240) -> ServerProcess:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *self.args]
        if self.grpc:
            grpc_port = free_port()
            self.grpc_target = f"127.0.0.1:{grpc_port}"
            command += ["--grpc-port", str(grpc_port)]
        started = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        seen: list[int] = []
        deadline = started + timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}:\n{self.log()}")
            try:
                status = httpx.get(f"{self.url}/ready", timeout=5).status_code
            except httpx.TransportError:
                status = 0  # not listening yet
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == 200:
                self.startup_s = time.perf_counter() - started
                self.ready_statuses = tuple(seen)
                return self
            time.sleep(0.1)  # polling a child process's readiness, not ordering events
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s}s:\n{self.log()}")

    def stop(self, timeout_s: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@pytest.fixture(scope="session")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The built-in default model, compiled, exactly as the Quickstart starts it."""
    server = ServerProcess([], tmp_path_factory.mktemp("logs") / "default.log").start()
    yield server
    code = server.stop()
    assert code == 0, server.log()


@pytest.fixture(scope="session")
def float32_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The built-in model, compiled, in float32 whatever the CPU: the server whose
    numbers are compared with the reference libraries' at float32 tolerances (the
    default, `--dtype auto`, may pick bfloat16, which has its own bound). It collates
    ahead as it would on CUDA (`--collate-ahead on`; off on a CPU by default), so that the
    path a GPU takes is held to the reference libraries here too."""
    args = ["--dtype", "float32", "--collate-ahead", "on"]
    log = tmp_path_factory.mktemp("logs") / "float32.log"
    server = ServerProcess(args, log, grpc=True).start()
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="session")
def classifier_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_classifier_dir: Path
) -> Iterator[ServerProcess]:
    args = ["--model", str(tiny_classifier_dir), "--no-compile", "--dtype", "float32"]
    server = ServerProcess(args, tmp_path_factory.mktemp("logs") / "classifier.log").start()
    yield server
    assert server.stop() == 0, server.log()
