"""`--grpc-port`: the gRPC server of one process, started and stopped with the app's
lifespan (`server.app`), and its RPCs (`InferenceService`, answered through the app by
`server.kserve.grpc_service.Bridge`) and health service (`Health`).

With `--workers N` every front-end runs one, all bound to the port with SO_REUSEPORT,
and the kernel spreads connections over them, as the supervisor's shared socket does for
HTTP. A single process binds it alone, so that a port in use is an error."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp

from server.kserve import messages as pb
from server.kserve.grpc_service import (
    BadCall,
    Bridge,
    fail,
    infer_body,
    infer_response,
    model_path,
    trailers,
)
from server.kserve.tensors import HEADER_LENGTH
from server.routes.probes import not_ready
from server.runtime import Runtime
from server.settings import Settings

logger = logging.getLogger("microbatch.server")

LIVE_SERVICE = "live"
READY_SERVICES = ("", pb.SERVICE)
"""Health service names that answer as `/ready`; `live` answers as `/health`."""
METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
           "ModelInfer")  # fmt: skip
"""The RPCs served; the proto's model repository RPCs answer UNIMPLEMENTED."""
FOLLOW_S = 0.5
"""How often calls read the server's state for the health service's `Watch` streams."""
SETTLE_S = 2.0
"""How long stopping the gRPC server waits for calls still under way, once the drain has
answered every admitted item: their replies are on their way; what is left are health
`Watch` streams, which never end on their own."""


class InferenceService:
    """The RPCs of `inference.GRPCInferenceService`."""

    def __init__(self, bridge: Bridge, calls: Counter, health: Health) -> None:
        self.bridge = bridge
        self.calls = calls
        self.health = health
        self._children: dict[tuple[str, str], Any] = {}

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        reply = await self.bridge.request(context, "GET", "/v2/health/live")
        return pb.ServerLiveResponse(live=reply.status == 200)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        reply = await self.bridge.request(context, "GET", "/v2/health/ready")
        return pb.ServerReadyResponse(ready=reply.status == 200)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        path = model_path(request.name, request.version, "/ready")
        reply = await self.bridge.request(context, "GET", path)
        if reply.status not in (200, 503):
            await fail(context, reply)
        return pb.ModelReadyResponse(ready=reply.status == 200)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        reply = await self.bridge.request(context, "GET", "/v2")
        if reply.status != 200:
            await fail(context, reply)
        found = reply.json()
        return pb.ServerMetadataResponse(
            name=found["name"], version=found["version"], extensions=found["extensions"]
        )

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        path = model_path(request.name, request.version)
        reply = await self.bridge.request(context, "GET", path)
        if reply.status != 200:
            await fail(context, reply)
        found = reply.json()
        return pb.ModelMetadataResponse(
            name=found["name"], versions=found["versions"], platform=found["platform"],
            inputs=found["inputs"], outputs=found["outputs"],
        )  # fmt: skip

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        body, json_size = infer_body(request)
        path = model_path(request.model_name, request.model_version, "/infer")
        headers = {HEADER_LENGTH: str(json_size), "content-type": "application/octet-stream"}
        reply = await self.bridge.request(context, "POST", path, body, headers)
        if reply.status != 200:
            await fail(context, reply)
        context.set_trailing_metadata(trailers(reply))
        return infer_response(reply)

    def handler(self) -> grpc.GenericRpcHandler:
        """The service by its path, `/inference.GRPCInferenceService/METHOD`, each RPC
        counted by its gRPC code."""
        handlers = {}
        for name in METHODS:
            request_type = getattr(pb, f"{name}Request")
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                self._counted(name, getattr(self, name)),
                request_deserializer=request_type.FromString,
                response_serializer=lambda message: message.SerializeToString(),
            )
        return grpc.method_handlers_generic_handler(pb.SERVICE, handlers)

    def _counter(self, method: str, code: str) -> Any:
        """The counter's child for (method, code), looked up once (`labels` takes a lock
        and builds its key)."""
        child = self._children.get((method, code))
        if child is None:
            child = self._children[(method, code)] = self.calls.labels(method, code)
        return child

    def _counted(
        self, name: str, method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            code = "OK"
            try:
                await self.health.follow()  # Watch streams see changes as calls come
                try:
                    return await method(request, context)
                except BadCall as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except BaseException:
                found = context.code()
                code = found.name if isinstance(found, grpc.StatusCode) else "UNKNOWN"
                raise
            finally:
                self._counter(name, code).inc()

        return counted


class Health(health.aio.HealthServicer):  # type: ignore[misc]
    """gRPC's health service (`grpc.health.v1.Health`), as Kubernetes' gRPC probes call
    it: service "" (and `inference.GRPCInferenceService`) SERVING when `/ready` would
    say ready, `live` SERVING when `/health` would say ok. `Check` reads the server's
    state afresh; a `Watch` stream hears of a change when the next call reads it (a
    `Check`, or any call, at most every `FOLLOW_S`), and NOT_SERVING at shutdown."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime
        self._last: tuple[bool, bool] | None = None
        self._read_at = 0.0

    async def refresh(self) -> None:
        """The statuses, read from the server now; set (and sent to `Watch` streams) where
        they changed."""
        ready = not_ready(self.runtime) is None
        live = self.runtime.liveness_problem() is None
        if self._last == (ready, live):
            return
        self._last = (ready, live)
        serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                                health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
        for service in READY_SERVICES:
            await self.set(service, serving if ready else not_serving)
        await self.set(LIVE_SERVICE, serving if live else not_serving)

    async def follow(self) -> None:
        """`refresh`, at most once every `FOLLOW_S` (a call's cost stays a clock read)."""
        now = time.monotonic()
        if now - self._read_at >= FOLLOW_S:
            self._read_at = now
            await self.refresh()

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self.refresh()
        return await super().Check(request, context)


class GrpcServer:
    """One process's gRPC server: the inference service and the health service."""

    def __init__(
        self, app: ASGIApp, state: Mapping[str, Any], settings: Settings,
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.runtime: Runtime = state["runtime"]
        calls = Counter(
            "microbatch_grpc_calls",
            "gRPC calls by method and status code (their HTTP twins are in "
            "microbatch_request_duration_seconds too).",
            ["method", "code"],
            registry=registry,
        )
        for method in METHODS:  # each series exists from the start, at 0
            calls.labels(method, "OK")
        self.health = Health(self.runtime)
        self.service = InferenceService(Bridge(app, state, settings), calls, self.health)
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Listen on --host:--grpc-port; the port bound (for 0, the one picked). Raises
        OSError where the port cannot be bound."""
        settings = self.settings
        assert settings.grpc_port is not None
        options = [
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            ("grpc.max_receive_message_length", settings.image_body_bytes()),
            ("grpc.max_send_message_length", -1),
        ]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((self.service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        address = f"{host}:{settings.grpc_port}"
        try:
            port = int(server.add_insecure_port(address))
        except RuntimeError as exc:
            port = 0
            logger.debug("gRPC bind failed: %s", exc)
        if port == 0:
            raise OSError(f"--grpc-port {settings.grpc_port}: cannot listen on {address}")
        await server.start()
        self._server, self.port = server, port
        await self.health.refresh()
        logger.info("gRPC (Open Inference Protocol) on %s:%d", settings.host, port)
        return port

    async def stop(self) -> None:
        """Refuse new calls (UNAVAILABLE) and end those under way within `SETTLE_S`:
        call it once the drain has answered every admitted item."""
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(SETTLE_S)
