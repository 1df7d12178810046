"""Versions of a model in one app (fake models, in process): the split between them as
requests see it (the answering version in the reply, X-Model-Version and the metric), a
user kept on one version, pinning, the routes' admin API, and shadow traffic that never
changes, fails or crowds out the client's answer."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from asgi_lifespan import LifespanManager

from server.app import create_app
from server.settings import Settings
from tests.server.fakes import FakeTextModel
from tests.server.live import Scrape, metric
from tests.server.test_app import wait_until_ready

pytestmark = pytest.mark.asyncio

V1 = [1.0, 0.0]
V2 = [0.0, 1.0]


def embedders(**more: FakeTextModel) -> dict[str, FakeTextModel]:
    """Two versions of `emb` whose answers say which computed them."""
    return {
        "emb@v1": FakeTextModel(name="emb", embedding=V1),
        "emb@v2": FakeTextModel(name="emb", embedding=V2),
        **more,
    }


@asynccontextmanager
async def serve(
    models: FakeTextModel | dict[str, FakeTextModel], **settings: object
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(**settings), model=models)  # type: ignore[arg-type]
    async with (
        LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://test"
        ) as client,
    ):
        await wait_until_ready(client)
        yield client


def route(**entries: object) -> str:
    return json.dumps(entries)


async def test_the_first_version_takes_a_models_traffic_until_a_route_says_otherwise() -> None:
    async with serve(embedders()) as client:
        reply = await client.post("/predict", json={"text": "a", "model": "emb"})
        assert reply.json()["embedding"] == V1
        assert reply.json()["version"] == "v1"
        assert reply.headers["x-model-version"] == "v1"
        pinned = await client.post("/predict", json={"text": "a", "model": "emb@v2"})
        assert pinned.json()["embedding"] == V2
        assert pinned.headers["x-model-version"] == "v2"
        unknown = await client.post("/predict", json={"text": "a", "model": "emb@v9"})
        assert unknown.status_code == 404
        assert unknown.json()["type"] == "model_not_found"
        assert "emb@v1, emb@v2" in unknown.json()["detail"]
        listed = (await client.get("/v1/models")).json()["data"]
        assert [(m["id"], m["version"]) for m in listed] == [("emb@v1", "v1"), ("emb@v2", "v2")]
        versions = {m["name"]: m for m in (await client.get("/admin/models")).json()}
        assert versions["emb@v1"]["traffic"] == 1.0
        assert versions["emb@v2"]["traffic"] == 0.0
        # Naming no model is the default model: its route too.
        assert (await client.post("/predict", json={"text": "a"})).json()["embedding"] == V1


async def test_a_canary_split_holds_over_many_users_and_each_stays_on_one_version() -> None:
    users = [f"user-{i}" for i in range(2000)]
    async with serve(embedders(), route=route(emb={"v1": 90, "v2": 10})) as client:

        async def version_for(user: str) -> str:
            reply = await client.post(
                "/predict", json={"text": "x", "model": "emb"}, headers={"X-Route-Key": user}
            )
            body = reply.json()
            assert body["embedding"] == (V1 if body["version"] == "v1" else V2)
            return str(reply.headers["x-model-version"])

        first = await asyncio.gather(*(version_for(u) for u in users))
        again = await asyncio.gather(*(version_for(u) for u in users[:200]))
        metrics = (await client.get("/metrics")).text
    shares = Counter(first)
    assert abs(shares["v2"] / len(users) - 0.10) <= 0.02
    assert again == first[:200], "a user's key keeps them on their version"
    routed = metric(metrics, 'microbatch_routed_requests_total{version="v2"}')
    assert routed == shares["v2"] + again.count("v2"), "the split served is in the metrics"


async def test_the_api_key_keeps_a_user_on_one_version_without_a_route_key() -> None:
    async with serve(embedders(), route=route(emb={"v1": 50, "v2": 50}),
                     api_keys="key-a,key-b,key-c,key-d") as client:  # fmt: skip
        seen = {}
        for key in ("key-a", "key-b", "key-c", "key-d"):
            replies = [
                await client.post("/predict", json={"text": "x", "model": "emb"},
                                  headers={"Authorization": f"Bearer {key}"})
                for _ in range(10)
            ]  # fmt: skip
            seen[key] = {r.headers["x-model-version"] for r in replies}
    assert all(len(versions) == 1 for versions in seen.values()), seen


async def test_routes_are_changed_live_and_a_bad_route_changes_nothing() -> None:
    async with serve(embedders()) as client:
        moved = await client.patch("/admin/routes", json={"emb": {"v2": 1}})
        assert moved.status_code == 200
        assert moved.json()["emb"]["served"] == {"v2": 1.0}
        assert (await client.post("/predict", json={"text": "a"})).json()["embedding"] == V2
        for bad, status in [
            ({"emb": {"v3": 1}}, 422),
            ({"emb": {"v1": -5}}, 422),
            ({"nope": {"v1": 1}}, 404),
            ({"emb": {"v1": 1, "shadow": {"v2": 2}}}, 422),
        ]:
            refused = await client.patch("/admin/routes", json=bad)
            assert refused.status_code == status, (bad, refused.text)
        assert (await client.get("/admin/routes")).json()["emb"]["weights"] == {"v2": 1}
        # Rollback is one PATCH.
        await client.patch("/admin/routes", json={"emb": {"v1": 1}})
        assert (await client.post("/predict", json={"text": "a"})).json()["embedding"] == V1


async def test_a_shadow_sees_the_traffic_but_the_client_gets_the_primarys_answer() -> None:
    shadowing = route(emb={"v1": 1, "shadow": {"v2": 1.0}})
    models = embedders()
    async with serve(models, route=shadowing) as client:
        replies = [
            await client.post("/predict/batch", json={"texts": [f"a{i}", f"b{i}"], "model": "emb"})
            for i in range(5)
        ]
        assert all(r.json()["results"][0]["embedding"] == V1 for r in replies)
        assert all(r.headers["x-model-version"] == "v1" for r in replies)
        await until_metric(client, 'microbatch_shadow_requests_total{outcome="compared"}', 5)
        metrics = (await client.get("/metrics")).text
    # V1 and V2 are orthogonal: each of the 10 items compared at cosine 0.
    assert metric(metrics, 'microbatch_shadow_cosine_count{primary="v1",shadow="v2"}') == 10
    assert metric(metrics, 'microbatch_shadow_cosine_sum{primary="v1",shadow="v2"}') == 0
    # The shadow's items went through its bulk lane only.
    waits = 'microbatch_queue_wait_seconds_count{model="emb@v2",lane="%s"}'
    assert metric(metrics, waits % "bulk") >= 1
    assert metric(metrics, waits % "interactive") == 0


async def test_a_failing_shadow_fails_no_request_and_a_busy_one_is_shed() -> None:
    # v2 reads its inputs (embeddings from the text), so that the poison reaches it.
    models = embedders(**{"emb@v2": FakeTextModel(name="emb", poison="boom")})
    shadowing = route(emb={"v1": 1, "shadow": {"v2": 1.0}})
    async with serve(models, route=shadowing, max_queue_size=8) as client:
        poisoned = await client.post("/predict", json={"text": "boom", "model": "emb"})
        assert poisoned.status_code == 200
        assert poisoned.json()["embedding"] == V1
        # Three inputs are more than a quarter of the shadow's queue: shed, not queued.
        many = await client.post("/predict/batch", json={"texts": ["a", "b", "c"], "model": "emb"})
        assert many.status_code == 200
        await until_metric(client, 'microbatch_shadow_requests_total{outcome="failed"}', 1)
        metrics = (await client.get("/metrics")).text
    assert metric(metrics, 'microbatch_shadow_requests_total{outcome="shed"}') == 1
    assert models["emb@v2"].seen.count("boom") == 1
    assert "c" not in models["emb@v2"].seen


async def test_a_classifier_shadow_records_label_agreement_and_the_dashboard_means() -> None:
    models = {
        "cls@a": FakeTextModel(name="cls", task="classify"),
        "cls@b": FakeTextModel(name="cls", task="classify"),
    }
    async with serve(models, route=route(cls={"a": 1, "shadow": {"b": 1.0}})) as client:
        for text in ("short", "a rather longer text than twenty"):
            await client.post("/predict", json={"text": text, "model": "cls"})
        await until_metric(client, 'microbatch_shadow_requests_total{outcome="compared"}', 2)
        metrics = (await client.get("/metrics")).text
        data = (await client.get("/dashboard/data")).json()
    assert metric(metrics, 'microbatch_shadow_label_agreement_total{agree="yes"}') == 2
    assert metric(metrics, "microbatch_shadow_score_difference_sum") == 0
    [pair] = data["shadows"]
    assert (pair["primary"], pair["shadow"], pair["items"]) == ("a", "b", 2)
    assert pair["label_agreement"] == 1.0


async def until_metric(client: httpx.AsyncClient, name: str, value: float) -> None:
    """Wait for the server's state (shadows run in the background)."""
    base, _, rest = name.partition("{")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    async with asyncio.timeout(30):
        while True:
            found = Scrape.parse((await client.get("/metrics")).text).value(base, **labels)
            if not math.isnan(found) and found >= value:
                return
            await asyncio.sleep(0.005)
