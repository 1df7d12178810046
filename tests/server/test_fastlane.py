"""The inference routes' way around FastAPI's router (`server.fastlane`), and their JSON
(`server.routes.parsing.to_json`), held to what FastAPI and pydantic give."""

from __future__ import annotations

import json

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from server.app import create_app
from server.fastlane import FastLane, LaneApp, direct_routes
from server.middleware import RequestContextMiddleware
from server.routes import fast_lane_routes
from server.routes.cohere import RerankResponse, RerankUsage
from server.routes.openai import EmbeddingObject, EmbeddingsResponse, Usage
from server.routes.parsing import to_json
from server.schemas import BatchResponse, Embedding, EmbeddingResponse, Label, LabelResponse
from server.settings import Settings
from tests.server.fakes import FakeTextModel
from tests.server.test_app import serve, wait_until_ready


def test_every_route_that_reads_its_own_body_takes_the_lane() -> None:
    assert set(fast_lane_routes()) == {
        "/predict",
        "/predict/batch",
        "/v1/embeddings",
        "/v1/rerank",
        "/v2/rerank",
        "/v2/embed",
        "/",
        "/embed",
        "/embed_all",
        "/embed_sparse",
        "/similarity",
        "/rerank",
        "/tokenize",
        "/decode",
        "/v2/models/{name:path}/infer",
        "/v2/models/{name:path}/versions/{version}/infer",
    }


class Refused(Exception):
    pass


class RefusedLoudly(Refused):
    pass


class Unhandled(Exception):
    pass


def _app(cls: type[FastAPI] = FastAPI) -> FastAPI:
    app = cls()

    @app.post("/direct")
    async def direct(request: Request) -> Response:
        body = await request.json()
        if body.get("raise") == "loudly":
            raise RefusedLoudly("no!")
        if body.get("raise") == "unhandled":
            raise Unhandled("nobody catches this")
        return Response(json.dumps({"route": request.scope["route"].path, **body}))

    @app.post("/with-a-parameter")
    async def with_a_parameter(x: int) -> dict[str, int]:
        return {"x": x}

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        return Response(f"refused: {exc}", status_code=409)

    if isinstance(app, LaneApp):
        app.add_fast_lane(direct_routes(app.routes))
    else:
        app.add_middleware(
            FastLane, routes=direct_routes(app.routes), handlers=app.exception_handlers
        )
    return app


def test_only_posts_to_routes_of_one_request_parameter_are_taken() -> None:
    assert set(direct_routes(_app().routes)) == {"/direct"}


@pytest.mark.asyncio
async def test_the_lane_answers_as_fastapi_does() -> None:
    app = _app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        ok = await c.post("/direct", json={"a": 1})
        assert ok.status_code == 200
        assert ok.json() == {"route": "/direct", "a": 1}  # the route is in the scope
        # An exception goes to the handler of the nearest class in its hierarchy.
        loud = await c.post("/direct", json={"raise": "loudly"})
        assert (loud.status_code, loud.text) == (409, "refused: no!")
        # Everything else is FastAPI's: other methods, other paths, parameters.
        assert (await c.get("/direct")).status_code == 405
        assert (await c.post("/elsewhere", json={})).status_code == 404
        assert (await c.post("/with-a-parameter?x=3", json={})).json() == {"x": 3}
        # An exception without a handler reaches the server, as through FastAPI.
        with pytest.raises(Unhandled):
            await c.post("/direct", json={"raise": "unhandled"})


@pytest.mark.asyncio
async def test_lane_routes_keep_their_errors_metrics_and_405() -> None:
    async with serve(FakeTextModel()) as client:
        assert (await client.post("/predict", json={"text": "hi"})).status_code == 200
        bad = await client.post("/v1/embeddings", json={"input": 3, "model": "m"})
        assert bad.status_code == 400  # OpenAI's status and shape for invalid input
        assert bad.json()["error"]["type"] == "invalid_request_error"
        wrong = await client.get("/predict")
        assert wrong.status_code == 405
        assert wrong.json()["type"] == "http_error"
        metrics = (await client.get("/metrics")).text
    assert 'microbatch_request_duration_seconds_count{route="/predict",status="200"} 1.0' in (
        metrics
    )
    assert 'route="/v1/embeddings",status="400"' in metrics


