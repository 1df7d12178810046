"""The retrieval outputs' routes and options keep every guarantee of the others: long
texts chunked into windows that each join the micro-batch, keys, 429 and deadlines on
`/v2/embed` and `/embed_all`, clients that hang up never computed, and a 4xx with the
reason for each option a model cannot honour. A fake model that blocks until released
orders the events; the numbers are checked against the reference libraries in
tests/server/test_clients.py and tests/batcher/models."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from tests.server.fakes import FakeTextModel, fake_embedding
from tests.server.live import live_server
from tests.server.test_app import serve
from tests.server.test_disconnects import raw_post, sample, wait_for_metric

pytestmark = pytest.mark.asyncio

LONG = "".join(chr(ord("a") + i % 26) for i in range(150))
"""150 characters: three windows of the fake model's 64 tokens (64, 64, 22)."""


def windows_mean(text: str, size: int = 64) -> list[float]:
    runs = [text[i : i + size] for i in range(0, len(text), size)]
    vectors = np.array([fake_embedding(r) for r in runs])
    return np.average(vectors, axis=0, weights=[len(r) for r in runs]).tolist()


async def test_a_long_text_is_computed_as_windows_each_an_item_and_combined() -> None:
    model = FakeTextModel()
    async with serve(model, cache_size=0) as client:
        chunked = await client.post("/predict", json={"text": LONG, "truncate": False,
                                                      "chunking": "mean"})  # fmt: skip
        batch = await client.post("/predict/batch", json={"texts": ["short", LONG],
                                                          "chunking": "mean"})  # fmt: skip
        cut = await client.post("/predict", json={"text": LONG})
        refused = await client.post("/predict", json={"text": LONG, "truncate": False})
    assert chunked.status_code == 200, chunked.text
    np.testing.assert_allclose(chunked.json()["embedding"], windows_mean(LONG))
    assert chunked.json()["truncated"] is False
    assert [r["embedding"] for r in batch.json()["results"]] == [
        fake_embedding("short"), chunked.json()["embedding"]
    ]  # fmt: skip
    assert cut.json()["embedding"] == fake_embedding(LONG[:64])
    assert refused.status_code == 422
    assert model.seen.count(LONG[64:128]) == 2, "each window is an item of the micro-batch"
    assert LONG not in model.seen


async def test_the_servers_chunking_applies_to_every_embedding_route_unless_asked_to_cut() -> None:
    model = FakeTextModel()
    async with serve(model, chunking="mean", cache_size=0) as client:
        openai = await client.post("/v1/embeddings", json={"input": [LONG], "model": "x",
                                                           "encoding_format": "float"})  # fmt: skip
        tei = await client.post("/embed", json={"inputs": LONG})
        cohere = await client.post("/v2/embed", json={"texts": [LONG], "truncate": "NONE"})
        cut = await client.post("/predict", json={"text": LONG, "truncate": True})
        tei_cut = await client.post("/embed", json={"inputs": LONG, "truncate": True})
    expected = windows_mean(LONG)
    np.testing.assert_allclose(openai.json()["data"][0]["embedding"], expected)
    assert openai.json()["usage"]["prompt_tokens"] == len(LONG)
    np.testing.assert_allclose(tei.json()[0], expected)
    np.testing.assert_allclose(cohere.json()["embeddings"]["float"][0], expected)
    assert cut.json()["embedding"] == fake_embedding(LONG[:64])
    assert tei_cut.json()[0] == fake_embedding(LONG[:64])


