"""SIGTERM to a real `microbatch serve` process under load: readiness flips at once, new
work is refused with 503, every admitted item is answered, and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.server.live import metric

pytestmark = pytest.mark.slow

LONG = "the servers batch many small requests into one large forward pass " * 40  # 256 tokens


async def admitted(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return metric(text, "microbatch_admitted_items_total") if "microbatch_admitted" in text else 0.0


def test_sigterm_under_load_drains_every_admitted_request_then_exits_0(tmp_path: Path) -> None:
    # The default model, eager: 128 items of 256 tokens are seconds of CPU work, so the
    # drain is long enough to observe from outside. Deadlines are long: this test is about
    # the drain, and a slow runner must not turn it into a test of --request-timeout-s.
    args = ["--no-compile", "--max-batch-size", "16", "--drain-timeout-s", "300"]
    args += ["--request-timeout-s", "300"]
    server = ServerProcess(args, tmp_path / "server.log").start()
    assert server.process is not None

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, httpx.Response, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=330) as client:
            texts = [[f"{i} {j} {LONG}" for j in range(32)] for i in range(4)]
            # Every protocol's route drains alike: ours, OpenAI's and TEI's.
            calls = [("/predict/batch", "texts"), ("/predict/batch", "texts"),
                     ("/v1/embeddings", "input"), ("/embed", "inputs")]  # fmt: skip
            work = [
                asyncio.create_task(client.post(path, json={field: batch}))
                for (path, field), batch in zip(calls, texts, strict=True)
            ]
            async with asyncio.timeout(60):
                while await admitted(client) < 128:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # the server's state, polled
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            signalled = time.perf_counter()
            ready = await client.get("/ready")
            late = await client.post("/predict", json={"text": "after SIGTERM"})
            late_openai = await client.post("/v1/embeddings", json={"input": "after SIGTERM"})
            assert not any(t.done() for t in work), "the drain was over before we looked"
            assert late_openai.status_code == 503
            assert late_openai.json()["error"]["code"] == "not_ready"
            return await asyncio.gather(*work), ready, late, signalled

    replies, ready, late, signalled = asyncio.run(scenario())
    code = server.process.wait(timeout=330)
    exited_after_s = time.perf_counter() - signalled
    log = server.log()

    assert ready.status_code == 503
    assert ready.json()["status"] == "draining"
    assert late.status_code == 503
    assert late.json()["type"] == "not_ready"
    assert [r.status_code for r in replies] == [200] * 4
    bodies = [r.json() for r in replies]
    vectors = [*bodies[0]["results"], *bodies[1]["results"], *bodies[2]["data"], *bodies[3]]
    assert len(vectors) == 128
    assert code == 0, log
    assert exited_after_s < 300, "within the drain timeout"
    [stopped] = re.findall(r"stopped: (\{.*\})", log)
    counts = json.loads(stopped.replace("'", '"'))
    assert counts["admitted"] == counts["ok"] == 128
    assert counts["rejected_closed"] == 0
    assert log.count("draining:") == 1, "the drain is announced once"


def test_ctrl_c_drains_and_exits_0_without_a_traceback(
    tmp_path: Path, tiny_encoder_dir: Path
) -> None:
    args = ["--model", str(tiny_encoder_dir), "--no-compile"]
    server = ServerProcess(args, tmp_path / "server.log").start()
    assert httpx.post(f"{server.url}/predict", json={"text": "hello"}).status_code == 200
    assert server.process is not None
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=60) == 0, server.log()
    log = server.log()
    assert "stopped: {'admitted': 1, 'coalesced': 0, 'ok': 1" in log
    assert "Traceback" not in log
    assert "KeyboardInterrupt" not in log
    assert log.count("draining:") == 1, "the drain is announced once"
