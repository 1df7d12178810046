"""`microbatch serve --workers 2`: a real supervisor, engine process and two uvicorn
front-ends on the default model. What holds for one process holds across them: the
same vectors as sentence-transformers, one queue and its 429s, `PATCH /admin/batching`
seen by every front-end, one `/metrics`, a SIGTERM drain that answers every admitted
item, and a dead process noticed (a front-end restarted, a dead engine: exit 1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ServerProcess
from tests.server.live import metric
from tests.server.test_e2e import cosine, post_all, varied_texts

pytestmark = pytest.mark.slow

EAGER = ["--workers", "2", "--no-compile", "--dtype", "float32", "--torch-threads", "1"]
LONG = "the servers batch many small requests into one large forward pass " * 40  # 256 tokens


def whole_log(server: ServerProcess) -> str:
    return server.log_path.read_text(errors="replace")


def stopped_in_order(log: str) -> bool:
    """Both front-ends said they finished before the engine process said it stopped."""
    engine = re.search(r"engine process \d+ stopped", log)
    finished = [m.start() for m in re.finditer("Finished server process", log)]
    return engine is not None and len(finished) == 2 and max(finished) < engine.start()


def pids(server: ServerProcess) -> tuple[int, list[int]]:
    """The engine process's pid and the front-ends', as the supervisor logged them."""
    found = re.findall(r"engine process (\d+), front-ends \[([\d, ]+)\]", whole_log(server))
    engine, front_ends = found[-1]
    return int(engine), [int(p) for p in front_ends.split(", ")]


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [*EAGER, "--max-queue-size", "8"]
    log = tmp_path_factory.mktemp("logs") / "workers.log"
    server = ServerProcess(args, log, grpc=True).start()
    yield server
    assert server.stop() == 0, server.log()
    log = whole_log(server)
    assert "stopping: draining 2 front-ends, then the engine" in log
    assert stopped_in_order(log), "the front-ends stop before the engine"


def test_ready_waits_for_the_engine_and_both_front_ends(workers: ServerProcess) -> None:
    assert workers.ready_statuses[-1] == 200
    assert 0 in workers.ready_statuses or 503 in workers.ready_statuses
    engine, front_ends = pids(workers)
    assert len(set(front_ends)) == 2
    assert engine not in front_ends
    model = httpx.get(f"{workers.url}/model").json()
    assert model["dtype"] == "float32"  # the engine's model, not the front-ends' copy
    assert model["device"] == "cpu"


def maps_libtorch(pid: int) -> bool:
    """Whether the process `pid` has torch's shared library mapped (it imported torch)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return re.search(r"/libtorch(_cpu|_cuda|_python)?\.so", maps) is not None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_exactly_one_process_maps_libtorch_the_engine(workers: ServerProcess) -> None:
    """The front-ends encode with the encoder the engine sent them: no torch, no
    transformers, in any process but the engine's (the supervisor's neither). Torch
    shows in the maps as its shared libraries; transformers, pure Python, does not:
    tests/server/test_boundaries.py holds a front-end's modules to neither."""
    engine, front_ends = pids(workers)
    assert workers.process is not None
    supervisor = workers.process.pid
    assert httpx.post(f"{workers.url}/predict", json={"text": "through a front-end"}).is_success
    mapped = {pid: maps_libtorch(pid) for pid in [supervisor, engine, *front_ends]}
    assert mapped == {supervisor: False, engine: True, **dict.fromkeys(front_ends, False)}
    for pid in front_ends:
        assert "/torch/" not in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.reference
def test_embeddings_match_sentence_transformers_across_processes(workers: ServerProcess) -> None:
    from sentence_transformers import SentenceTransformer

    from batcher.models import default_source

    texts = varied_texts(40, seed=11)
    reference = SentenceTransformer(default_source(), device="cpu").encode(texts).tolist()
    bodies: list[dict[str, object]] = [{"input": t} for t in texts]
    # 4 connections: within the queue of 8, batched across both front-ends.
    replies = asyncio.run(post_all(workers.url, "/v1/embeddings", bodies, clients=4))
    for r, theirs in zip(replies, reference, strict=True):
        assert r.status_code == 200, r.text
        [ours] = r.json()["data"]
        assert cosine(ours["embedding"], theirs) >= 0.9999


def test_one_queue_refuses_with_429_whichever_front_end_filled_it(workers: ServerProcess) -> None:
    """64 requests of 256 tokens from 32 connections at a queue of 8 items: some are
    refused, each with the queue's 429, the rest answered; the engine counts both."""
    text = httpx.get(f"{workers.url}/metrics").text
    before_ok = metric(text, 'microbatch_items_total{outcome="ok"}')
    before_full = metric(text, 'microbatch_items_total{outcome="rejected_full"}')
    refused_early = metric(text, 'microbatch_requests_refused_total{reason="queue_full"}')
    bodies: list[dict[str, object]] = [{"text": f"{i} {LONG}"} for i in range(64)]
    replies = asyncio.run(post_all(workers.url, "/predict", bodies, clients=32))
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses, statuses
    assert 429 in statuses, statuses
    for r in replies:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json()["type"] == "queue_full"
    text = httpx.get(f"{workers.url}/metrics").text
    ok = metric(text, 'microbatch_items_total{outcome="ok"}') - before_ok
    full = metric(text, 'microbatch_items_total{outcome="rejected_full"}') - before_full
    early = metric(text, 'microbatch_requests_refused_total{reason="queue_full"}')
    assert ok == statuses.count(200)
    assert full + (early - refused_early) == statuses.count(429)


