"""The load generator against an ASGI app whose latency is known, on virtual time
(looptime): every latency it reports can be checked exactly."""

from __future__ import annotations

import asyncio
import random
import statistics
from contextlib import AbstractAsyncContextManager

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from benchmarks.loadgen import (
    Load,
    Request,
    Samples,
    closed_loop,
    open_loop,
    poisson_arrivals,
    summarize,
)
from benchmarks.runs import Step, measure
from benchmarks.transport import Transport, asgi_transports

DELAYS_MS = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def delayed_app(delays_ms: list[int], fail_every: int = 0) -> Starlette:
    """Answers the n-th request after delays_ms[n % len]; every `fail_every`-th gets a 503."""
    count = 0

    async def predict(request: HTTPRequest) -> Response:
        nonlocal count
        n, count = count, count + 1
        await asyncio.sleep(delays_ms[n % len(delays_ms)] / 1000)
        if fail_every and n % fail_every == fail_every - 1:
            return JSONResponse({"detail": "busy"}, status_code=503)
        return JSONResponse({"embedding": [0.0]})

    return Starlette(routes=[Route("/predict", predict, methods=["POST"])])


def client_for(app: Starlette) -> AbstractAsyncContextManager[Transport]:
    return asgi_transports(app)(1)


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_closed_loop_latencies_and_rate_are_exact() -> None:
    clock = asyncio.get_running_loop().time
    async with client_for(delayed_app(DELAYS_MS)) as client:
        samples = await closed_loop(client, ["x"], Request(), 1, 55.0, 0.0, clock)
    # One client: a request every 10..100 ms in turn, 55 ms on average, so 1000 in 55 s.
    assert len(samples.latencies_s) == 1000
    ms = np.array(samples.latencies_s) * 1000
    assert sorted(set(np.round(ms, 6))) == DELAYS_MS
    assert np.percentile(ms, 50) == pytest.approx(55.0)
    assert np.percentile(ms, 99) == pytest.approx(100.0)
    assert samples.statuses == {"200": 1000}


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_warmup_is_not_measured_and_errors_are_counted_by_status() -> None:
    clock = asyncio.get_running_loop().time
    async with client_for(delayed_app([100], fail_every=4)) as client:
        samples = await closed_loop(client, ["x"], Request(), 2, 10.0, 5.0, clock)
    assert sum(samples.statuses.values()) == 200  # 2 clients x 10 s / 0.1 s, warm-up excluded
    assert samples.statuses == {"200": 150, "503": 50}


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_open_loop_latency_includes_queueing_behind_a_slow_server() -> None:
    """A server that handles one request at a time, 50 ms each, fed 10/s: latency from the
    scheduled arrival includes waiting behind earlier requests."""
    lock = asyncio.Lock()

    async def serial(request: HTTPRequest) -> Response:
        async with lock:
            await asyncio.sleep(0.05)
        return JSONResponse({})

    app = Starlette(routes=[Route("/predict", serial, methods=["POST"])])
    clock = asyncio.get_running_loop().time
    async with client_for(app) as client:
        samples = await open_loop(client, ["x"], Request(), 10.0, 100.0, 0.0, seed=3, clock=clock)
    ms = np.array(samples.latencies_s) * 1000
    assert ms.min() == pytest.approx(50.0, abs=0.01)
    assert ms.max() > 100.0, "some arrivals queued behind others"
    assert samples.statuses["200"] == len(ms)


