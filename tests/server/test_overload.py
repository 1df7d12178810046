"""Overload, deadlines and faults, in process on a fake model whose forward passes the
test holds and releases."""

from __future__ import annotations

import asyncio

import pytest

from tests.server.fakes import FakeTextModel
from tests.server.live import metric
from tests.server.test_app import poll, serve, wait_until_admitted

pytestmark = pytest.mark.asyncio


def sample(metrics: str, name: str) -> float:
    return metric(metrics, name)


async def test_ready_reports_saturated_while_health_stays_ok() -> None:
    model = FakeTextModel()
    async with serve(model, max_batch_size=1, max_queue_size=10, saturated_at=0.5) as client:
        model.predict_gate.clear()
        held = [
            asyncio.create_task(client.post("/predict", json={"text": f"t{i}"})) for i in range(7)
        ]
        await wait_until_admitted(client, 7)
        # one computing, six waiting: on a CPU no batch is staged behind the running one
        await poll(client, "/metrics", lambda r: metric(r.text, "microbatch_queue_depth") == 6)
        saturated = await client.get("/ready")
        health = await client.get("/health")
        model.predict_gate.set()
        await asyncio.gather(*held)
        after = await client.get("/ready")
    assert saturated.status_code == 503
    assert saturated.json()["status"] == "saturated"
    assert saturated.headers["retry-after"] == "1"
    assert health.status_code == 200
    assert after.status_code == 200


async def test_timeout_header_shortens_the_deadline_and_the_item_is_never_computed() -> None:
    model = FakeTextModel()
    async with serve(model, max_batch_size=1, request_timeout_s=30) as client:
        model.predict_gate.clear()
        blocker = asyncio.create_task(client.post("/predict", json={"text": "blocker"}))
        await asyncio.to_thread(model.entered.wait, 30)
        staged = asyncio.create_task(client.post("/predict", json={"text": "staged"}))
        await wait_until_admitted(client, 2)
        late = await client.post(
            "/predict", json={"text": "in a hurry"}, headers={"X-Request-Timeout-Ms": "50"}
        )
        model.predict_gate.set()
        await asyncio.gather(blocker, staged)
    assert late.status_code == 504
    assert late.json()["type"] == "deadline_exceeded"
    assert "in a hurry" not in model.seen
    assert blocker.result().status_code == 200


@pytest.mark.parametrize("value", ["0", "-5", "abc", "nan", "400000"])
async def test_a_bad_timeout_header_is_422(value: str) -> None:
    model = FakeTextModel()
    async with serve(model, max_request_timeout_s=300) as client:
        r = await client.post(
            "/predict", json={"text": "x"}, headers={"X-Request-Timeout-Ms": value}
        )
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["header", "x-request-timeout-ms"]
    assert model.seen == []


async def test_watchdog_fails_health_while_a_forward_pass_hangs() -> None:
    model = FakeTextModel()
    async with serve(model, watchdog_s=0.01) as client:
        assert (await client.get("/health")).status_code == 200
        model.predict_gate.clear()
        stuck = asyncio.create_task(client.post("/predict", json={"text": "hangs"}))
        await asyncio.to_thread(model.entered.wait, 30)
        await poll(client, "/health", lambda r: r.status_code == 503)
        health = await client.get("/health")
        ready = await client.get("/ready")
        metrics = (await client.get("/metrics")).text
        model.predict_gate.set()
        await stuck
        recovered = await client.get("/health")
    assert health.json()["status"] == "failed"
    assert "stuck" in health.json()["detail"]
    assert "--watchdog-s" in health.json()["detail"]
    assert ready.status_code == 503
    assert sample(metrics, "microbatch_device_busy_seconds") > 0.01
    assert recovered.status_code == 200


async def test_out_of_memory_on_big_batches_is_absorbed_by_splitting() -> None:
    class SmallDevice(FakeTextModel):
        def predict(self, items):  # type: ignore[no-untyped-def]
            from batcher import DeviceOutOfMemory

            if len(items) > 4:
                self.batches.append(-len(items))  # record the failed attempt
                raise DeviceOutOfMemory(f"{len(items)} items do not fit")
            return super().predict(items)

    model = SmallDevice()
    async with serve(model, max_batch_size=32, policy="window", max_wait_ms=200) as client:
        model.predict_gate.clear()
        texts = [f"text {i:02d}" for i in range(16)]
        tasks = [asyncio.create_task(client.post("/predict", json={"text": t})) for t in texts]
        await wait_until_admitted(client, 16)
        model.predict_gate.set()
        replies = await asyncio.gather(*tasks)
        info = (await client.get("/model")).json()
        metrics = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in replies)
    assert any(b < 0 for b in model.batches), "the device did run out of memory"
    assert sorted(model.seen) == texts, "each text computed exactly once"
    assert info["memory_cap_tokens"] is not None
    assert sample(metrics, "microbatch_device_out_of_memory_total") >= 1


async def test_a_deadline_the_queue_cannot_meet_gets_a_fast_429() -> None:
    model = FakeTextModel()
    async with serve(model, max_batch_size=1) as client:
        for i in range(10):  # the engine learns how fast the device drains the queue
            assert (await client.post("/predict", json={"text": f"warm {i}"})).status_code == 200
        model.predict_gate.clear()
        held = [
            asyncio.create_task(client.post("/predict", json={"text": f"t{i}"})) for i in range(4)
        ]
        await wait_until_admitted(client, 14)
        hurried = await client.post(
            "/predict", json={"text": "in a hurry"}, headers={"X-Request-Timeout-Ms": "0.001"}
        )
        model.predict_gate.set()
        await asyncio.gather(*held)
    assert hurried.status_code == 429
    assert hurried.json()["type"] == "deadline_unreachable"
    assert int(hurried.headers["retry-after"]) >= 1
    assert "in a hurry" not in model.seen
