"""Versions loaded and unloaded while the server runs (`POST` and `DELETE /admin/models`):
in process, a real tiny BERT loaded beside a fake; on a real server, a new version of an
embedder loaded, given the traffic and its old version unloaded under a steady load,
with no failed request and every answer equal to the reference library's for the
version that gave it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ServerProcess
from tests.server.fakes import EncodingBlocks, FakeTextModel, fake_embedding
from tests.server.live import metric
from tests.server.test_versions import serve
from tests.tiny_models import Kind, save_bert, save_embedder


async def until_state(
    client: httpx.AsyncClient, key: str, state: str, headers: dict[str, str]
) -> dict[str, object]:
    """Wait for a version's state (it loads and warms in the background)."""
    async with asyncio.timeout(120):
        while True:
            listed = (await client.get("/admin/models", headers=headers)).json()
            versions = {v["name"]: v for v in listed}
            if versions[key]["status"] == state:
                return versions[key]
            assert versions[key]["status"] != "failed", versions[key]
            await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_a_version_loads_takes_traffic_once_ready_and_the_old_one_unloads(
    tmp_path: Path,
) -> None:
    bert = save_bert(tmp_path / "bert")
    models = {"emb@v1": FakeTextModel(name="emb", embedding=[1.0, 0.0])}
    settings = {"compile": False, "dtype": "float32", "admin_key": "secret"}
    admin = {"Authorization": "Bearer secret"}
    async with serve(models, **settings) as client:
        load = {"name": "emb", "version": "v2", "path": str(bert)}
        assert (await client.post("/admin/models", json=load)).status_code == 403
        started = await client.post("/admin/models", json=load, headers=admin)
        assert started.status_code == 202
        assert started.json()["status"] == "loading"
        # Routed to v2 at once: traffic stays on v1 until v2 is ready.
        moved = await client.patch("/admin/routes", json={"emb": {"v2": 1}}, headers=admin)
        assert moved.status_code == 200
        again = await client.post("/admin/models", json=load, headers=admin)
        assert again.status_code == 409
        missing = {**load, "version": "v3", "path": str(tmp_path / "nowhere")}
        assert (await client.post("/admin/models", json=missing, headers=admin)).status_code == 422
        await until_state(client, "emb@v2", "ready", admin)
        reply = await client.post("/predict", json={"text": "hello", "model": "emb"})
        assert reply.headers["x-model-version"] == "v2"
        assert len(reply.json()["embedding"]) == 32, "the tiny BERT's width"
        assert (await client.get("/ready")).status_code == 200
        last = await client.delete("/admin/models/emb@v2", headers=admin)
        assert last.status_code == 409
        assert "last version of 'emb' that takes traffic" in last.json()["detail"]
        gone = await client.delete("/admin/models/emb@v1", headers=admin)
        assert gone.status_code == 200
        assert gone.json()["measure"] == "resident set"
        pinned = await client.post("/predict", json={"text": "x", "model": "emb@v1"})
        assert pinned.status_code == 404
        metrics = (await client.get("/metrics")).text
    assert 'model="emb@v1"' not in metrics, "an unloaded version's series go with it"
    assert metric(metrics, 'microbatch_admitted_items_total{model="emb@v2"}') >= 1


@pytest.mark.asyncio
async def test_a_request_that_chose_a_version_before_its_unload_is_answered_by_it() -> None:
    """The unload stops routing at once, but a request that chose the version and is
    still tokenizing (before it reaches the queue that the unload drains) finishes on it."""
    v1 = EncodingBlocks(name="emb")
    models = {"emb@v1": v1, "emb@v2": FakeTextModel(name="emb", embedding=[0.0, 1.0])}
    async with serve(models) as client:
        v1.gate.clear()
        text = "long " * 100  # over INLINE_CHARS: tokenized on a thread, behind the gate
        chose = asyncio.create_task(client.post("/predict", json={"text": text, "model": "emb"}))
        assert await asyncio.to_thread(v1.entered.wait, 30)
        await client.patch("/admin/routes", json={"emb": {"v2": 1}})
        unload = asyncio.create_task(client.delete("/admin/models/emb@v1"))
        other = await client.post("/predict", json={"text": "short", "model": "emb"})
        assert other.headers["x-model-version"] == "v2"
        v1.gate.set()
        reply = await chose
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-model-version"] == "v1"
        assert reply.json()["embedding"] == fake_embedding(text[:64])
        assert (await unload).status_code == 200


