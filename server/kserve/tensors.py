"""Tensors of the Open Inference Protocol (KServe v2) over HTTP: an inference request's
JSON, with or without Triton's binary tensor extension, read into typed inputs; outputs
written back as JSON `data` or as raw little-endian bytes after the JSON header.

The binary form: the body is a JSON header of `Inference-Header-Content-Length` bytes,
then each binary tensor's bytes in the order the header lists them, each tensor's
`parameters.binary_data_size` long. A BYTES tensor's elements are each a 4-byte
little-endian length and then that many bytes; numbers are packed row-major.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

Parameter = StrictBool | StrictInt | StrictFloat | StrictStr
HEADER_LENGTH = "inference-header-content-length"
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data_output"
"""A request's parameter: every output in binary form (tritonclient sets it when no
output is named)."""
DTYPES = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4"}


class _Tensor(BaseModel):
    name: StrictStr
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    datatype: StrictStr
    parameters: dict[str, Parameter] = {}
    data: Any = None


class _Requested(BaseModel):
    name: StrictStr
    parameters: dict[str, Parameter] = {}


class _Request(BaseModel):
    id: StrictStr | None = None
    parameters: dict[str, Parameter] = {}
    inputs: list[_Tensor] = Field(min_length=1)
    outputs: list[_Requested] | None = None


@dataclass(slots=True)
class Input:
    name: str
    datatype: str
    shape: list[int]
    elements: list[bytes] | list[Any]
    """A BYTES tensor's elements, row-major; another type's numbers."""


@dataclass(slots=True)
class InferRequest:
    id: str | None
    parameters: dict[str, bool | int | float | str]
    inputs: dict[str, Input]
    outputs: dict[str, bool | None] | None
    """The outputs asked for, each with whether it is wanted binary (None: as the
    request's `binary_data_output` says); None: every output."""
    binary: bool
    """`binary_data_output`: outputs not named otherwise come binary."""


@dataclass(slots=True)
class Output:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[str] = field(repr=False)


def invalid(where: tuple[str | int, ...], msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *where), "msg": msg, "type": "value_error"}])


def header_length(value: str | None, body_size: int) -> int | None:
    """`Inference-Header-Content-Length`, checked against the body."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) > body_size:
        raise RequestValidationError([{
            "loc": ("header", "Inference-Header-Content-Length"),
            "msg": f"must be a number of bytes, at most the body's {body_size}",
            "type": "value_error",
        }])  # fmt: skip
    return int(value)


def read_request(body: bytes, json_size: int | None, max_elements: int) -> InferRequest:
    """The request's inputs, each BYTES element as bytes; RequestValidationError (422,
    naming the input) for a shape and a number of elements that disagree, a tensor of
    more than `max_elements` (checked before it is read), binary data of the wrong size,
    or a body that is not the protocol's JSON."""
    header, binary = (body, b"") if json_size is None else (body[:json_size], body[json_size:])
    try:
        parsed = _Request.model_validate_json(header)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in errors]
        ) from None
    inputs: dict[str, Input] = {}
    offset = 0
    for i, tensor in enumerate(parsed.inputs):
        if tensor.name in inputs:
            raise invalid(("inputs", i, "name"), f"input {tensor.name!r} is given twice")
        count = math.prod(tensor.shape)
        if count > max_elements:
            raise invalid(("inputs", i), f"at most {max_elements} elements a tensor "
                          "(--max-client-batch)")  # fmt: skip
        size = tensor.parameters.get(BINARY_SIZE)
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise invalid(("inputs", i, "parameters", BINARY_SIZE), "must be a size in bytes")
            if offset + size > len(binary):
                raise invalid(("inputs", i), "the body holds less binary data than declared")
            raw = binary[offset : offset + size]
            offset += size
            elements = _unpacked(raw, tensor, i, count)
        else:
            elements = _flat(tensor, i)
        if len(elements) != count:
            raise invalid(("inputs", i), f"shape {tensor.shape} holds {count} elements; "
                          f"{len(elements)} were sent")  # fmt: skip
        inputs[tensor.name] = Input(tensor.name, tensor.datatype, tensor.shape, elements)
    if offset != len(binary):
        raise invalid(("inputs",), "the body holds more binary data than the inputs declare")
    outputs = None
    if parsed.outputs is not None:
        outputs = {}
        for o in parsed.outputs:
            wanted = o.parameters.get("binary_data")
            outputs[o.name] = None if wanted is None else bool(wanted)
    binary_out = parsed.parameters.pop(BINARY_OUTPUT, False)
    if not isinstance(binary_out, bool):
        raise invalid(("parameters", BINARY_OUTPUT), "must be true or false")
    for o in parsed.outputs or ():
        if not isinstance(o.parameters.get("binary_data", False), bool):
            raise invalid(("outputs", o.name, "parameters", "binary_data"), "must be true or false")
    return InferRequest(parsed.id, dict(parsed.parameters), inputs, outputs, binary_out)


