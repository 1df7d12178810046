"""Who gets in: API keys, the admin key, rate limits, CORS; and what gets out: no
tracebacks, secrets or paths in replies, JSON logs with the request id."""

from __future__ import annotations

import io
import json
import logging

import pytest

from server.access import TokenBuckets
from server.logs import configure
from tests.server.fakes import EncodingFails, FakeTextModel
from tests.server.test_app import serve

pytestmark = pytest.mark.asyncio

KEYS = "key-one,key-two"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_api_keys_guard_the_inference_routes_only() -> None:
    model = FakeTextModel()
    async with serve(model, api_keys=KEYS) as client:
        missing = await client.post("/predict", json={"text": "no key"})
        wrong = await client.post("/predict", json={"text": "bad key"}, headers=bearer("nope"))
        batch = await client.post("/predict/batch", json={"texts": ["x"]})
        rerank = await client.post("/rerank", json={"query": "q", "texts": ["x"]})
        one = await client.post("/predict", json={"text": "k1"}, headers=bearer("key-one"))
        two = await client.post("/predict", json={"text": "k2"}, headers=bearer("key-two"))
        health = await client.get("/health")
        metrics = await client.get("/metrics")
    for r in (missing, wrong, batch, rerank):
        assert r.status_code == 401
        assert r.json()["type"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "key-one" not in r.text
    assert "missing API key" in missing.json()["detail"]
    assert "invalid API key" in wrong.json()["detail"]
    assert (one.status_code, two.status_code) == (200, 200)
    assert model.seen == ["k1", "k2"]
    assert health.status_code == 200
    assert metrics.status_code == 200


async def test_admin_needs_the_admin_key_and_api_keys_do_not_open_it() -> None:
    async with serve(FakeTextModel(), api_keys=KEYS, admin_key="admin-secret") as client:
        none = await client.get("/admin/batching")
        user = await client.get("/admin/batching", headers=bearer("key-one"))
        admin = await client.patch(
            "/admin/batching", json={"max_wait_ms": 7}, headers=bearer("admin-secret")
        )
    assert none.status_code == 403
    assert user.status_code == 403
    assert admin.status_code == 200
    assert admin.json()["max_wait_ms"] == 7


@pytest.mark.parametrize(("host", "status"), [("127.0.0.1", 200), ("0.0.0.0", 403)])
async def test_without_an_admin_key_admin_is_open_only_on_loopback(host: str, status: int) -> None:
    async with serve(FakeTextModel(), host=host) as client:
        r = await client.patch("/admin/batching", json={"max_wait_ms": 9})
    assert r.status_code == status
    if status == 403:
        assert "MICROBATCH_ADMIN_KEY" in r.json()["detail"]


async def test_rate_limit_answers_429_with_retry_after_per_key() -> None:
    model = FakeTextModel()
    settings = {"api_keys": KEYS, "rate_limit_rps": 0.001, "rate_limit_burst": 3}
    async with serve(model, **settings) as client:
        first = [
            await client.post("/predict", json={"text": f"a{i}"}, headers=bearer("key-one"))
            for i in range(4)
        ]
        other = await client.post("/predict", json={"text": "b"}, headers=bearer("key-two"))
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in first] == [200, 200, 200, 429]
    limited = first[-1]
    assert limited.json()["type"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert other.status_code == 200, "each key has its own bucket"
    assert "a3" not in model.seen
    assert 'microbatch_requests_refused_total{reason="rate_limited"} 1.0' in metrics


@pytest.mark.filterwarnings("ignore::pytest.PytestWarning")  # sync test under the module mark
def test_token_bucket_refills_at_its_rate_and_caps_at_its_burst() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=2, clock=lambda: now[0], max_clients=2)
    assert [buckets.take("a") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token in 0.5 s at 2/s
    now[0] = 0.5
    assert buckets.take("a") == 0.0
    now[0] = 100.0  # a long pause saves up no more than the burst
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
    buckets.take("b")
    buckets.take("c")  # over max_clients: the least recently seen ("a") is forgotten
    assert len(buckets._buckets) == 2
    assert "a" not in buckets._buckets


async def test_cors_is_off_by_default_and_on_for_configured_origins() -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with serve(FakeTextModel()) as client:
        off = await client.post(
            "/predict", json={"text": "x"}, headers={"Origin": "https://app.example"}
        )
    async with serve(FakeTextModel(), cors_origins="https://app.example") as client:
        allowed = await client.options("/predict", headers=preflight)
        other = await client.options(
            "/predict", headers={**preflight, "Origin": "https://evil.example"}
        )
    assert "access-control-allow-origin" not in off.headers
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers


async def test_an_unexpected_error_leaks_no_traceback_path_or_secret() -> None:
    broken = EncodingFails(error="/secret/path/model.bin: key-one")
    async with serve(broken, api_keys=KEYS) as client:
        r = await client.post("/predict", json={"text": "x"}, headers=bearer("key-one"))
    assert r.status_code == 500
    assert r.json()["type"] == "internal_error"
    assert r.json()["request_id"] in r.json()["detail"]
    for leak in ("Traceback", "/secret", "key-one", "RuntimeError", ".py"):
        assert leak not in r.text


async def test_json_logs_carry_the_request_id() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure("info", "json")
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]

        async with serve(EncodingFails(error="boom")) as client:
            await client.post("/predict", json={"text": "x"}, headers={"X-Request-ID": "req-42"})
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    ours = [r for r in records if r["logger"].startswith("microbatch")]
    [error] = [r for r in ours if r["request_id"] == "req-42"]
    assert error["level"] == "error"
    assert "unhandled error in request req-42" in error["message"]
    assert "RuntimeError: boom" in error["exception"]
    assert {"time", "logger"} <= set(error)
