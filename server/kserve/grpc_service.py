"""How a call of the Open Inference Protocol over gRPC (`inference.GRPCInferenceService`,
served by `server.kserve.grpc_server`) is answered: by the app itself. The call becomes
the HTTP request that means the same (`ModelInfer` a binary `POST
/v2/models/NAME/infer`, the others their GETs), sent through the whole ASGI app,
middleware included. Keys (the `authorization`
metadata), rate limits, tenants, the early 429, deadlines, lanes, the result cache, the
prediction log, metrics and errors are then those of HTTP, from the same code. What
gRPC adds:

- the call's deadline is the request's (`X-Request-Timeout-Ms`), at most
  `--max-request-timeout-s`;
- a call the client cancels is the HTTP client's disconnect: its items leave the queue
  without being computed;
- an HTTP status becomes its gRPC code (`CODES`), with the reason as the message; a 429
  or 503 carries `google.rpc.RetryInfo` and gRPC's `grpc-retry-pushback-ms`;
- the reply's timing headers come back as trailing metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import grpc
import orjson
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from starlette.types import ASGIApp, Message

from server.kserve import messages as pb
from server.kserve.tensors import BINARY_OUTPUT, BINARY_SIZE, HEADER_LENGTH, pack_bytes
from server.settings import Settings

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""An HTTP status's gRPC code; any other is INTERNAL."""
TRAILERS = ("x-request-id", "x-model-version", "x-queue-time-ms", "x-inference-time-ms",
            "x-batch-size", "x-cache")  # fmt: skip
CONTENTS = {"BOOL": "bool_contents", "INT32": "int_contents", "INT64": "int64_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents"}  # fmt: skip


class BadCall(ValueError):
    """A call that cannot become an HTTP request (INVALID_ARGUMENT): metadata that is not
    printable ASCII, or a model name that would read as another route."""


@dataclass(slots=True)
class Reply:
    """What the app answered: status, headers, body."""

    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)

    def json(self) -> Any:
        return orjson.loads(bytes(self.body))


class Bridge:
    """Sends a gRPC call through the ASGI app as the HTTP request that means the same."""

    def __init__(self, app: ASGIApp, state: Mapping[str, Any], settings: Settings) -> None:
        self.app = app
        self.state = state
        self.settings = settings

    async def request(
        self, context: grpc.aio.ServicerContext, method: str, path: str, body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:  # fmt: skip
        scope = self._scope(context, method, path, body, headers or {})
        reply = Reply()
        sent = False
        gone = asyncio.Event()

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                reply.status = message["status"]
                for name, value in message.get("headers", ()):
                    reply.headers[name.decode("latin-1").lower()] = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                reply.body += message.get("body", b"")

        task = asyncio.ensure_future(self.app(scope, receive, send))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The client cancelled, or its deadline passed: to the app, a disconnect. Its
            # items leave the queue uncomputed; the request ends as a 499.
            gone.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
            raise
        return reply

    def _scope(
        self, context: grpc.aio.ServicerContext, method: str, path: str, body: bytes,
        extra: Mapping[str, str],
    ) -> dict[str, Any]:  # fmt: skip
        headers: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if isinstance(value, str) and not key.endswith("-bin") and not key.startswith(":"):
                if not (value.isascii() and value.isprintable()):
                    raise BadCall(f"metadata {key!r}: a value is printable ASCII (or a -bin key)")
                headers[key.lower()] = value
        headers.update(extra)
        headers["content-length"] = str(len(body))
        timeout_s = context.time_remaining()
        if timeout_s is not None:
            cap = self.settings.max_request_timeout_s
            asked = headers.get("x-request-timeout-ms")
            ms = min(max(timeout_s, 0.001), cap) * 1000
            if asked is not None:
                with contextlib.suppress(ValueError):
                    if math.isfinite(float(asked)) and float(asked) > 0:
                        ms = min(ms, float(asked))
            headers["x-request-timeout-ms"] = f"{ms:.3f}"
        return {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "2",
            "method": method, "scheme": "http", "path": path, "root_path": "",
            "raw_path": quote(path).encode(), "query_string": b"",
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
            "client": _peer(context.peer()), "server": None,
            "state": dict(self.state), "extensions": {},
        }  # fmt: skip


def _peer(peer: str | None) -> tuple[str, int] | None:
    """`ipv4:127.0.0.1:5000` or `ipv6:[::1]:5000` as ASGI's (host, port)."""
    if not peer or ":" not in peer:
        return None
    _, _, address = peer.partition(":")
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


ROUTE_WORDS = ("/ready", "/infer", "/versions/")


def model_path(name: str, version: str, tail: str = "") -> str:
    """The HTTP path of a model (of a version, where one is named), and `tail`. Raises
    BadCall for a name or version the path would read otherwise."""
    if not name or any(word in f"{name}/" for word in ROUTE_WORDS) or "/" in version:
        raise BadCall(f"model {name!r} version {version!r}: not a model's name")
    return f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + tail


async def fail(context: grpc.aio.ServicerContext, reply: Reply) -> None:
    """Abort the call with the gRPC code of the app's error reply."""
    code = CODES.get(reply.status, grpc.StatusCode.INTERNAL)
    try:
        body = reply.json()
        message = str(body.get("error") or body.get("detail") or body)
    except (orjson.JSONDecodeError, AttributeError):
        message = bytes(reply.body).decode("utf-8", "replace") or f"HTTP {reply.status}"
    retry = reply.headers.get("retry-after")
    if retry is not None and retry.isdigit():
        seconds = int(retry)
        info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds))
        detail = status_pb2.Status(code=code.value[0], message=message)
        detail.details.add().Pack(info)
        status = rpc_status.to_status(detail)
        retrying = (*status.trailing_metadata, ("grpc-retry-pushback-ms", str(seconds * 1000)),
                    ("retry-after", retry))  # fmt: skip
        context.set_trailing_metadata(trailers(reply) + retrying)
        await context.abort(status.code, status.details)
    context.set_trailing_metadata(trailers(reply))
    await context.abort(code, message)


