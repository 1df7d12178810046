"""The protocols other servers speak (OpenAI's embeddings, TEI's routes, Cohere's rerank)
keep every guarantee of our own: the `openai` SDK raises its own exceptions with our
messages, keys and 429s and deadlines hold, clients that hang up are never computed, and a
client batch larger than the queue is split into waves, not refused. A fake model that
blocks until released orders the events; the vectors are checked against the reference
libraries in tests/server/test_clients.py."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import numpy as np
import openai
import pytest

from tests.server.fakes import FakeTextModel, fake_embedding
from tests.server.live import live_server, metric
from tests.server.test_app import poll, serve, wait_until_admitted
from tests.server.test_disconnects import raw_post, sample, wait_for_metric

pytestmark = pytest.mark.asyncio


@asynccontextmanager
async def sdk(
    model: FakeTextModel, key: str = "unused", **settings: object
) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    """The official SDK on the app in process (its own httpx client over ASGI), and a
    plain client for the other routes. No retries: every answer is seen as sent."""
    async with serve(model, **settings) as client:
        ai = openai.AsyncOpenAI(
            base_url="http://test/v1", api_key=key, http_client=client, max_retries=0
        )
        yield ai, client


async def test_the_sdk_reads_our_embeddings_in_its_default_base64_and_in_floats() -> None:
    texts = ["short", "a longer text"]
    async with sdk(FakeTextModel()) as (ai, client):
        default = await ai.embeddings.create(input=texts, model="text-embedding-3-small")
        floats = await ai.embeddings.create(input="one", model="x", encoding_format="float")
        ids = await ai.embeddings.create(input=[[104, 105], [104]], model="x")
        raw = await client.post("/v1/embeddings", json={"input": texts, "model": "x"})
        b64 = await client.post(
            "/v1/embeddings", json={"input": "one", "encoding_format": "base64"}
        )
    assert [d.embedding for d in default.data] == [fake_embedding(t) for t in texts]
    assert [d.index for d in default.data] == [0, 1]
    assert default.model == "fake", "the served model answers, whatever the client named"
    assert default.usage.prompt_tokens == default.usage.total_tokens == len("shorta longer text")
    assert floats.data[0].embedding == fake_embedding("one")
    assert [d.embedding for d in ids.data] == [fake_embedding("hi"), fake_embedding("h")]
    body = raw.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list"
    assert body["data"][0] == {
        "object": "embedding",
        "index": 0,
        "embedding": fake_embedding("short"),
    }
    vector = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), dtype="<f4")
    assert vector.tolist() == fake_embedding("one")


async def test_the_sdk_raises_bad_request_with_our_message_and_the_parameter() -> None:
    async with sdk(FakeTextModel(), max_client_batch=3) as (ai, client):
        with pytest.raises(openai.BadRequestError) as empty:
            await ai.embeddings.create(input=[], model="x")
        with pytest.raises(openai.BadRequestError) as blank:
            await ai.embeddings.create(input=["fine", ""], model="x")
        with pytest.raises(openai.BadRequestError) as too_many:
            await ai.embeddings.create(input=["a", "b", "c", "d"], model="x")
        with pytest.raises(openai.BadRequestError) as unknown:
            await ai.embeddings.create(input="x", model="x", extra_body={"colour": "red"})
        with pytest.raises(openai.NotFoundError) as missing:
            await ai.models.retrieve("gpt-4")
        models = await ai.models.list()
        found = await ai.models.retrieve("fake")
        not_json = await client.post(
            "/v1/embeddings", content=b"{", headers={"content-type": "application/json"}
        )
    assert "input is empty" in empty.value.message
    assert empty.value.param == "input"
    assert empty.value.code == "invalid_input"
    assert empty.value.type == "invalid_request_error"
    assert "input 1 is an empty text" in blank.value.message
    assert "4 inputs; the limit is 3 (--max-client-batch)" in too_many.value.message
    assert unknown.value.param == "colour"
    assert "does not exist" in missing.value.message
    assert [m.id for m in models.data] == ["fake"]
    assert (found.id, found.object, found.owned_by) == ("fake", "model", "microbatch")
    assert not_json.status_code == 400
    assert not_json.json()["error"]["code"] == "invalid_json"


async def test_keys_guard_every_client_route_and_the_sdk_sends_them_as_bearer() -> None:
    async with sdk(FakeTextModel(), key="nope", api_keys="key-one") as (wrong, client):
        with pytest.raises(openai.AuthenticationError) as refused:
            await wrong.models.list()
        right = openai.AsyncOpenAI(
            base_url="http://test/v1", api_key="key-one", http_client=client, max_retries=0
        )
        listed = await right.models.list()
        embedded = await right.embeddings.create(input="with key", model="x")
        tei = await client.post("/embed", json={"inputs": "no key"})
        tokenize = await client.post("/tokenize", json={"inputs": "no key"})
        cohere = await client.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
        info = await client.get("/info")
    assert refused.value.status_code == 401
    assert "invalid API key" in refused.value.message
    assert [m.id for m in listed.data] == ["fake"]
    assert embedded.data[0].embedding == fake_embedding("with key")
    assert [tei.status_code, tokenize.status_code, cohere.status_code] == [401, 401, 401]
    assert tei.json()["error_type"] == "Validation"
    assert "missing API key" in tei.json()["error"]
    assert cohere.json()["error"]["type"] == "authentication_error"
    assert info.status_code == 200, "TEI's /info is open, like /model"


async def test_a_full_queue_is_the_sdks_rate_limit_error_and_teis_overloaded() -> None:
    model = FakeTextModel()
    async with sdk(model, max_batch_size=1, max_queue_size=1) as (ai, client):
        model.predict_gate.clear()
        blocker = asyncio.create_task(client.post("/predict", json={"text": "blocker"}))
        await asyncio.to_thread(model.entered.wait, 30)
        # On a CPU nothing waits ready behind the running batch: the next fills the queue.
        staged = []
        for i, depth in enumerate((1.0,)):
            staged.append(asyncio.create_task(client.post("/predict", json={"text": f"s{i}"})))
            await wait_until_admitted(client, 2 + i)
            await poll(
                client, "/metrics", lambda r, d=depth: metric(r.text, "microbatch_queue_depth") == d
            )
        with pytest.raises(openai.RateLimitError) as full:
            await ai.embeddings.create(input="no room", model="x")
        tei = await client.post("/embed", json={"inputs": "no room"})
        model.predict_gate.set()
        await asyncio.gather(blocker, *staged)
    assert full.value.code == "queue_full"
    assert full.value.response.headers["retry-after"] == "1"
    assert tei.status_code == 429
    assert tei.json()["error_type"] == "Overloaded"
    assert "no room" not in model.seen


async def test_a_deadline_passed_on_v1_is_504_in_openais_shape_and_never_computed() -> None:
    model = FakeTextModel()
    async with sdk(model, max_batch_size=1) as (ai, client):
        model.predict_gate.clear()
        blocker = asyncio.create_task(client.post("/predict", json={"text": "blocker"}))
        await asyncio.to_thread(model.entered.wait, 30)
        with pytest.raises(openai.InternalServerError) as late:
            await ai.embeddings.create(
                input="in a hurry", model="x", extra_headers={"X-Request-Timeout-Ms": "50"}
            )
        model.predict_gate.set()
        await blocker
    assert late.value.status_code == 504
    assert late.value.code == "deadline_exceeded"
    assert "in a hurry" not in model.seen


async def test_clients_that_hang_up_on_the_new_routes_are_never_computed() -> None:
    model = FakeTextModel()
    async with live_server(model, max_batch_size=4) as url, httpx.AsyncClient(base_url=url) as c:
        port = int(url.rsplit(":", 1)[1])
        model.predict_gate.clear()
        blocker = asyncio.create_task(c.post("/predict", json={"text": "blocker"}, timeout=30))
        await asyncio.to_thread(model.entered.wait, 30)
        gone = [
            await raw_post(port, "gone-openai", "/v1/embeddings", "input"),
            await raw_post(port, "gone-tei", "/embed", "inputs"),
        ]
        await wait_for_metric(c, "microbatch_admitted_items_total", 3)
        for _, writer in gone:
            writer.close()
        await wait_for_metric(c, "microbatch_client_disconnects_total", 2)
        model.predict_gate.set()
        answered = await blocker
        metrics = (await c.get("/metrics")).text
    assert answered.status_code == 200
    assert model.seen == ["blocker"]
    assert sample(metrics, "microbatch_client_disconnects_total") == 2


async def test_a_client_batch_larger_than_half_the_queue_is_split_into_waves() -> None:
    model = FakeTextModel()
    texts = [f"text number {i}" for i in range(11)]
    async with sdk(model, max_queue_size=4, max_batch_size=2, cache_size=0) as (ai, client):
        reply = await ai.embeddings.create(input=texts, model="x", encoding_format="float")
        tei = await client.post("/embed", json={"inputs": texts})
        ours = await client.post("/predict/batch", json={"texts": texts})
    assert [d.embedding for d in reply.data] == [fake_embedding(t) for t in texts]
    assert tei.json() == [fake_embedding(t) for t in texts]
    assert [r["embedding"] for r in ours.json()["results"]] == [fake_embedding(t) for t in texts]
    assert max(model.batches) <= 2
    assert sorted(model.seen) == sorted(texts * 3), "every input computed once per call"


async def test_tei_routes_answer_in_teis_shapes() -> None:
    async with serve(FakeTextModel(), max_client_batch=100) as client:
        one = await client.post("/embed", json={"inputs": "abc"})
        mixed = await client.post("/embed", json={"inputs": ["abc", [100, 101]]})
        tokens = await client.post("/tokenize", json={"inputs": "hi"})
        many = await client.post("/tokenize", json={"inputs": ["a", "bc"]})
        info = await client.get("/info")
        bad = await client.post("/embed", json={"inputs": []})
        direction = await client.post(
            "/embed", json={"inputs": "abc", "truncation_direction": "Left"}
        )
    assert one.json() == [fake_embedding("abc")]
    assert mixed.json() == [fake_embedding("abc"), fake_embedding("de")]
    assert tokens.json() == [
        [
            {"id": 104, "text": "h", "special": False, "start": 0, "stop": 1},
            {"id": 105, "text": "i", "special": False, "start": 1, "stop": 2},
        ]
    ]
    assert [len(t) for t in many.json()] == [1, 2]
    body = info.json()
    assert body["model_id"] == "fake"
    assert body["model_type"] == {"embedding": {"pooling": "mean"}}
    assert body["max_client_batch_size"] == 100
    assert body["max_input_length"] == 64
    assert {"max_concurrent_requests", "max_batch_requests", "auto_truncate", "version"} <= set(
        body
    )
    assert bad.status_code == 422
    assert bad.json()["error_type"] == "Validation"
    assert "input is empty" in bad.json()["error"]
    assert direction.status_code == 200


async def test_embedding_routes_refuse_a_model_that_does_not_embed() -> None:
    async with sdk(FakeTextModel(task="classify")) as (ai, client):
        with pytest.raises(openai.BadRequestError) as wrong:
            await ai.embeddings.create(input="x", model="x")
        tei = await client.post("/embed", json={"inputs": "x"})
        cohere = await client.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
    assert wrong.value.code == "wrong_task"
    assert "/v1/embeddings needs an embedding model" in wrong.value.message
    assert tei.status_code == 400
    assert tei.json()["type"] == "wrong_task"
    assert cohere.json()["error"]["code"] == "wrong_task"


async def test_teis_root_similarity_and_decode_need_a_key_and_a_get_on_the_root_does_not() -> None:
    async with sdk(FakeTextModel(), key="nope", api_keys="key-one") as (_, client):
        root = await client.post("/", json={"inputs": "no key"})
        similarity = await client.post(
            "/similarity", json={"inputs": {"source_sentence": "a", "sentences": ["b"]}}
        )
        decode = await client.post("/decode", json={"ids": [104, 105]})
        probe = await client.get("/")
        keyed = await client.post(
            "/decode", json={"ids": [104, 105]}, headers={"Authorization": "Bearer key-one"}
        )
    assert [root.status_code, similarity.status_code, decode.status_code] == [401, 401, 401]
    assert root.json()["error_type"] == "Validation"
    assert probe.status_code in (404, 405), "a load balancer's GET / is not asked for a key"
    assert keyed.json() == ["hi"]


async def test_a_classifier_on_the_root_refuses_no_inputs_and_a_foreign_activation() -> None:
    model = FakeTextModel(task="classify", labels=("short", "long"))
    async with sdk(model) as (_, client):
        empty = await client.post("/", json={"inputs": []})
        foreign = await client.post(
            "/", json={"inputs": "x", "parameters": {"function_to_apply": "sigmoid"}}
        )
        best = await client.post("/", json={"inputs": ["x", "y" * 50], "parameters": {"top_k": 1}})
    assert empty.status_code == 422
    assert foreign.status_code == 422
    assert "function_to_apply 'sigmoid'" in foreign.json()["error"]
    assert [len(answer) for answer in best.json()] == [1, 1]