async def test_each_option_a_model_cannot_honour_is_refused_with_the_reason() -> None:
    async with serve(FakeTextModel()) as embed:
        cases = [
            ("/predict", {"text": "x", "chunking": "mean", "truncate": True},
             422, "cannot go with truncate: true"),
            ("/predict", {"text": "x", "chunking": "mean", "token_embeddings": True},
             422, "not token vectors"),
            ("/predict", {"text": "x", "embedding_type": "int8"},
             422, "needs calibration ranges"),
            ("/predict", {"text": "x", "token_embeddings": True, "encoding_format": "base64"},
             422, "float JSON numbers only"),
            ("/embed_all", {"inputs": "x"}, 422, "no token vectors"),
            ("/embed_sparse", {"inputs": "x"}, 400, "needs a sparse model"),
            ("/v2/embed", {"texts": ["x"], "embedding_types": ["uint8"]},
             400, "needs calibration ranges"),
            ("/v2/embed", {"texts": ["x"], "inputs": [{"content": [{"type": "text",
             "text": "y"}]}]}, 400, "(one of them)"),
            ("/v2/embed", {"texts": ["x"], "embedding_types": ["int4"]}, 400, "embedding_types"),
            ("/model/calibration", None, 422, "needs calibration ranges"),
        ]  # fmt: skip
        answers = [
            await (embed.post(path, json=body) if body is not None else embed.get(path))
            for path, body, _, _ in cases
        ]
    async with serve(FakeTextModel(task="classify")) as classify:
        wrong = [
            await classify.post("/predict", json={"text": "x", "embedding_type": "binary"}),
            await classify.post("/predict", json={"text": "x", "chunking": "mean"}),
            await classify.post("/embed_all", json={"inputs": "x"}),
            await classify.post("/v2/embed", json={"texts": ["x"]}),
        ]
    for (path, _, status, reason), answer in zip(cases, answers, strict=True):
        assert answer.status_code == status, (path, answer.text)
        assert reason in answer.text, (path, answer.text)
    assert [a.status_code for a in wrong] == [422, 422, 400, 400]
    # TEI's routes answer in TEI's shape, the new ones too.
    assert wrong[2].json()["error_type"] == "Validation"
    assert "/embed_all needs an embedding model" in wrong[2].json()["error"]
    assert answers[4].json()["error_type"] == "Validation"
    assert "applies to embedding models" in wrong[0].text
    assert "chunking applies to embedding models" in wrong[1].text
    assert "/embed_all needs an embedding model" in wrong[2].text
    assert "an embedding model" in wrong[3].json()["message"]


async def test_keys_429_and_deadlines_hold_on_v2_embed_in_cohere_shape() -> None:
    model = FakeTextModel()
    async with serve(model, api_keys="k", max_batch_size=1, max_queue_size=1) as client:
        key = {"Authorization": "Bearer k"}
        anonymous = await client.post("/v2/embed", json={"texts": ["x"]})
        tokens = await client.post("/embed_all", json={"inputs": "x"})
        model.predict_gate.clear()
        blocker = asyncio.create_task(client.post("/predict", json={"text": "b"}, headers=key))
        await asyncio.to_thread(model.entered.wait, 30)
        staged = asyncio.create_task(client.post("/predict", json={"text": "s"}, headers=key))
        await wait_for_metric(client, "microbatch_queue_depth", 1)
        full = await client.post("/v2/embed", json={"texts": ["no room"]}, headers=key)
        model.predict_gate.set()
        await asyncio.gather(blocker, staged)
        model.predict_gate.clear()
        blocker = asyncio.create_task(client.post("/predict", json={"text": "b2"}, headers=key))
        await asyncio.to_thread(model.entered.wait, 30)
        late = await client.post("/v2/embed", json={"texts": ["in a hurry"]},
                                 headers={**key, "X-Request-Timeout-Ms": "50"})  # fmt: skip
        model.predict_gate.set()
        await blocker
    assert [anonymous.status_code, tokens.status_code] == [401, 401]
    assert "missing API key" in anonymous.json()["message"]
    assert full.status_code == 429
    assert full.headers["retry-after"] == "1"
    assert full.json()["type"] == "queue_full"
    assert late.status_code == 504
    assert "no room" not in model.seen
    assert "in a hurry" not in model.seen


async def test_clients_that_hang_up_on_v2_embed_or_a_chunked_text_are_never_computed() -> None:
    model = FakeTextModel()
    async with (
        live_server(model, max_batch_size=4, chunking="mean") as url,
        httpx.AsyncClient(base_url=url) as c,
    ):
        port = int(url.rsplit(":", 1)[1])
        model.predict_gate.clear()
        blocker = asyncio.create_task(c.post("/predict", json={"text": "blocker"}, timeout=30))
        await asyncio.to_thread(model.entered.wait, 30)
        gone = [
            await raw_post(port, ["gone-cohere"], "/v2/embed", "texts"),
            await raw_post(port, LONG, "/predict", "text"),
        ]
        await wait_for_metric(c, "microbatch_queue_depth", 4)  # 1 + the 3 windows
        for _, writer in gone:
            writer.close()
        await wait_for_metric(c, "microbatch_client_disconnects_total", 2)
        model.predict_gate.set()
        answered = await blocker
        metrics = (await c.get("/metrics")).text
    assert answered.status_code == 200
    assert model.seen == ["blocker"]
    assert sample(metrics, "microbatch_client_disconnects_total") == 2