def test_a_patch_through_one_front_end_is_what_every_front_end_says(
    workers: ServerProcess,
) -> None:
    before = httpx.get(f"{workers.url}/admin/batching").json()
    r = httpx.patch(f"{workers.url}/admin/batching", json={"max_wait_ms": 7}, timeout=60)
    assert r.status_code == 200
    assert r.json()["max_wait_ms"] == 7
    try:
        for _ in range(12):  # a new connection each: the kernel hands them to either
            with httpx.Client(base_url=workers.url) as client:
                assert client.get("/admin/batching").json()["max_wait_ms"] == 7
                assert client.get("/model").json()["batching"]["max_wait_ms"] == 7
        bad = httpx.patch(f"{workers.url}/admin/batching", json={"max_wait_ms": -1})
        assert bad.status_code == 422
    finally:
        httpx.patch(f"{workers.url}/admin/batching", json={"max_wait_ms": before["max_wait_ms"]})


def test_metrics_are_one_coherent_page_from_any_front_end(workers: ServerProcess) -> None:
    bodies: list[dict[str, object]] = [{"text": f"metrics {i}"} for i in range(24)]
    replies = asyncio.run(post_all(workers.url, "/predict", bodies, clients=6))
    assert all(r.status_code == 200 for r in replies)
    pages = []
    for _ in range(8):
        with httpx.Client(base_url=workers.url) as client:
            pages.append(client.get("/metrics").text)
    for page in pages:
        families = re.findall(r"^# TYPE (\S+) ", page, re.MULTILINE)
        assert len(families) == len(set(families)), "each family once"
        assert "process_resident_memory_bytes" in families  # the engine process's
        assert "microbatch_batch_size" in families
    # Every front-end's requests are counted on every page: the counts only grow
    # between two pages, whichever front-end answered them.
    name = 'microbatch_request_duration_seconds_count{route="/predict",status="200"}'
    counts = [metric(page, name) for page in pages]
    assert counts == sorted(counts)
    assert counts[0] >= 24
    admitted = [metric(page, "microbatch_admitted_items_total") for page in pages]
    assert len(set(admitted)) == 1, "no request in between: every page says the same"


def test_sigterm_drains_every_front_end_then_the_engine_and_exits_0(tmp_path: Path) -> None:
    args = [*EAGER, "--max-batch-size", "16", "--drain-timeout-s", "300"]
    args += ["--request-timeout-s", "300"]
    server = ServerProcess(args, tmp_path / "server.log").start()
    assert server.process is not None

    async def admitted(client: httpx.AsyncClient) -> float:
        return metric((await client.get("/metrics")).text, "microbatch_admitted_items_total")

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=server.url, timeout=330, limits=limits) as client:
            texts = [[f"{i} {j} {LONG}" for j in range(16)] for i in range(6)]
            work = [
                asyncio.create_task(client.post("/predict/batch", json={"texts": batch}))
                for batch in texts
            ]
            async with asyncio.timeout(120):
                while await admitted(client) < 96:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # the server's state, polled
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                while (ready := await client.get("/ready")).status_code == 200:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # the signal travels supervisor -> front-end
            late = await client.post("/v1/embeddings", json={"input": "after SIGTERM"})
            assert not any(t.done() for t in work), "the drain was over before we looked"
            return await asyncio.gather(*work), ready, late

    replies, ready, late = asyncio.run(scenario())
    code = server.process.wait(timeout=330)
    log = whole_log(server)
    assert ready.json()["status"] == "draining"
    assert late.status_code == 503
    assert late.json()["error"]["code"] == "not_ready"
    assert [r.status_code for r in replies] == [200] * 6, log
    assert sum(len(r.json()["results"]) for r in replies) == 96
    assert code == 0, log
    [stopped] = re.findall(r"stopped: (\{.*\})", log)
    counts = json.loads(stopped.replace("'", '"'))
    assert counts["admitted"] == counts["ok"] == 96
    assert stopped_in_order(log)


