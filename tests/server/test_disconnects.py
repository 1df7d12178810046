"""Clients that hang up while their items wait: the items are never computed, the count
shows in /metrics, and the clients that stayed are answered. Real uvicorn, real sockets."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.server.fakes import FakeTextModel
from tests.server.live import live_server, metric

pytestmark = pytest.mark.asyncio


async def raw_post(
    port: int, text: str | list[str], path: str = "/predict", field: str = "text"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({field: text}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body)
    await writer.drain()
    return reader, writer


def sample(metrics: str, name: str) -> float:
    return metric(metrics, name) if name in metrics else 0.0


async def wait_for_metric(client: httpx.AsyncClient, name: str, value: float) -> None:
    async with asyncio.timeout(30):
        while sample((await client.get("/metrics")).text, name) < value:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # the server's state, polled


async def test_clients_that_hang_up_mid_wait_are_never_computed() -> None:
    model = FakeTextModel()
    async with live_server(model, max_batch_size=4) as url, httpx.AsyncClient(base_url=url) as c:
        port = int(url.rsplit(":", 1)[1])
        model.predict_gate.clear()
        blocker = asyncio.create_task(c.post("/predict", json={"text": "blocker"}, timeout=30))
        await asyncio.to_thread(model.entered.wait, 30)
        gone = [await raw_post(port, f"gone-{i}") for i in range(10)]
        stays = asyncio.create_task(c.post("/predict", json={"text": "stays"}, timeout=30))
        await wait_for_metric(c, "microbatch_admitted_items_total", 12)
        for _, writer in gone:
            writer.close()
        await wait_for_metric(c, "microbatch_client_disconnects_total", 10)
        model.predict_gate.set()
        answered = [await blocker, await stays]
        metrics = (await c.get("/metrics")).text
    assert [r.status_code for r in answered] == [200, 200]
    assert sorted(model.seen) == ["blocker", "stays"], "no hung-up client's text was computed"
    assert sample(metrics, "microbatch_client_disconnects_total") == 10
    assert metric(metrics, 'microbatch_items_total{outcome="cancelled"}') == 10
