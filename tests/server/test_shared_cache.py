"""The shared tier of the result cache against a real `redis-server` (Debian's package),
started on a free localhost port in a temporary directory, and killed mid-run."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter

from batcher.models import Classification, Encoded
from benchmarks.processes import free_port
from server.shared_cache import SharedCache, decode_output, encode_output, shared_key
from tests.server.fakes import FakeTextModel, fake_embedding
from tests.server.test_app import serve

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        for _ in range(500):
            ping = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            )
            if ping.stdout.strip() == "PONG":
                return self
            if self.process.poll() is not None:
                raise RuntimeError("redis-server exited")
        raise RuntimeError("redis-server did not answer")

    def keys(self) -> int:
        out = subprocess.run(["redis-cli", "-p", str(self.port), "dbsize"], capture_output=True)
        return int(out.stdout.strip() or 0)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()


async def until(condition: Callable[[], bool]) -> None:
    """Wait for an observable state of another process (polling, not ordering)."""
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110 (state of another process)
            await asyncio.sleep(0.01)


async def test_outputs_go_through_redis_exactly_and_keys_hold_every_option() -> None:
    computed = np.array([0.5, -1.25, 3.0e-3], dtype=np.float32).tolist()  # as models answer
    assert decode_output(encode_output(computed)) == computed
    label = Classification("long", 0.75, [0.25, 0.75])
    assert decode_output(encode_output(label)) == label
    base = shared_key("m:", Encoded([1, 2, 3], False))
    assert shared_key("m:", Encoded([1, 2, 3], True)) == base
    for other in (
        Encoded([1, 2, 3], False, normalize=True),
        Encoded([1, 2, 3], False, dimensions=2),
        Encoded([1, 2, 3], False, type_ids=[0, 0, 1]),
        Encoded([1, 2, 3], False, raw_scores=True),
        Encoded([1, 2, 3], False, prompt_tokens=1),
    ):
        assert shared_key("m:", other) != base
    assert shared_key("other-model:", Encoded([1, 2, 3], False)) != base
    with pytest.raises(ValueError, match="not a cached output"):
        decode_output(b"something else")


async def test_two_servers_compute_an_input_once_through_a_shared_redis(
    redis_server: RedisServer,
) -> None:
    first, second = FakeTextModel(), FakeTextModel()
    async with (
        serve(first, cache_url=redis_server.url) as a,
        serve(second, cache_url=redis_server.url) as b,
    ):
        computed = await a.post("/predict", json={"text": "hello"})
        await until(lambda: redis_server.keys() == 1)  # stored in the background
        shared = await b.post("/predict", json={"text": "hello"})
        again = await b.post("/predict", json={"text": "hello"})  # now in b's own cache
        fresh = await b.post(
            "/predict", json={"text": "hello"}, headers={"cache-control": "no-cache"}
        )
        metrics = (await b.get("/metrics")).text
    assert computed.headers["x-cache"] == "miss"
    assert shared.headers["x-cache"] == again.headers["x-cache"] == "hit"
    assert shared.json()["embedding"] == fake_embedding("hello")
    assert fresh.headers["x-cache"] == "miss"
    assert first.seen == ["hello"]
    assert second.seen == ["hello"], "computed by the second server only when asked to"
    assert "microbatch_cache_shared_hits_total 1.0" in metrics


async def test_redis_killed_mid_run_loses_nothing_and_is_counted(
    redis_server: RedisServer,
) -> None:
    model = FakeTextModel()
    texts = [f"text {i}" for i in range(40)]
    async with serve(model, cache_url=redis_server.url) as client:
        before = await asyncio.gather(
            *(client.post("/predict", json={"text": t}) for t in texts[:20])
        )
        redis_server.kill()
        after = await asyncio.gather(
            *(
                client.post("/predict", json={"text": t}, headers={"cache-control": "no-cache"})
                for t in texts
            )
        )
        metrics = (await client.get("/metrics")).text
    replies = [*before, *after]
    assert all(r.status_code == 200 for r in replies)
    assert [r.json()["embedding"] for r in after] == [fake_embedding(t) for t in texts]
    errors = [line for line in metrics.splitlines()
              if line.startswith("microbatch_cache_shared_errors_total")]  # fmt: skip
    assert float(errors[0].split()[1]) >= 1


async def test_after_an_error_redis_is_left_alone_then_tried_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    now = [0.0]
    registry = CollectorRegistry()
    hits, errors = (Counter(name, name, registry=registry) for name in ("hits", "errors"))
    cache = SharedCache(
        redis_server.url, "t:", 60.0, hits, errors, pause_s=5.0, clock=lambda: now[0]
    )
    item = Encoded([7, 8], False)
    try:
        cache.put_many([(item, [1.0, 2.0])])
        await until(lambda: redis_server.keys() == 1)
        assert await cache.get_many([item]) == [[1.0, 2.0]]
        redis_server.kill()
        assert await cache.get_many([item]) == [None]
        assert not cache.available
        assert registry.get_sample_value("errors_total") == 1
        revived = RedisServer(tmp_path)
        revived.port = redis_server.port
        revived.start()
        try:
            assert await cache.get_many([item]) == [None], "paused: not even asked"
            now[0] = 5.0
            cache.put_many([(item, [3.0])])
            await until(lambda: revived.keys() == 1)
            assert await cache.get_many([item]) == [[3.0]]
        finally:
            revived.kill()
    finally:
        await cache.aclose()
