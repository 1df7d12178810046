"""`GET /dashboard` in process: the page, its own assets, and the data it polls."""

from __future__ import annotations

import re

import httpx
import pytest
from asgi_lifespan import LifespanManager

from server.app import create_app
from server.settings import Settings
from tests.server.fakes import FakeTextModel
from tests.server.test_app import serve, wait_until_ready

pytestmark = pytest.mark.asyncio


async def test_the_page_loads_only_assets_this_server_serves() -> None:
    async with serve(FakeTextModel()) as client:
        page = await client.get("/dashboard")
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        replies = {url: await client.get(url) for url in assets if not url.startswith("data:")}
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert assets, "the page has scripts and styles"
    assert all(url.startswith(("/dashboard/static/", "data:")) for url in assets), assets
    assert {url: r.status_code for url, r in replies.items()} == dict.fromkeys(replies, 200)
    assert any("uPlot" in url for url in replies), "the chart library comes with the server"


async def test_the_data_has_samples_settings_and_changes() -> None:
    app = create_app(Settings(), model=FakeTextModel())  # type: ignore[arg-type]
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://t"
        ) as client,
    ):
        await wait_until_ready(client)
        await client.post("/predict/batch", json={"texts": ["a", "bb", "ccc"]})
        await client.patch("/admin/batching", json={"max_wait_ms": 9, "slo_p99_ms": 250})
        # Close the interval now, not at the next second.
        app.state.runtime.client.host.timeline.sample()
        data = (await client.get("/dashboard/data")).json()
        cutoff = data["samples"][-1]["t"]
        later = await client.get("/dashboard/data", params={"since": cutoff})
    assert data["status"] == "ready"
    assert data["model"] == "fake"
    assert data["batching"]["slo_p99_ms"] == 250
    assert data["batching"]["configured"] == {"max_batch_size": 32, "max_wait_ms": 9.0}
    counted = sum(s["items_per_s"] > 0 for s in data["samples"])
    assert counted >= 1
    last = data["samples"][-1]
    assert last["max_wait_ms"] == 9
    assert last["slo_p99_ms"] == 250
    assert set(last["batches"]) == {"idle", "full", "tokens", "window", "drain"}
    assert any("slo_p99_ms 250" in e["text"] for e in data["events"])
    assert [s for s in later.json()["samples"] if s["t"] <= cutoff] == []
