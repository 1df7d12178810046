"""The result cache: bounded in entries, bytes and time, keyed by everything that changes
an output; and in the app, a repeated input answered without the queue."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from batcher.models import Encoded
from server.cache import ResultCache, footprint
from tests.server.fakes import FakeTextModel, fake_embedding
from tests.server.test_app import serve

pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def item(*ids: int, **options: object) -> Encoded:
    return Encoded(list(ids), False, **options)  # type: ignore[arg-type]


def cache(entries: int = 100, max_bytes: int = 10**6, ttl_s: float = 60.0) -> ResultCache:
    return ResultCache(entries, max_bytes, ttl_s, CollectorRegistry(), clock=Clock())


async def test_least_recently_used_entries_go_first_beyond_the_entry_limit() -> None:
    registry = CollectorRegistry()
    c = ResultCache(2, 10**6, 60.0, registry, clock=Clock())
    a, b, d = item(1), item(2), item(3)
    c.put(a.identity(), a, [1.0])
    c.put(b.identity(), b, [2.0])
    assert c.get(a.identity()) == [1.0]  # a is now the most recently used
    c.put(d.identity(), d, [3.0])
    assert c.get(b.identity()) is None
    assert c.get(a.identity()) == [1.0]
    assert c.get(d.identity()) == [3.0]
    assert registry.get_sample_value("microbatch_cache_evictions_total") == 1


async def test_the_byte_bound_holds_and_an_entry_larger_than_it_is_not_kept() -> None:
    small = item(1)
    size = footprint(small, [0.0] * 10)
    c = cache(max_bytes=3 * size)
    for i in range(10):
        x = item(i)
        c.put(x.identity(), x, [0.0] * 10)
        assert c.bytes <= 3 * size
    assert len(c) == 3
    huge = item(99)
    c.put(huge.identity(), huge, [0.0] * 10_000)
    assert c.get(huge.identity()) is None
    assert len(c) == 3, "what was there stays"


async def test_an_entry_is_served_for_ttl_seconds_only() -> None:
    clock = Clock()
    c = ResultCache(10, 10**6, 5.0, CollectorRegistry(), clock=clock)
    x = item(1, 2)
    c.put(x.identity(), x, [1.0])
    clock.now = 4.9
    assert c.get(x.identity()) == [1.0]
    clock.now = 5.0
    assert c.get(x.identity()) is None
    assert len(c) == 0
    assert c.bytes == 0


async def test_every_output_option_is_part_of_the_key() -> None:
    base = item(5, 6, 7)
    variants = [
        item(5, 6, 7, normalize=True),
        item(5, 6, 7, dimensions=2),
        item(5, 6, 7, raw_scores=True),
        item(5, 6, 7, prompt_tokens=1),
        item(5, 6, 7, type_ids=[0, 0, 1]),
        item(5, 6),
    ]
    keys = {v.identity() for v in variants}
    assert base.identity() not in keys
    assert len(keys) == len(variants)
    assert item(5, 6, 7).identity() == base.identity()
    assert Encoded([5, 6, 7], True).identity() == base.identity(), "a cut text, same tokens"


# -- in the app --------------------------------------------------------------------------


async def test_a_repeated_input_is_answered_from_the_cache_without_the_queue() -> None:
    model = FakeTextModel()
    async with serve(model) as client:
        first = await client.post("/predict", json={"text": "hello"})
        model.predict_gate.clear()  # the device is held: only the cache can answer
        again = await client.post("/predict", json={"text": "hello"})
        model.predict_gate.set()
        metrics = (await client.get("/metrics")).text
    assert first.headers["x-cache"] == "miss"
    assert again.headers["x-cache"] == "hit"
    assert again.headers["x-batch-size"] == "0"
    assert again.json()["embedding"] == first.json()["embedding"] == fake_embedding("hello")
    assert model.seen.count("hello") == 1
    assert "microbatch_cache_hits_total 1.0" in metrics
    assert "microbatch_cache_misses_total 1.0" in metrics


async def test_a_client_batch_is_answered_partly_from_the_cache_in_order() -> None:
    model = FakeTextModel()
    async with serve(model) as client:
        await client.post("/predict", json={"text": "b"})
        r = await client.post("/predict/batch", json={"texts": ["a", "b", "c"]})
    assert r.headers["x-cache"] == "partial"
    assert [x["embedding"] for x in r.json()["results"]] == [fake_embedding(t) for t in "abc"]
    assert model.seen.count("b") == 1


async def test_no_cache_in_the_request_computes_afresh() -> None:
    model = FakeTextModel()
    async with serve(model) as client:
        await client.post("/predict", json={"text": "hello"})
        fresh = await client.post(
            "/predict", json={"text": "hello"}, headers={"Cache-Control": "no-cache"}
        )
    assert fresh.headers["x-cache"] == "miss"
    assert model.seen.count("hello") == 2


async def test_cache_size_zero_turns_it_off() -> None:
    model = FakeTextModel()
    async with serve(model, cache_size=0) as client:
        first = await client.post("/predict", json={"text": "hello"})
        again = await client.post("/predict", json={"text": "hello"})
        metrics = (await client.get("/metrics")).text
    assert first.headers["x-cache"] == again.headers["x-cache"] == "miss"
    assert model.seen.count("hello") == 2
    assert "microbatch_cache_hits_total" not in metrics
