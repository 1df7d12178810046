"""Embeddings sent as another type than float: int8, uint8, binary, ubinary
(`batcher.models.quantize`), as JSON integers or as base64 of their bytes. The engine
returns (and the cache keeps) float vectors; they are quantized here, all of a request's
at once."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from batcher.models import EmbeddingType, Encoded, Encoder, InvalidOption, Options, quantize_as
from server.routes.parsing import ModelQuery, RuntimeDep, invalid

router = APIRouter(tags=["microbatch"])


def check_embedding_type(model: Encoder, kind: EmbeddingType, field: str) -> None:
    """422 unless `model` can send its embeddings as `kind`."""
    if kind == "float":
        return
    if model.task != "embed":
        raise invalid(field, f"{field} applies to embedding models; this is a {model.task} model")
    if kind in ("int8", "uint8") and model.calibration is None:
        raise invalid(field, f"{kind} needs calibration ranges, and this model has none")


def as_type(
    model: Encoder, items: Sequence[Encoded], rows: Sequence[list[float]], kind: EmbeddingType
) -> np.ndarray[Any, Any]:
    """The float vectors `rows` of `items` (one request's: the same options) as `kind`:
    int8 and uint8 by the model's fixed ranges for those options."""
    vectors = np.asarray(rows, dtype=np.float32)
    ranges = None
    if kind in ("int8", "uint8"):
        assert model.calibration is not None, "checked by check_embedding_type; this is a bug"
        ranges = model.calibration.ranges(items[0].dimensions, items[0].normalize)
    return quantize_as(vectors, kind, ranges)


def as_base64(array: np.ndarray[Any, Any]) -> list[str]:
    """Each row's bytes, base64-encoded: little-endian float32 values, or the quantized
    bytes (one per value; a bit per value for binary and ubinary)."""
    if array.dtype.kind == "f":
        array = array.astype("<f4", copy=False)
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in array]


class CalibrationRanges(BaseModel):
    model: str
    source: str = Field(description="The calibration texts: built-in, or --calibration-file.")
    dimensions: int | None
    normalize: bool
    ranges: list[list[float]] = Field(
        description="[minimums, maximums], one per dimension: what int8 and uint8 outputs "
        "with these options are quantized by (sentence-transformers' `ranges`)."
    )


@router.get(
    "/model/calibration",
    response_model=CalibrationRanges,
    summary="The fixed ranges of int8 and uint8 embeddings, to dequantize them or quantize "
    "vectors of your own alike",
)
async def calibration(
    runtime: RuntimeDep,
    model: ModelQuery = None,
    dimensions: int | None = Query(None, ge=1, description="As the request's dimensions."),
    normalize: bool | None = Query(None, description="As the request's; default: the model's."),
) -> CalibrationRanges:
    encoder = runtime.model(model).encoder
    check_embedding_type(encoder, "int8", "model")
    assert encoder.calibration is not None
    try:
        [item] = encoder.encode_ids([[0]], Options(dimensions=dimensions, normalize=normalize))
    except InvalidOption as exc:
        raise invalid(exc.field, str(exc)) from None
    ranges = encoder.calibration.ranges(item.dimensions, item.normalize)
    return CalibrationRanges(
        model=encoder.name, source=encoder.calibration.source, dimensions=item.dimensions,
        normalize=item.normalize, ranges=ranges.tolist(),
    )  # fmt: skip