def _flat(tensor: _Tensor, index: int) -> list[Any]:
    """A JSON tensor's `data`, flattened row-major; BYTES elements as UTF-8 bytes."""
    if tensor.data is None:
        raise invalid(("inputs", index, "data"), "give data, or binary_data_size and the bytes")
    data = tensor.data if isinstance(tensor.data, list) else [tensor.data]
    flat: list[Any] = []
    if data and isinstance(data[0], list):  # nested: it must be the declared shape
        _nested(data, tensor.shape, flat, ("inputs", index, "data"))
    else:
        flat = data
    if tensor.datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise invalid(("inputs", index, "data"), "a BYTES tensor's data are strings")
        return [v.encode() for v in flat]
    return flat


def _nested(data: Any, shape: list[int], flat: list[Any], where: tuple[str | int, ...]) -> None:
    """`data` flattened row-major into `flat`, if its nesting is `shape`."""
    if not shape:
        if isinstance(data, list):
            raise invalid(where, "the data are nested deeper than the shape")
        flat.append(data)
        return
    if not isinstance(data, list) or len(data) != shape[0]:
        raise invalid(where, f"the data's nesting is not the shape {shape}")
    for row in data:
        _nested(row, shape[1:], flat, where)


def _unpacked(raw: bytes, tensor: _Tensor, index: int, count: int) -> list[Any]:
    if tensor.datatype != "BYTES":
        dtype = DTYPES.get(tensor.datatype)
        if dtype is None or len(raw) % np.dtype(dtype).itemsize:
            raise invalid(("inputs", index, "datatype"), f"cannot read {tensor.datatype} "
                          f"from {len(raw)} bytes")  # fmt: skip
        return list(np.frombuffer(raw, dtype=dtype).tolist())
    return unpack_bytes(raw, ("inputs", index), count)


def unpack_bytes(
    raw: bytes | memoryview, where: tuple[str | int, ...], count: int | None = None
) -> list[bytes]:
    """A BYTES tensor's serialized elements (each a 4-byte little-endian length, then
    the bytes); more than `count` of them is an error, found without reading them all."""
    elements: list[bytes] = []
    view = memoryview(raw)
    at = 0
    while at < len(view):
        if count is not None and len(elements) == count:
            raise invalid(where, f"the binary data hold more than the shape's {count} elements")
        if at + 4 > len(view):
            raise invalid(where, "a BYTES element's 4-byte length is cut short")
        size = int.from_bytes(view[at : at + 4], "little")
        if at + 4 + size > len(view):
            raise invalid(where, "a BYTES element is longer than the bytes that follow it")
        elements.append(bytes(view[at + 4 : at + 4 + size]))
        at += 4 + size
    return elements


def pack_bytes(values: Sequence[bytes]) -> bytes:
    """BYTES elements serialized as the binary extension and gRPC's raw contents send
    them."""
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def raw(output: Output) -> bytes:
    """An output's bytes, as the binary extension and gRPC's `raw_output_contents`
    carry them."""
    if output.datatype == "BYTES":
        return pack_bytes([str(v).encode() for v in output.values])
    array = np.ascontiguousarray(output.values, dtype=DTYPES[output.datatype])
    return array.tobytes()


def write_response(
    head: Mapping[str, Any], outputs: Sequence[Output], binary: Mapping[str, bool]
) -> tuple[bytes, int | None]:
    """The reply's body, and the length of its JSON header where a tensor follows in
    binary (for `Inference-Header-Content-Length`; None: all JSON)."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name, "datatype": output.datatype, "shape": output.shape,
        }  # fmt: skip
        if binary[output.name]:
            blob = raw(output)
            entry["parameters"] = {BINARY_SIZE: len(blob)}
            blobs.append(blob)
        elif isinstance(output.values, np.ndarray):
            entry["data"] = output.values.reshape(-1).tolist()
        else:
            entry["data"] = list(output.values)
        described.append(entry)
    header = orjson.dumps({**head, "outputs": described})
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
