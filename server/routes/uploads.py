"""An image uploaded as a file: `POST /predict` with `multipart/form-data`, the file in
the field `image` (what `curl -F image=@cat.jpg` and a browser's form send), the other
fields of `PredictRequest` beside it as text (`model`, `normalize`, `dimensions`, ...;
`true`, `false` and numbers are read as JSON). Parsed by Starlette's form parser
(python-multipart), with one file and a few small fields allowed."""

from __future__ import annotations

import inspect
from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from server.routes.parsing import invalid
from server.schemas import PredictRequest

UPLOAD_FIELD = "image"
MAX_FIELDS = 16
PART_LIMIT = "max_part_size" in inspect.signature(Request.form).parameters
"""Whether Starlette bounds a text field's size (0.40 and later); older ones read each
field whole, within the request's body limit."""


def is_upload(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def parse_upload(request: Request) -> tuple[PredictRequest, bytes]:
    """The request's fields as a `PredictRequest`, and the uploaded image's bytes; 422
    for a form without the file, with another file, or with an invalid field."""
    limits: dict[str, int] = {"max_files": 1, "max_fields": MAX_FIELDS}
    if PART_LIMIT:
        limits["max_part_size"] = 65536
    try:
        form = await request.form(**limits)
    except Exception as exc:  # python-multipart's and Starlette's parse errors
        raise invalid(UPLOAD_FIELD, f"the multipart form cannot be read: {exc}") from None
    try:
        upload = form.get(UPLOAD_FIELD)
        if not isinstance(upload, UploadFile):
            raise invalid(UPLOAD_FIELD, "upload the image as a file in the form field 'image'")
        data = await upload.read()
        if not data:
            raise invalid(UPLOAD_FIELD, "the uploaded image is empty")
        fields: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name == UPLOAD_FIELD:
                continue
            if not isinstance(value, str):
                raise invalid(name, "only the field 'image' may be a file")
            fields[name] = _value(value)
    finally:
        await form.close()
    try:
        body = PredictRequest.model_validate({**fields, UPLOAD_FIELD: "(uploaded)"})
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in errors]
        ) from None
    return body, data


def _value(text: str) -> Any:
    """A form field's value: JSON's true, false, null and numbers as such, else the text."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    return value if isinstance(value, bool | int | float) or value is None else text


def upload_openapi(extra: dict[str, Any]) -> dict[str, Any]:
    """`/predict`'s OpenAPI with the upload beside its JSON body."""
    properties = {
        UPLOAD_FIELD: {"type": "string", "format": "binary", "description": "The image file."},
        "model": {"type": "string"},
        "all_scores": {"type": "boolean"},
        "raw_scores": {"type": "boolean"},
        "normalize": {"type": "boolean"},
        "dimensions": {"type": "integer", "minimum": 1},
    }
    form = {"schema": {"type": "object", "properties": properties, "required": [UPLOAD_FIELD]}}
    extra["requestBody"]["content"]["multipart/form-data"] = form
    return extra