class Outer:
    """The app's outermost middleware: records the path of every request it sees."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[str] = []
        Outer.last = self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append(scope["path"])
        await self.app(scope, receive, send)

    last: Outer


@pytest.fixture
def outer_layers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the requests that went through Starlette's ServerErrorMiddleware,
    the outermost of FastAPI's own layers."""
    seen = []
    original = ServerErrorMiddleware.__call__

    async def call(self: ServerErrorMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen.append(scope["path"])
        await original(self, scope, receive, send)

    monkeypatch.setattr(ServerErrorMiddleware, "__call__", call)
    return seen


@pytest.mark.asyncio
async def test_lane_requests_enter_at_the_outermost_of_our_middleware(
    outer_layers: list[str],
) -> None:
    app = _app(LaneApp)
    app.add_middleware(Outer)
    async with (
        LifespanManager(app) as manager,  # the lifespan builds the middleware stack
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as c,
    ):
        assert (await c.post("/direct", json={"a": 1})).json() == {"route": "/direct", "a": 1}
        assert (await c.post("/direct", json={"raise": "loudly"})).status_code == 409
        assert (await c.get("/direct")).status_code == 405
        assert (await c.post("/with-a-parameter?x=3", json={})).json() == {"x": 3}
        with pytest.raises(Unhandled):
            await c.post("/direct", json={"raise": "unhandled"})
    # Every request met our middleware; only those off the lane met FastAPI's layers.
    assert Outer.last.seen == ["/direct", "/direct", "/direct", "/with-a-parameter", "/direct"]
    assert outer_layers == ["/direct", "/with-a-parameter"]


@pytest.mark.asyncio
async def test_an_app_under_a_root_path_takes_fastapis_way(outer_layers: list[str]) -> None:
    app = _app(LaneApp)
    app.root_path = "/api"  # the app's own (deprecated in FastAPI 0.165), not the server's
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as c,
    ):
        assert (await c.post("/direct", json={"a": 1})).status_code == 200
    assert outer_layers == ["/direct"]


@pytest.mark.asyncio
async def test_the_server_enters_the_lane_at_its_request_context(outer_layers: list[str]) -> None:
    app = create_app(Settings(), model=FakeTextModel())
    assert isinstance(app, LaneApp)
    async with (
        LifespanManager(app, startup_timeout=30) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as c,
    ):
        await wait_until_ready(c)
        r = await c.post("/predict", json={"text": "hi"}, headers={"x-request-id": "abc"})
        assert (r.status_code, r.headers["x-request-id"]) == (200, "abc")
        assert (await c.get("/health")).status_code == 200
        door = app._entrance
    assert type(door) is RequestContextMiddleware
    lane = set(fast_lane_routes())
    assert app._lane_paths == {p for p in lane if "{" not in p}
    assert app._lane_prefixes == ("/v2/models/",)
    assert "/health" in outer_layers
    assert "/predict" not in outer_layers


def _replies() -> list[BaseModel]:
    """Every reply model the inference routes serialize, built as the routes build them
    (model_construct) and validated."""
    vector = [0.1, -2.5e-07, 3.0, 1e300]
    embedding = Embedding.model_construct(embedding=vector, truncated=False)
    label = Label.model_construct(label="pos", score=0.75, scores={"pos": 0.75}, truncated=True)
    meta = {"model": "m", "version": "1", "request_id": "r-1", "processing_time_ms": 1.25}
    usage = Usage(prompt_tokens=3, total_tokens=3)
    return [
        EmbeddingResponse.model_construct(**embedding.__dict__, **meta),
        EmbeddingResponse(embedding="AACAPw==", truncated=False, **meta),
        LabelResponse.model_construct(**label.__dict__, **meta),
        LabelResponse(label="neg", score=0.5, scores=None, truncated=False, **meta),
        BatchResponse.model_construct(results=[embedding, embedding], **meta),
        BatchResponse.model_construct(results=[label], **meta),
        EmbeddingsResponse.model_construct(
            data=[EmbeddingObject.model_construct(index=0, embedding=vector)],
            model="m",
            usage=usage,
        ),
        RerankResponse(
            id="r-1", results=[], model="m", usage=RerankUsage(prompt_tokens=1, total_tokens=1)
        ),
    ]


@pytest.mark.parametrize("reply", _replies(), ids=lambda r: type(r).__name__)
def test_a_reply_is_the_json_pydantic_gives(reply: BaseModel) -> None:
    assert json.loads(to_json(reply)) == json.loads(reply.model_dump_json())
