"""Several model replicas behind one queue, in process on fake models."""

from __future__ import annotations

import asyncio

import pytest

from tests.server.fakes import FakeTextModel
from tests.server.live import metric
from tests.server.test_app import serve, wait_until_admitted

pytestmark = pytest.mark.asyncio


async def test_one_queue_feeds_every_replica_and_model_lists_them() -> None:
    first, second = FakeTextModel(), FakeTextModel()
    async with serve([first, second], max_batch_size=4) as client:  # type: ignore[arg-type]
        first.predict_gate.clear()
        second.predict_gate.clear()
        tasks = [
            asyncio.create_task(client.post("/predict", json={"text": f"t{i}"})) for i in range(16)
        ]
        await wait_until_admitted(client, 16)
        await asyncio.to_thread(first.entered.wait, 30)
        await asyncio.to_thread(second.entered.wait, 30)  # both busy at once
        first.predict_gate.set()
        second.predict_gate.set()
        replies = await asyncio.gather(*tasks)
        info = (await client.get("/model")).json()
    assert all(r.status_code == 200 for r in replies)
    assert first.seen, "the first replica computed some"
    assert second.seen, "the second replica computed some"
    assert sorted(first.seen + second.seen) == sorted(f"t{i}" for i in range(16))
    assert [r["alive"] for r in info["replicas"]] == [True, True]


async def test_a_broken_replica_leaves_the_server_healthy_and_serving() -> None:
    class Broken(FakeTextModel):
        def predict(self, items):  # type: ignore[no-untyped-def]
            raise RuntimeError("device lost")

    broken, healthy = Broken(), FakeTextModel()
    replies = []
    async with serve([broken, healthy], max_batch_size=4) as client:  # type: ignore[arg-type]
        for wave in range(50):  # until the broken one is out: it gets work while the other is busy
            replies += await asyncio.gather(
                *(client.post("/predict", json={"text": f"{wave}-{i}"}) for i in range(40))
            )
            info = (await client.get("/model")).json()
            if not info["replicas"][0]["alive"]:
                break
        health = await client.get("/health")
        metrics = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in replies), "no request paid for the broken replica"
    assert [r["alive"] for r in info["replicas"]] == [False, True]
    assert health.status_code == 200
    assert metric(metrics, "microbatch_replicas_alive") == 1
