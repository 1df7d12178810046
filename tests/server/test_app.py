"""The app in process: httpx over ASGI with the lifespan run, on a fake model."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
from asgi_lifespan import LifespanManager

from server.app import create_app
from server.settings import Settings
from tests.server.fakes import FakeTextModel, fake_embedding
from tests.server.live import metric

pytestmark = pytest.mark.asyncio

JSON = {"content-type": "application/json"}


@asynccontextmanager
async def serve(
    model: FakeTextModel, *, wait_ready: bool = True, **settings: object
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(**settings), model=model)  # type: ignore[arg-type]
    async with (
        LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://test"
        ) as client,
    ):
        if wait_ready:
            await wait_until_ready(client)
        yield client


async def wait_until_ready(client: httpx.AsyncClient) -> None:
    await poll(client, "/ready", lambda r: r.status_code == 200)


async def wait_until_admitted(client: httpx.AsyncClient, n: int) -> None:
    await poll(client, "/metrics", lambda r: metric(r.text, "microbatch_admitted_items_total") == n)


async def poll(
    client: httpx.AsyncClient, path: str, done: Callable[[httpx.Response], bool]
) -> None:
    """Wait for an observable state of the server (polling its status, not sleeping)."""
    async with asyncio.timeout(30):
        while not done(await client.get(path)):  # noqa: ASYNC110 (state of another party)
            await asyncio.sleep(0.005)


async def test_predict_returns_this_texts_embedding_with_metadata() -> None:
    async with serve(FakeTextModel()) as client:
        r = await client.post("/predict", json={"text": "hello"}, headers={"X-Request-ID": "r-1"})
    assert r.status_code == 200
    body = r.json()
    assert body["embedding"] == fake_embedding("hello")
    assert body["model"] == "fake"
    assert body["request_id"] == "r-1"
    assert r.headers["x-request-id"] == "r-1"
    assert body["processing_time_ms"] > 0
    assert body["truncated"] is False
    assert {"x-queue-time-ms", "x-inference-time-ms", "x-batch-size"} <= set(r.headers)


async def test_concurrent_requests_each_get_their_own_result() -> None:
    model = FakeTextModel()
    async with serve(model, max_batch_size=8) as client:
        model.predict_gate.clear()  # hold the device so the rest queue up
        texts = [f"text number {i}" + "x" * i for i in range(40)]
        tasks = [asyncio.create_task(client.post("/predict", json={"text": t})) for t in texts]
        await wait_until_admitted(client, 40)
        model.predict_gate.set()
        replies = await asyncio.gather(*tasks)
    assert [r.json()["embedding"] for r in replies] == [fake_embedding(t) for t in texts]
    assert max(model.batches) <= 8


@pytest.mark.parametrize("coalesce", [True, False])
async def test_identical_texts_in_flight_are_computed_once(coalesce: bool) -> None:
    model = FakeTextModel()
    async with serve(model, max_batch_size=8, coalesce=coalesce) as client:
        model.predict_gate.clear()  # hold the device so the rest queue up
        busy = asyncio.create_task(client.post("/predict", json={"text": "busy"}))
        await wait_until_admitted(client, 1)
        texts = ["same", "other", "same", "same"]
        tasks = [asyncio.create_task(client.post("/predict", json={"text": t})) for t in texts]
        await poll(client, "/metrics", lambda r: queued_and_joined(r.text) == 4)
        model.predict_gate.set()
        replies = await asyncio.gather(busy, *tasks)
        metrics = (await client.get("/metrics")).text
    assert [r.json()["embedding"] for r in replies[1:]] == [fake_embedding(t) for t in texts]
    assert model.seen.count("same") == (1 if coalesce else 3)
    assert metric(metrics, "microbatch_coalesced_items_total") == (2.0 if coalesce else 0.0)


def queued_and_joined(metrics: str) -> float:
    """Items admitted after the first, plus inputs that joined an identical one."""
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith(("microbatch_admitted_items_total", "microbatch_coalesced_items_total"))
    }
    return sum(values.values()) - 1


async def test_batch_endpoint_keeps_order() -> None:
    async with serve(FakeTextModel()) as client:
        texts = ["a", "bb", "ccc", "dddd"]
        r = await client.post("/predict/batch", json={"texts": texts})
    assert r.status_code == 200
    assert [x["embedding"] for x in r.json()["results"]] == [fake_embedding(t) for t in texts]


async def test_classify_returns_label_score_and_all_scores_on_request() -> None:
    async with serve(FakeTextModel(task="classify")) as client:
        plain = (await client.post("/predict", json={"text": "a" * 18})).json()
        full = (await client.post("/predict", json={"text": "a" * 2, "all_scores": True})).json()
    assert plain["label"] == "long"
    assert plain["score"] == pytest.approx(0.9)
    assert plain["scores"] is None
    assert full["label"] == "short"
    assert full["scores"] == pytest.approx({"short": 0.9, "long": 0.1})


async def test_ready_is_503_until_warm_then_200_while_health_is_200_throughout() -> None:
    model = FakeTextModel()
    model.warm_gate.clear()
    async with serve(model, wait_ready=False) as client:
        assert (await client.get("/health")).status_code == 200
        assert await asyncio.to_thread(model.warm_entered.wait, 30)
        r = await client.get("/ready")
        assert r.status_code == 503
        assert r.json()["status"] == "warming"
        assert r.json()["detail"].startswith("warm-up step 1 of 1: batch 32, ")
        predict = await client.post("/predict", json={"text": "too early"})
        assert predict.status_code == 503
        assert "Retry-After" in predict.headers
        model.warm_gate.set()
        await wait_until_ready(client)
        assert (await client.get("/ready")).json() == {"status": "ready", "detail": None}


BAD_INPUTS = [
    ({"json": {}}, "missing"),
    ({"json": {"text": ""}}, "string_too_short"),
    ({"json": {"text": 42}}, "string_type"),
    ({"json": {"text": ["a"]}}, "string_type"),
    ({"json": {"text": "x" * 101}}, "string_too_long"),
    ({"json": {"text": "ok", "extra": 1}}, "extra_forbidden"),
    ({"json": ["ok"]}, "model_type"),
]


@pytest.mark.parametrize(("request_kwargs", "error_type"), BAD_INPUTS)
async def test_bad_input_gets_a_clear_422_and_the_server_keeps_serving(
    request_kwargs: dict[str, object], error_type: str
) -> None:
    async with serve(FakeTextModel(), max_text_chars=100) as client:
        r = await client.post("/predict", **request_kwargs)  # type: ignore[arg-type]
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["type"] == "invalid_input"
        assert body["request_id"] == r.headers["x-request-id"]
        assert [e["type"] for e in body["detail"]] == [error_type]
        assert "Traceback" not in r.text
        ok = await client.post("/predict", json={"text": "still fine"})
        assert ok.status_code == 200


@pytest.mark.parametrize(
    ("path", "method", "body", "reason"),
    [
        ("/predict", "POST", b'{"text": "unterminated', "EOF while parsing a string"),
        ("/predict/batch", "POST", b'{"texts": ["a",]}', "trailing comma"),
        ("/predict", "POST", b"\xff\xfe not utf-8", ""),
        ("/admin/batching", "PATCH", b"{nope", ""),
    ],
)
async def test_a_body_that_is_not_json_gets_400_on_every_route(
    path: str, method: str, body: bytes, reason: str
) -> None:
    async with serve(FakeTextModel()) as client:
        headers = {"content-type": "application/json"}
        r = await client.request(method, path, content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["type"] == "invalid_json"
        assert r.json()["detail"].startswith("body is not valid JSON: ")
        assert reason in r.json()["detail"]
        assert (await client.post("/predict", json={"text": "still fine"})).status_code == 200


async def test_over_long_text_says_the_limit_and_the_flag() -> None:
    async with serve(FakeTextModel(), max_text_chars=100) as client:
        r = await client.post("/predict/batch", json={"texts": ["fine", "x" * 150]})
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "texts", 1]
    assert error["msg"] == "text has 150 characters; the limit is 100 (--max-text-chars)"


async def test_too_many_texts_in_one_batch_request() -> None:
    async with serve(FakeTextModel(), max_client_batch=3) as client:
        r = await client.post("/predict/batch", json={"texts": ["a"] * 4})
        empty = await client.post("/predict/batch", json={"texts": []})
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"] == "4 texts; the limit is 3 (--max-client-batch)"
    assert empty.status_code == 422


async def test_oversized_body_is_413_declared_or_streamed() -> None:
    big = b'{"text": "' + b"x" * 4000 + b'"}'

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked upload
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    async with serve(FakeTextModel(), max_body_bytes=2048) as client:
        declared = await client.post("/predict", content=big, headers=JSON)
        streamed = await client.post("/predict", content=chunks(), headers=JSON)
        ok = await client.post("/predict", json={"text": "small"})
    for r in (declared, streamed):
        assert r.status_code == 413
        assert r.json()["detail"] == "request body is over 2048 bytes (--max-body-bytes)"
        assert r.json()["request_id"] == r.headers["x-request-id"]
    assert ok.status_code == 200


async def test_a_failing_input_gets_500_with_its_request_id_and_neighbours_succeed() -> None:
    model = FakeTextModel()
    async with serve(model, max_batch_size=8, policy="window", max_wait_ms=100) as client:
        texts = ["one", "two", "boom", "three", "four"]
        replies = await asyncio.gather(*(client.post("/predict", json={"text": t}) for t in texts))
    for text, r in zip(texts, replies, strict=True):
        if text == "boom":
            assert r.status_code == 500
            assert r.json()["type"] == "inference_failed"
            assert r.json()["request_id"] in r.json()["detail"]
            assert "poisoned" not in r.text, "no internals in the reply"
        else:
            assert r.status_code == 200
            assert r.json()["embedding"] == fake_embedding(text)


async def test_full_queue_is_429_with_retry_after() -> None:
    model = FakeTextModel()
    async with serve(model, max_batch_size=1, max_queue_size=2) as client:
        model.predict_gate.clear()
        held = []
        for i in range(3):  # 1 running, 2 queued (a CPU stages nothing): the queue is full
            held.append(asyncio.create_task(client.post("/predict", json={"text": f"t{i}"})))
            await wait_until_admitted(client, i + 1)
        await poll(client, "/metrics", lambda r: metric(r.text, "microbatch_queue_depth") == 2)
        r = await client.post("/predict", json={"text": "no room"})
        model.predict_gate.set()
        await asyncio.gather(*held)
        metrics = (await client.get("/metrics")).text
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert "no room" not in model.seen, "a refused request never reaches the model"
    assert metric(metrics, 'microbatch_items_total{outcome="rejected_full"}') == 1
    assert r.json()["type"] == "queue_full"
    assert all(t.result().status_code == 200 for t in held)


async def test_deadline_passing_in_the_queue_is_504() -> None:
    model = FakeTextModel()
    async with serve(model, request_timeout_s=0.2) as client:
        model.predict_gate.clear()
        r = await client.post("/predict", json={"text": "slow"})
        model.predict_gate.set()
    assert r.status_code == 504
    assert r.json()["type"] == "deadline_exceeded"


async def test_an_slo_target_is_set_and_lifted_through_admin_batching() -> None:
    async with serve(FakeTextModel()) as client:
        on = await client.patch("/admin/batching", json={"slo_p99_ms": 40})
        metrics = (await client.get("/metrics")).text
        off = await client.patch("/admin/batching", json={"slo_p99_ms": None})
        bad = await client.patch("/admin/batching", json={"slo_p99_ms": 0})
    assert on.status_code == 200
    body = on.json()
    assert body["slo_p99_ms"] == 40
    assert body["configured"] == {"max_batch_size": 32, "max_wait_ms": 50.0}
    assert body["slo"]["step"] == 0
    assert body["slo"]["steps"] > 2
    assert body["slo"]["last_window"] is None
    assert metric(metrics, "microbatch_slo_target_seconds") == 0.04
    assert off.json()["slo"] is None
    assert off.json()["slo_p99_ms"] is None
    assert bad.status_code == 422
    assert "slo_p99_ms" in bad.text


async def test_admin_batching_reads_and_changes_the_live_settings() -> None:
    async with serve(FakeTextModel()) as client:
        before = (await client.get("/admin/batching")).json()
        r = await client.patch("/admin/batching", json={"max_wait_ms": 5, "policy": "window"})
        after = (await client.get("/admin/batching")).json()
        model_info = (await client.get("/model")).json()
        bad = await client.patch("/admin/batching", json={"max_batch_size": 0})
        unknown = await client.patch("/admin/batching", json={"max_wait": 5})
        lift = await client.patch("/admin/batching", json={"max_batch_tokens": None})
        unbounded = await client.patch(
            "/admin/batching", json={"max_overtakes": 4, "min_batch_gain": 0}
        )
        above_one = await client.patch("/admin/batching", json={"min_batch_gain": 1.5})
    assert before == {
        "max_batch_size": 32,
        "max_wait_ms": 50.0,
        "max_batch_tokens": None,
        "max_queue_size": 1024,
        "policy": "adaptive",
        "batch_sizing": "learned",
        "max_overtakes": None,
        "min_batch_gain": 0.05,
        "slo_p99_ms": None,
        "configured": None,
        "slo": None,
    }
    assert r.status_code == 200
    assert after == {**before, "max_wait_ms": 5.0, "policy": "window"}
    assert model_info["batching"] == after
    assert bad.status_code == 422
    assert unknown.status_code == 422
    assert lift.json()["max_batch_tokens"] is None
    assert (unbounded.json()["max_overtakes"], unbounded.json()["min_batch_gain"]) == (4, 0)
    assert above_one.status_code == 422
    assert "min_batch_gain" in above_one.text


async def test_metrics_expose_batches_queue_and_latency() -> None:
    async with serve(FakeTextModel()) as client:
        await asyncio.gather(*(client.post("/predict", json={"text": f"t{i}"}) for i in range(10)))
        text = (await client.get("/metrics")).text
    for name in (
        "microbatch_batch_size_bucket",
        "microbatch_queue_wait_seconds_bucket",
        "microbatch_request_duration_seconds_bucket",
        "microbatch_queue_depth",
        "microbatch_padding_ratio_bucket",
    ):
        assert name in text
    assert metric(text, 'microbatch_items_total{outcome="ok"}') == 10
    assert 'route="/predict",status="200"' in text


async def test_shutdown_answers_admitted_requests() -> None:
    model = FakeTextModel()
    app = create_app(Settings(), model=model)  # type: ignore[arg-type]
    manager = LifespanManager(app, startup_timeout=30, shutdown_timeout=30)
    await manager.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t")
    await wait_until_ready(client)
    model.predict_gate.clear()
    tasks = [asyncio.create_task(client.post("/predict", json={"text": f"t{i}"})) for i in range(5)]
    await wait_until_admitted(client, 5)
    closing = asyncio.create_task(manager.__aexit__(None, None, None))
    await poll(client, "/ready", lambda r: r.json()["status"] == "draining")
    late = await client.post("/predict", json={"text": "late"})
    model.predict_gate.set()
    replies = await asyncio.gather(*tasks)
    await closing
    await client.aclose()
    assert all(r.status_code == 200 for r in replies)
    assert late.status_code == 503


async def test_batch_sizing_can_be_switched_live_and_the_learned_cost_is_reported() -> None:
    async with serve(FakeTextModel()) as client:
        assert (await client.get("/model")).json()["learned_cost"] is None, "nothing run yet"
        r = await client.patch("/admin/batching", json={"batch_sizing": "fill"})
        bad = await client.patch("/admin/batching", json={"batch_sizing": "greedy"})
        for wave in range(12):  # batches of several sizes, so the cost fit has data
            texts = [f"text {wave} {i}" * (i + 1) for i in range(wave % 4 + 1)]
            await asyncio.gather(*(client.post("/predict", json={"text": t}) for t in texts))
        cost = (await client.get("/model")).json()["learned_cost"]
    assert r.json()["batch_sizing"] == "fill"
    assert bad.status_code == 422
    assert cost is not None
    assert set(cost) == {"overhead_ms", "per_token_us"}
    assert cost["overhead_ms"] >= 0
    assert cost["per_token_us"] >= 0


async def test_openapi_documents_the_predict_bodies_headers_and_replies() -> None:
    # The predict routes read their body and header themselves (for speed); clients
    # that generate code from /openapi.json must still see both, and the reply models.
    schema = create_app(Settings(), model=FakeTextModel()).openapi()  # type: ignore[arg-type]
    for path, fields in (("/predict", ("text", "image")), ("/predict/batch", ("texts", "images"))):
        operation = schema["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body["oneOf"] == [{"required": [field]} for field in fields]
        assert body["additionalProperties"] is False
        headers = [(h["name"], h["in"]) for h in operation["parameters"]]
        assert headers == [
            ("x-request-timeout-ms", "header"),
            ("x-route-key", "header"),
            ("x-priority", "header"),
        ]
        assert {"200", "400", "422", "429", "503", "504"} <= set(operation["responses"])
    reply = schema["paths"]["/predict"]["post"]["responses"]["200"]["content"]
    refs = str(reply["application/json"]["schema"])
    assert "EmbeddingResponse" in refs
    assert "LabelResponse" in refs


async def test_raising_max_batch_size_warms_the_new_shapes_before_it_applies() -> None:
    model = FakeTextModel()
    async with serve(model) as client:
        raised = await client.patch("/admin/batching", json={"max_batch_size": 64})
        lowered = await client.patch("/admin/batching", json={"max_batch_size": 16})
        again = await client.patch("/admin/batching", json={"max_batch_size": 48})
        null = await client.patch("/admin/batching", json={"max_batch_size": None})
        bad_then = await client.patch(
            "/admin/batching", json={"max_batch_size": 99, "max_wait_ms": -1}
        )
        live = (await client.get("/admin/batching")).json()
    assert [r.status_code for r in (raised, lowered, again)] == [200, 200, 200]
    assert model.warmed == [32, 64]  # start, then the one size above any warmed before
    assert null.status_code == 422
    assert "max_batch_size must not be null" in null.text
    assert bad_then.status_code == 422
    assert "max_wait_ms" in bad_then.text
    assert model.warmed == [32, 64]  # a refused change warms nothing
    assert live["max_batch_size"] == 48


async def test_requests_without_an_id_get_distinct_ids() -> None:
    async with serve(FakeTextModel()) as client:
        replies = [await client.post("/predict", json={"text": "x"}) for _ in range(20)]
    ids = {r.headers["x-request-id"] for r in replies}
    assert len(ids) == 20
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)
    assert all(r.json()["request_id"] == r.headers["x-request-id"] for r in replies)


async def test_the_lane_comes_from_x_priority_else_from_the_call_size() -> None:
    model = FakeTextModel()
    async with serve(model, bulk_inputs=4) as client:

        async def lanes() -> dict[str, float]:
            text = (await client.get("/metrics")).text
            return {
                lane: metric(text, f'microbatch_queue_wait_seconds_count{{lane="{lane}"}}')
                for lane in ("interactive", "bulk")
            }

        bulk = {"x-priority": "bulk", "cache-control": "no-cache"}
        assert (await client.post("/predict", json={"text": "a"}, headers=bulk)).status_code == 200
        texts = {"texts": ["b", "c", "d", "e"]}
        fresh = {"cache-control": "no-cache"}
        assert (await client.post("/predict/batch", json=texts, headers=fresh)).status_code == 200
        asked = {"x-priority": "Interactive", "cache-control": "no-cache"}
        big = {"texts": ["f", "g", "h", "i", "j"]}
        assert (await client.post("/predict/batch", json=big, headers=asked)).status_code == 200
        assert await lanes() == {"interactive": 5, "bulk": 5}
        wrong = await client.post("/predict", json={"text": "k"}, headers={"x-priority": "high"})
    assert wrong.status_code == 422
    [error] = wrong.json()["detail"]
    assert error["loc"] == ["header", "X-Priority"]
    assert "must be interactive or bulk" in error["msg"]