def test_a_dead_front_end_is_restarted_and_a_dead_engine_stops_everything(
    tmp_path: Path,
) -> None:
    server = ServerProcess(EAGER, tmp_path / "server.log").start()
    assert server.process is not None
    engine, front_ends = pids(server)
    os.kill(front_ends[0], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while "exited with status -9; restarting it" not in whole_log(server):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)  # polling a child process's log, not ordering events
    while httpx.get(f"{server.url}/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)  # the new front-end loads its tokenizer and reports in
    r = httpx.post(f"{server.url}/predict", json={"text": "after a restart"}, timeout=60)
    assert r.status_code == 200

    os.kill(engine, signal.SIGKILL)
    code = server.process.wait(timeout=120)
    log = whole_log(server)
    assert code == 1, log
    assert "the engine process exited with status -9; stopping" in log


def test_children_whose_supervisor_is_killed_exit_and_free_the_port(tmp_path: Path) -> None:
    server = ServerProcess(EAGER, tmp_path / "server.log").start()
    assert server.process is not None
    engine, front_ends = pids(server)
    server.process.kill()
    server.process.wait(timeout=30)
    deadline = time.monotonic() + 60
    for pid in [engine, *front_ends]:
        while os.path.exists(f"/proc/{pid}") and not _zombie(pid):
            assert time.monotonic() < deadline, f"process {pid} outlived its supervisor"
            time.sleep(0.1)  # polling other processes' lives, not ordering events
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=5)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return False


def test_the_dashboard_counts_every_front_ends_requests(workers: ServerProcess) -> None:
    """The timeline lives in the engine process; each front-end hands it the latencies
    of the requests it answered."""
    started = time.time()
    bodies: list[dict[str, object]] = [{"text": f"dashboard {i}"} for i in range(30)]
    replies = asyncio.run(post_all(workers.url, "/predict", bodies, clients=6))
    assert all(r.status_code == 200 for r in replies)
    deadline = time.monotonic() + 30
    counted = 0
    while counted < 30:
        assert time.monotonic() < deadline, f"only {counted} of 30 requests on the dashboard"
        time.sleep(0.2)  # the engine samples once a second: poll its state
        data = httpx.get(f"{workers.url}/dashboard/data", params={"since": started}).json()
        counted = sum(s["requests"] for s in data["samples"])
    assert data["status"] == "ready"
    assert data["dtype"] == "float32"


def test_quantized_token_and_chunked_outputs_cross_the_engine_link(
    workers: ServerProcess,
) -> None:
    """The calibration ranges reach every front-end with the encoder: a text's int8 bytes
    are the same whichever front-end answers (one connection each) and are
    `quantize_embeddings` of its vector; token vectors and a chunked text's windows come
    back across the processes."""
    from sentence_transformers import SentenceTransformer, quantize_embeddings

    from batcher.models import default_source

    url = workers.url
    text = "one text, the same bytes from every front-end"
    answers = set()
    for _ in range(16):  # new connections land on either front-end (all on one: 1 in 30,000)
        with httpx.Client(base_url=url, timeout=60) as client:
            reply = client.post("/predict", json={"text": text, "embedding_type": "int8"})
            assert reply.status_code == 200, reply.text
            answers.add(tuple(reply.json()["embedding"]))
    assert len(answers) == 1
    ranges = httpx.get(f"{url}/model/calibration").json()["ranges"]
    floats = httpx.post(f"{url}/predict", json={"text": text}).json()["embedding"]
    expected = quantize_embeddings(np.array([floats], dtype=np.float32), "int8",
                                   ranges=np.array(ranges, dtype=np.float32))  # fmt: skip
    assert list(answers.pop()) == expected[0].tolist()
    st = SentenceTransformer(default_source(), device="cpu")
    tokens = httpx.post(f"{url}/embed_all", json={"inputs": text}).json()[0]
    want = st.encode([text], output_value="token_embeddings")[0].numpy()
    np.testing.assert_allclose(tokens, want, atol=1e-5)
    chunked = httpx.post(f"{url}/predict", json={"text": LONG + LONG[:1200], "chunking": "mean"})
    assert chunked.status_code == 200, chunked.text
    assert chunked.json()["truncated"] is False
    assert cosine(chunked.json()["embedding"], st.encode(LONG)) > 0.9


def listening_pids(port: int) -> set[int]:
    """The processes with a socket listening on TCP `port` (from /proc: Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    found.add(int(pid))
    return found


def test_every_front_end_serves_grpc_and_answers_as_http(workers: ServerProcess) -> None:
    """Both front-ends listen on --grpc-port (SO_REUSEPORT), the engine process does not;
    calls on 16 new connections, whichever front-end takes them, get /predict's vectors."""
    import grpc

    from server.kserve import messages as pb
    from server.kserve.tensors import pack_bytes

    engine, front_ends = pids(workers)
    port = int(workers.grpc_target.rsplit(":", 1)[1])
    listening = listening_pids(port)
    assert listening == set(front_ends)
    assert engine not in listening
    texts = [f"grpc across front-ends {i}" for i in range(16)]
    for text in texts:
        with grpc.insecure_channel(workers.grpc_target) as channel:
            infer = channel.unary_unary(
                f"/{pb.SERVICE}/ModelInfer",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            request = pb.ModelInferRequest(model_name="any")
            request.inputs.add(name="text", datatype="BYTES", shape=[1])
            request.raw_input_contents.append(pack_bytes([text.encode()]))
            reply = infer(request, timeout=60)
        ours = np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
        theirs = httpx.post(f"{workers.url}/predict", json={"text": text}).json()["embedding"]
        assert cosine(ours.tolist(), theirs) >= 0.9999
