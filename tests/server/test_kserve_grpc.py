"""The Open Inference Protocol over gRPC (`--grpc-port`), on a real port beside a real
uvicorn, with a fake model the tests hold and release: every RPC, and the guarantees of
the HTTP routes (keys, the early 429, deadlines, cancellation, drain, bad input) as gRPC
status codes. The client is grpc.aio with the server's own message classes, so these run
at the declared floors; Triton's client is in `tests/server/test_triton_clients.py`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.processes import free_port
from server.app import create_app
from server.kserve import messages as pb
from server.kserve.grpc_service import BadCall, Bridge
from server.kserve.tensors import pack_bytes
from server.settings import Settings
from tests.server.fakes import FakeTextModel, fake_embedding
from tests.server.live import _InLoopServer, metric
from tests.server.test_disconnects import wait_for_metric

pytestmark = pytest.mark.asyncio
METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
           "ModelInfer")  # fmt: skip


@dataclass
class Grpc:
    """A server's HTTP client, its gRPC channel and its app."""

    http: httpx.AsyncClient
    channel: grpc.aio.Channel
    app: Any

    def rpc(self, name: str) -> grpc.aio.UnaryUnaryMultiCallable:
        return self.channel.unary_unary(
            f"/{pb.SERVICE}/{name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=getattr(pb, f"{name}Response").FromString,
        )

    async def infer(self, *texts: str, deadline_s: float = 30, **kw: Any) -> Any:
        return await self.rpc("ModelInfer")(infer_request(*texts, **kw), timeout=deadline_s)

    async def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return int(reply.status)


def infer_request(*texts: str, model: str = "fake", raw: bool = True, **params: Any) -> Any:
    request = pb.ModelInferRequest(model_name=model, id="r1")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
    values = [t.encode() for t in texts]
    if raw:
        request.raw_input_contents.append(pack_bytes(values))
    else:
        tensor.contents.bytes_contents.extend(values)
    for name, value in params.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(request.parameters[name], kind, value)
    return request


def embeddings(reply: Any) -> list[list[float]]:
    import numpy as np

    [output] = reply.outputs
    array = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(output.shape)
    return array.tolist()


@contextlib.asynccontextmanager
async def serve_grpc(model: FakeTextModel, **options: object) -> AsyncIterator[Grpc]:
    """The app behind uvicorn and gRPC on free ports, in the test's loop, once ready."""
    grpc_port = free_port()
    app = create_app(Settings(grpc_port=grpc_port, **options), model=model)  # type: ignore[arg-type]
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning")
    server = _InLoopServer(config)
    task = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async with asyncio.timeout(30):
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get("/ready")).status_code == 200:
                            break
                    await asyncio.sleep(0.01)  # the server is still starting: poll its state
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                yield Grpc(http, channel, app)
    finally:
        server.should_exit = True
        await task


async def test_every_rpc_answers_as_its_http_twin() -> None:
    async with serve_grpc(FakeTextModel()) as g:
        live = await g.rpc("ServerLive")(pb.ServerLiveRequest())
        ready = await g.rpc("ServerReady")(pb.ServerReadyRequest())
        model_ready = await g.rpc("ModelReady")(pb.ModelReadyRequest(name="fake"))
        server = await g.rpc("ServerMetadata")(pb.ServerMetadataRequest())
        metadata = await g.rpc("ModelMetadata")(pb.ModelMetadataRequest(name="fake"))
        http_metadata = (await g.http.get("/v2/models/fake")).json()
        call = g.rpc("ModelInfer")(infer_request("hello", "a longer text"), timeout=30)
        reply = await call
        trailers = await call.trailing_metadata()  # indexed by key (grpc's Metadata)
        typed = await g.infer("hello", raw=False)
        metrics = (await g.http.get("/metrics")).text
    assert live.live
    assert ready.ready
    assert model_ready.ready
    assert server.name == "microbatch"
    assert list(server.extensions) == ["binary_tensor_data"]
    assert metadata.name == http_metadata["name"] == "fake"
    assert [i.name for i in metadata.inputs] == ["text"]
    assert list(metadata.outputs[0].shape) == [-1, -1]
    assert (reply.model_name, reply.model_version, reply.id) == ("fake", "1", "r1")
    assert embeddings(reply) == [fake_embedding("hello"), fake_embedding("a longer text")]
    assert embeddings(typed) == [fake_embedding("hello")]
    assert trailers["x-model-version"] == "1"
    assert int(trailers["x-batch-size"]) >= 1
    assert metric(metrics, 'microbatch_grpc_calls_total{method="ModelInfer",code="OK"}') == 2