def trailers(reply: Reply) -> tuple[tuple[str, str], ...]:
    return tuple((k, reply.headers[k]) for k in TRAILERS if k in reply.headers)


def _parameter(value: Any) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def infer_body(request: Any) -> tuple[bytes, int]:
    """A ModelInferRequest as the binary HTTP request's body, and its JSON header's
    length."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadCall(f"raw_input_contents holds {len(raw)} tensors for "
                         f"{len(request.inputs)} inputs")  # fmt: skip
    inputs, blobs = [], []
    for i, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.shape)}  # fmt: skip
        params = {k: _parameter(v) for k, v in tensor.parameters.items()}
        if raw or tensor.datatype == "BYTES":
            blob = raw[i] if raw else pack_bytes(list(tensor.contents.bytes_contents))
            params[BINARY_SIZE] = len(blob)
            blobs.append(blob)
        else:
            entry["data"] = list(getattr(tensor.contents, CONTENTS.get(tensor.datatype, ""), ()))
        entry["parameters"] = params
        inputs.append(entry)
    params = {k: _parameter(v) for k, v in request.parameters.items()}
    header: dict[str, Any] = {"inputs": inputs, "parameters": params}
    if request.id:
        header["id"] = request.id
    if request.outputs:
        header["outputs"] = [{"name": o.name, "parameters": {"binary_data": True}}
                             for o in request.outputs]  # fmt: skip
    else:
        params[BINARY_OUTPUT] = True
    head = orjson.dumps(header)
    return head + b"".join(blobs), len(head)


def infer_response(reply: Reply) -> Any:
    """The app's binary infer reply as a ModelInferResponse with raw contents."""
    size = int(reply.headers.get(HEADER_LENGTH, len(reply.body)))
    body = bytes(reply.body)
    header = orjson.loads(body[:size])
    response = pb.ModelInferResponse(
        model_name=header.get("model_name", ""), model_version=header.get("model_version", ""),
        id=header.get("id", ""),
    )  # fmt: skip
    at = size
    for output in header["outputs"]:
        response.outputs.add(name=output["name"], datatype=output["datatype"],
                             shape=output["shape"])  # fmt: skip
        length = output["parameters"][BINARY_SIZE]
        response.raw_output_contents.append(body[at : at + length])
        at += length
    return response