def test_poisson_arrivals_have_the_requested_mean_rate_and_exponential_gaps() -> None:
    arrivals = poisson_arrivals(200.0, 100.0, random.Random(7))
    assert len(arrivals) / 100.0 == pytest.approx(200.0, rel=0.03)
    gaps = np.diff(arrivals)
    assert statistics.mean(gaps) == pytest.approx(1 / 200.0, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(1 / 200.0, rel=0.05)  # exponential: sd = mean


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_open_loop_achieves_the_requested_rate_against_a_fast_server() -> None:
    clock = asyncio.get_running_loop().time
    async with client_for(delayed_app([5])) as client:
        samples = await open_loop(client, ["x"], Request(), 100.0, 60.0, 0.0, seed=1, clock=clock)
    assert len(samples.latencies_s) / 60.0 == pytest.approx(100.0, rel=0.05)
    assert max(samples.latencies_s) == pytest.approx(0.005, abs=1e-5)  # loop resolution


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_measured_step_summarises_rate_and_percentiles() -> None:
    clients = asgi_transports(delayed_app(DELAYS_MS))
    step = Step(["x"], Request(), Load("closed", 4), duration_s=55.0, warmup_s=1.0)
    result = await measure(step, clients, clock=asyncio.get_running_loop().time)
    assert result.throughput_rps == pytest.approx(4 / 0.055, rel=0.01)
    assert result.latency_ms["p50"] == pytest.approx(55.0, abs=5.0)
    assert result.latency_ms["max"] == pytest.approx(100.0)
    assert result.server == {}, "a server without /metrics reports nothing, not garbage"


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_latencies_by_kind_of_text_follow_each_request_s_text() -> None:
    """One client sends texts 0, 1, 2, ... in turn: even ones are queries, odd ones
    chunks, and the n-th request takes DELAYS_MS[n % 10], so each kind's latencies are
    known exactly."""
    clock = asyncio.get_running_loop().time
    kinds = ["query", "chunk"]
    async with client_for(delayed_app(DELAYS_MS)) as client:
        samples = await closed_loop(client, ["q", "c"], Request(), 1, 55.0, 0.0, clock, kinds)
    queries = sorted(set(np.round(np.array(samples.by_kind["query"]) * 1000, 6)))
    chunks = sorted(set(np.round(np.array(samples.by_kind["chunk"]) * 1000, 6)))
    assert (queries, chunks) == (DELAYS_MS[0::2], DELAYS_MS[1::2])
    assert len(samples.by_kind["query"]) + len(samples.by_kind["chunk"]) == 1000
    step = summarize(Load("closed", 1), samples, {})
    assert step.latency_ms_by_kind["query"]["max"] == pytest.approx(90.0)
    assert step.latency_ms_by_kind["chunk"]["max"] == pytest.approx(100.0)
    assert step.latency_ms_by_kind["chunk"]["requests"] == 500
    # Several texts a request have no one kind; texts without kinds have none either.
    async with client_for(delayed_app(DELAYS_MS)) as client:
        plain = await closed_loop(client, ["q", "c"], Request(), 1, 1.0, 0.0, clock)
    assert plain.by_kind == {}
    assert summarize(Load("closed", 1), plain, {}).latency_ms_by_kind == {}


def test_merged_samples_keep_their_kinds() -> None:
    a, b = Samples(), Samples()
    a.record(0.1, "200", "query")
    b.record(0.2, "200", "query")
    b.record(0.3, "503", "chunk")
    a.merge(b)
    assert a.by_kind == {"query": [0.1, 0.2], "chunk": [0.3]}
    assert a.statuses == {"200": 2, "503": 1}


def test_each_endpoint_gets_its_own_body_shape() -> None:
    texts = ["a", "b", "c"]
    assert Request().body(texts, 4) == {"text": "b"}
    assert Request("/predict/batch", 2).body(texts, 2) == {"texts": ["c", "a"]}
    for openai in ("/v1/embeddings", "/embeddings"):  # ours, and a peer's such as Infinity's
        body = Request(openai, model="m", encoding_format="float").body(texts, 5)
        assert body == {"input": "c", "model": "m", "encoding_format": "float"}


@pytest.mark.asyncio
async def test_the_load_tools_ask_for_fresh_answers_not_a_servers_cache() -> None:
    """Over real HTTP (aiohttp, as real runs use) and in-process alike, every request
    says `Cache-Control: no-cache`: the texts repeat, and a result cache would otherwise
    answer them."""
    from aiohttp import web

    from benchmarks.transport import aiohttp_transports

    seen: list[str | None] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("cache-control"))
        return web.json_response({"embedding": [0.0]})

    app = web.Application()
    app.router.add_post("/predict", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        async with aiohttp_transports(f"http://127.0.0.1:{port}")(1) as client:
            assert await client.post("/predict", {"text": "a"}) == "200"
    finally:
        await runner.cleanup()

    async def starlette_record(request: HTTPRequest) -> Response:
        seen.append(request.headers.get("cache-control"))
        return JSONResponse({"embedding": [0.0]})

    starlette_app = Starlette(routes=[Route("/predict", starlette_record, methods=["POST"])])
    async with client_for(starlette_app) as client:
        assert await client.post("/predict", {"text": "a"}) == "200"
    assert seen == ["no-cache", "no-cache"]