async def test_bad_input_is_invalid_argument_and_an_unknown_version_not_found() -> None:
    async with serve_grpc(FakeTextModel()) as g:
        request = infer_request("a", "b")
        request.inputs[0].shape[:] = [3]
        codes = {}
        for name, bad in {
            "shape": request,
            "parameter": infer_request("a", normalise=True),
            "raw count": pb.ModelInferRequest(model_name="fake", raw_input_contents=[b"x"]),
        }.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await g.rpc("ModelInfer")(bad, timeout=30)
            codes[name] = (caught.value.code(), caught.value.details())
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await g.rpc("ModelReady")(pb.ModelReadyRequest(name="fake", version="9"))
        for name in ("fake/ready", "fake/infer", "a/versions/1", ""):
            with pytest.raises(grpc.aio.AioRpcError) as routed:
                await g.rpc("ModelMetadata")(pb.ModelMetadataRequest(name=name))
            codes[f"name {name}"] = (routed.value.code(), routed.value.details())
        after = await g.infer("still fine")
    assert {k: c for k, (c, _) in codes.items()} == dict.fromkeys(
        codes, grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "3 elements; 2 were sent" in codes["shape"][1]
    assert "normalise" in codes["parameter"][1]
    assert "not a model's name" in codes["name fake/ready"][1]
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert embeddings(after) == [fake_embedding("still fine")]


async def test_keys_come_as_authorization_metadata_and_probes_stay_open() -> None:
    async with serve_grpc(FakeTextModel(), api_keys="k1") as g:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await g.infer("x")
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await g.rpc("ModelInfer")(
                infer_request("x"), metadata=(("authorization", "Bearer nope"),)
            )
        keyed = await g.rpc("ModelInfer")(
            infer_request("x"), metadata=(("authorization", "Bearer k1"),)
        )
        live = await g.rpc("ServerLive")(pb.ServerLiveRequest())
        serving = await g.health()
    assert refused.value.code() == wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "API key" in refused.value.details()
    assert embeddings(keyed) == [fake_embedding("x")]
    assert live.live
    assert serving == health_pb2.HealthCheckResponse.SERVING


async def test_a_full_queue_is_resource_exhausted_with_retry_info() -> None:
    model = FakeTextModel()
    async with serve_grpc(model, max_batch_size=1, max_queue_size=2) as g:
        model.predict_gate.clear()
        held = [asyncio.create_task(g.http.post("/predict", json={"text": f"t{i}"}))
                for i in range(3)]  # fmt: skip
        await wait_for_metric(g.http, "microbatch_admitted_items_total", 3)
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await g.infer("one too many")
        model.predict_gate.set()
        await asyncio.gather(*held)
    error = full.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = error.trailing_metadata()
    assert int(trailers["grpc-retry-pushback-ms"]) >= 1000
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.seconds >= 1
    assert "one too many" not in model.seen


async def test_a_grpc_deadline_is_the_items_deadline_and_it_is_never_computed() -> None:
    model = FakeTextModel()
    async with serve_grpc(model, max_batch_size=1, request_timeout_s=30) as g:
        model.predict_gate.clear()
        blocker = asyncio.create_task(g.http.post("/predict", json={"text": "blocker"}))
        await asyncio.to_thread(model.entered.wait, 30)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await g.infer("in a hurry", deadline_s=0.2)
        model.predict_gate.set()  # the item's deadline has passed: it can only expire now
        await blocker
        async with asyncio.timeout(30):
            while True:
                metrics = (await g.http.get("/metrics")).text
                ended = sum(metric(metrics, f'microbatch_items_total{{outcome="{o}"}}')
                            for o in ("expired", "cancelled"))  # fmt: skip
                if ended >= 1:
                    break
                await asyncio.sleep(0.01)  # the engine's state, polled
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "in a hurry" not in model.seen


async def test_a_cancelled_calls_items_are_never_computed() -> None:
    model = FakeTextModel()
    async with serve_grpc(model, max_batch_size=1) as g:
        model.predict_gate.clear()
        blocker = asyncio.create_task(g.http.post("/predict", json={"text": "blocker"}))
        await asyncio.to_thread(model.entered.wait, 30)
        call = g.rpc("ModelInfer")(infer_request("gone-1", "gone-2"), timeout=30)
        stays = asyncio.create_task(g.infer("stays"))
        await wait_for_metric(g.http, "microbatch_admitted_items_total", 4)
        call.cancel()
        await wait_for_metric(g.http, "microbatch_client_disconnects_total", 1)
        model.predict_gate.set()
        await blocker
        stayed = await stays
        metrics = (await g.http.get("/metrics")).text
    assert call.cancelled()
    assert embeddings(stayed) == [fake_embedding("stays")]
    assert sorted(model.seen) == ["blocker", "stays"], "the cancelled call's texts never ran"
    assert metric(metrics, 'microbatch_items_total{outcome="cancelled"}') == 2


async def test_draining_answers_what_was_admitted_and_refuses_new_calls_unavailable() -> None:
    model = FakeTextModel()
    async with serve_grpc(model, max_batch_size=1) as g:
        model.predict_gate.clear()
        admitted = asyncio.create_task(g.infer("admitted"))
        await wait_for_metric(g.http, "microbatch_admitted_items_total", 1)
        runtime = g.app.state.runtime
        runtime.stop_admitting()  # what SIGTERM does first (server.draining)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await g.infer("too late")
        not_serving = await g.health()
        ready = await g.rpc("ServerReady")(pb.ServerReadyRequest())
        model.predict_gate.set()
        answered = await admitted
    assert embeddings(answered) == [fake_embedding("admitted")]
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not_serving == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not ready.ready
    assert "too late" not in model.seen


async def test_the_health_service_follows_warm_up() -> None:
    model = FakeTextModel()
    model.warm_gate.clear()
    grpc_port = free_port()
    app = create_app(Settings(grpc_port=grpc_port), model=model)  # type: ignore[arg-type]
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    server = _InLoopServer(config)
    task = asyncio.create_task(server.serve())
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
            httpx.AsyncClient() as unused,
        ):
            g = Grpc(unused, channel, app)
            await channel.channel_ready()
            warming = (await g.health(), await g.health("live"))
            model.warm_gate.set()
            async with asyncio.timeout(30):
                while await g.health() != health_pb2.HealthCheckResponse.SERVING:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # the server warms up: poll its state
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await g.health("no-such-service")
    finally:
        server.should_exit = True
        await task
    assert warming == (health_pb2.HealthCheckResponse.NOT_SERVING,
                       health_pb2.HealthCheckResponse.SERVING)  # fmt: skip
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_grpc_port_in_use_fails_start_up_naming_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "server.cli", "serve", "--port", str(free_port()),
             "--grpc-port", str(port), "--model", "no/such/model/dir"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2
    assert f"--grpc-port {port}" in done.stderr