@pytest.fixture(scope="module")
def two_embedders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("versions")
    return {
        "v1": save_embedder(root / "v1", Kind("cls", pooling="cls")),
        "v2": save_embedder(root / "v2", Kind("mean", pooling="mean")),
    }


def state_of(admin: httpx.Client, key: str) -> str:
    return str({v["name"]: v["status"] for v in admin.get("/admin/models").json()}[key])


class SteadyLoad:
    """Clients sending requests in a loop until stopped, keeping every reply."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.replies: list[tuple[int, str, str, list[float]]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, client: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            i = 0
            while not self._stop.is_set():
                text = f"request {client}-{i}: steady traffic"
                r = http.post("/predict", json={"text": text, "model": "emb"})
                body = r.json()
                self.replies.append((r.status_code, r.headers.get("x-model-version", ""), text,
                                     body.get("embedding", [])))  # fmt: skip
                i += 1

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


@pytest.fixture
def server(two_embedders: dict[str, Path], tmp_path: Path) -> Iterator[ServerProcess]:
    args = ["--model", f"emb@v1={two_embedders['v1']}", "--no-compile", "--dtype", "float32"]
    process = ServerProcess(args, tmp_path / "server.log").start()
    yield process
    assert process.stop() == 0, process.log()


@pytest.mark.slow
@pytest.mark.reference
def test_a_new_version_replaces_the_old_under_load_without_a_failed_request(
    server: ServerProcess, two_embedders: dict[str, Path]
) -> None:
    from sentence_transformers import SentenceTransformer

    url = server.url
    with SteadyLoad(url) as load, httpx.Client(base_url=url, timeout=60) as admin:
        while len(load.replies) < 20:
            time.sleep(0.01)  # the load is under way: watch another thread's progress
        v2 = {"name": "emb", "version": "v2", "path": str(two_embedders["v2"])}
        started = admin.post("/admin/models", json=v2)
        assert started.status_code == 202, started.text
        assert admin.patch("/admin/routes", json={"emb": {"v2": 1}}).status_code == 200
        deadline = time.monotonic() + 120
        while state_of(admin, "emb@v2") != "ready":
            assert time.monotonic() < deadline, "v2 never became ready"
            time.sleep(0.05)  # the server's state, loading in the background
        while sum(1 for r in list(load.replies) if r[1] == "v2") < 20:
            time.sleep(0.01)  # the load's threads' progress, as above
        unloaded = admin.delete("/admin/models/emb@v1")
        assert unloaded.status_code == 200, unloaded.text
        after = len(load.replies)
        while len(load.replies) < after + 20:
            time.sleep(0.01)  # the load's threads' progress, as above
        listed = [m["id"] for m in admin.get("/v1/models").json()["data"]]
    replies = list(load.replies)
    assert [r for r in replies if r[0] != 200] == [], "no request failed"
    versions = [r[1] for r in replies]
    assert "v1" in versions
    assert "v2" in versions
    # Each of the 4 clients may append a reply it had in hand when the unload returned.
    assert set(versions[after + 4 :]) == {"v2"}, "once v1 is gone, v2 answers everything"
    assert listed == ["emb@v2"]
    for version in ("v1", "v2"):
        mine = [r for r in replies if r[1] == version][:16]
        reference = SentenceTransformer(str(two_embedders[version]), device="cpu").encode(
            [r[2] for r in mine]
        )
        ours = np.array([r[3] for r in mine])
        assert np.min(np.sum(ours * reference, axis=1)) > 0.9999, version
