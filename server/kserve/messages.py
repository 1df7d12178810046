"""The Open Inference Protocol's gRPC messages (`grpc_predict_v2.proto`, package
`inference`), as protobuf message classes in a descriptor pool of their own.

Not protoc's generated `_pb2` modules: those register `inference.*` in protobuf's
default pool, where Triton's client (`tritonclient.grpc`) registers the same names from
its own proto, so a process that imported both would fail with "duplicate symbol". A
private pool holds ours apart; on the wire the two are the same messages. The service
itself is registered by its path (`server.kserve.grpc_server.InferenceService.handler`),
which needs no descriptor. No generated code also means no protoc version that the
installed protobuf and grpcio must match.

`grpc_predict_v2.pb` is the descriptor set of `grpc_predict_v2.proto`, checked in (no
compiler at install time), made by

    python -m grpc_tools.protoc -I server/kserve \\
        --descriptor_set_out=server/kserve/grpc_predict_v2.pb server/kserve/grpc_predict_v2.proto

and `tests/server/test_kserve_grpc.py` makes it again and compares, where grpcio-tools
is installed.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DESCRIPTOR_SET = "grpc_predict_v2.pb"
PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"


def _pool() -> descriptor_pool.DescriptorPool:
    raw = (resources.files("server.kserve") / DESCRIPTOR_SET).read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(raw)
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


POOL = _pool()


def message(name: str) -> Any:
    """The message class `inference.NAME` (a nested one as `Outer.Inner`)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ServerLiveRequest = message("ServerLiveRequest")
ServerLiveResponse = message("ServerLiveResponse")
ServerReadyRequest = message("ServerReadyRequest")
ServerReadyResponse = message("ServerReadyResponse")
ModelReadyRequest = message("ModelReadyRequest")
ModelReadyResponse = message("ModelReadyResponse")
ServerMetadataRequest = message("ServerMetadataRequest")
ServerMetadataResponse = message("ServerMetadataResponse")
ModelMetadataRequest = message("ModelMetadataRequest")
ModelMetadataResponse = message("ModelMetadataResponse")
ModelInferRequest = message("ModelInferRequest")
ModelInferResponse = message("ModelInferResponse")