async def test_the_checked_in_descriptor_set_is_made_from_the_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    here = resources.files("server.kserve")
    out = tmp_path / "made.pb"
    args = [
        "protoc",
        f"-I{here}",
        f"--descriptor_set_out={out}",
        str(here / "grpc_predict_v2.proto"),
    ]
    assert protoc.main(args) == 0
    assert out.read_bytes() == (here / "grpc_predict_v2.pb").read_bytes()


MESSAGES = st.builds(
    lambda name, dtype, shape, raw, params: (name, dtype, shape, raw, params),
    st.sampled_from(["text", "query", "text_pair", "", "x" * 300]),
    st.sampled_from(["BYTES", "FP32", "INT64", "", "bytes"]),
    st.lists(st.integers(min_value=-3, max_value=5), max_size=3),
    st.lists(st.binary(max_size=40), max_size=3),
    st.dictionaries(
        st.sampled_from(["normalize", "truncate", "dimensions", "top_n", "prompt", "bogus"]),
        st.one_of(st.booleans(), st.integers(-5, 10**12), st.text(max_size=5)),
        max_size=3,
    ),
)


NAMES = st.sampled_from(["fake", "fake/ready", "a/versions/2", "x/infer", "ünï", ""])
METADATA = st.lists(
    st.tuples(
        st.sampled_from(["x-priority", "x-request-timeout-ms", "x-route-key", "authorization"]),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
    ),
    max_size=2,
)


