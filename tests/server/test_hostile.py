"""Hostile input: each is refused with a clear 4xx for a small fixed cost, never reaches
the model, and the next request is served."""

from __future__ import annotations

import pytest

from tests.server.fakes import FakeTextModel
from tests.server.test_app import serve

pytestmark = pytest.mark.asyncio

JSON = {"content-type": "application/json"}
TEXT = {"content-type": "text/plain"}
BIG_NUMBER = b'{"text": "a", "all_scores": ' + b"9" * 5000 + b"}"
DEEP = b'{"text": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"  # 400 kB, under the body limit

HOSTILE = [
    ("deeply nested JSON", DEEP, JSON, 400, "invalid_json"),
    ("invalid UTF-8", b'{"text": "\xff\xfe"}', JSON, 400, "invalid_json"),
    ("lone surrogate", b'{"text": "\\ud800"}', JSON, 400, "invalid_json"),
    ("huge number", BIG_NUMBER, JSON, 400, "invalid_json"),
    ("text/plain", b'{"text": "hi"}', TEXT, 415, "unsupported_media_type"),
    ("form", b"text=hi", {"content-type": "application/x-www-form-urlencoded"}, 415, None),
    ("no content type", b'{"text": "hi"}', {}, 415, "unsupported_media_type"),
    ("JSON array", b'["hi"]', JSON, 422, "invalid_input"),
    ("many keys", b'{"text": "a", ' + b",".join(b'"k%d": 1' % i for i in range(20000)) + b"}",
     JSON, 422, "invalid_input"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "headers", "status", "kind"),
    [case[1:] for case in HOSTILE],
    ids=[case[0] for case in HOSTILE],
)
async def test_hostile_body_is_refused_and_never_reaches_the_model(
    body: bytes, headers: dict[str, str], status: int, kind: str | None
) -> None:
    model = FakeTextModel()
    async with serve(model) as client:
        r = await client.post("/predict", content=body, headers=headers)
        ok = await client.post("/predict", json={"text": "next one"})
    assert r.status_code == status, r.text
    reply = r.json()
    if kind is not None:
        assert reply["type"] == kind
    assert reply["request_id"] == r.headers["x-request-id"]
    assert len(r.content) < 20_000, "the reply does not echo the input back"
    assert "Traceback" not in r.text
    assert ok.status_code == 200
    assert model.seen == ["next one"]


async def test_token_limit_truncates_by_default_and_flags_it() -> None:
    model = FakeTextModel()  # 64-token limit
    async with serve(model) as client:
        r = await client.post("/predict", json={"text": "x" * 100})
    assert r.status_code == 200
    assert r.json()["truncated"] is True


async def test_token_limit_is_422_with_no_truncate_and_never_reaches_the_model() -> None:
    model = FakeTextModel()
    async with serve(model, truncate=False) as client:
        single = await client.post("/predict", json={"text": "x" * 100})
        batch = await client.post("/predict/batch", json={"texts": ["fine", "y" * 100]})
        fits = await client.post("/predict", json={"text": "x" * 64})
    assert single.status_code == 422
    [error] = single.json()["detail"]
    assert error["type"] == "too_many_tokens"
    assert "64 tokens" in error["msg"]
    assert "--no-truncate" in error["msg"]
    assert batch.status_code == 422
    assert batch.json()["detail"][0]["loc"] == ["body", "texts", 1]
    assert fits.status_code == 200
    assert model.seen == ["x" * 64]