async def test_fuzzed_requests_get_a_status_never_an_internal_error() -> None:
    async with serve_grpc(FakeTextModel()) as g:
        seen: list[grpc.StatusCode] = []

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(MESSAGES, min_size=0, max_size=3), NAMES, METADATA)
        def build(tensors: list[Any], name: str, metadata: list[tuple[str, str]]) -> None:
            request = pb.ModelInferRequest(model_name=name)
            for name, dtype, shape, raw, params in tensors:
                request.inputs.add(name=name, datatype=dtype, shape=[abs(s) for s in shape])
                request.raw_input_contents.append(b"".join(raw))
                for key, value in params.items():
                    kind = {bool: "bool_param", int: "int64_param", str: "string_param"}
                    setattr(request.parameters[key], kind[type(value)], value)
            requests.append((request, metadata))

        requests: list[Any] = []
        build()
        for request, metadata in requests:
            try:
                await g.rpc("ModelInfer")(request, metadata=metadata, timeout=30)
                seen.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                seen.append(exc.code())
        after = await g.infer("alive")
    assert grpc.StatusCode.INTERNAL not in seen
    assert grpc.StatusCode.UNKNOWN not in seen
    assert set(seen) <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                         grpc.StatusCode.NOT_FOUND}  # fmt: skip
    assert embeddings(after) == [fake_embedding("alive")]


async def test_grpc_null_in_the_environment_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROBATCH_GRPC_PORT", "null")
    monkeypatch.setenv("MICROBATCH_API_KEYS", "null")
    found = Settings()
    assert found.grpc_port is None
    assert found.api_key_list() == frozenset({"null"}), "null means no port, not no keys"


class Metadata:
    """What `Bridge` reads of a call's context."""

    def __init__(self, *pairs: tuple[str, str]) -> None:
        self.pairs = pairs

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.pairs

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"


@pytest.mark.parametrize("value", ["5 €", "a\x01b", "tab\there"])
async def test_metadata_that_is_not_printable_ascii_is_a_bad_call(value: str) -> None:
    """gRPC's core passes such values through (the Python client refuses to send them);
    an HTTP header is Latin-1, so the call cannot become a request."""
    bridge = Bridge(app=None, state={}, settings=Settings())  # type: ignore[arg-type]
    with pytest.raises(BadCall, match="printable ASCII"):
        bridge._scope(Metadata(("x-note", value)), "GET", "/v2", b"", {})  # type: ignore[arg-type]
    scope = bridge._scope(Metadata(("x-note", "fine")), "GET", "/v2", b"", {})  # type: ignore[arg-type]
    assert (b"x-note", b"fine") in scope["headers"]
    assert scope["client"] == ("127.0.0.1", 5000)
