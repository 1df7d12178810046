"""What a served model looks like as an Open Inference Protocol model: its input and
output tensors by task, and how a request's tensors and parameters become texts and
options, and results become tensors.

- embed: `text` BYTES [-1] -> `embedding` FP32 [-1, d];
- classify: `text` BYTES [-1] (and `text_pair` BYTES [-1]) -> `label` BYTES [-1],
  `score` FP32 [-1], `scores` FP32 [-1, labels];
- rerank: `text` BYTES [-1], and `query` BYTES [1] or `text_pair` BYTES [-1] ->
  `score` FP32 [-1], `index` INT64 [-1].

Pairs are read as `/predict/batch` reads `texts` and `text_pairs`: (`text[i]`,
`text_pair[i]`); a `query` is scored against each `text` as `/rerank` scores its texts:
(`query`, `text[i]`).

An image model takes `image` BYTES [-1] (each element an image file's bytes, or in JSON
its base64 or data URI): a classifier's outputs as for texts; a CLIP-like model's
`embedding`, and `text` in its own requests.

A text input may also be shaped [n, 1], as Triton's examples send strings. A rerank's
`index` names each score's input; in input order, or with `top_n` the best first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import ConfigDict, Field, StrictInt, ValidationError

from batcher import Result
from batcher.models import Classification, Encoder, Output
from server.kserve.tensors import InferRequest, Input, invalid
from server.kserve.tensors import Output as Tensor
from server.routes.parsing import best_first
from server.schemas import OutputOptions

TEXT, PAIR, QUERY, IMAGE = "text", "text_pair", "query", "image"
BASE64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_= \r\n\t")


@dataclass(frozen=True, slots=True)
class Spec:
    """A tensor's metadata: `-1` for a dimension of any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def inputs_of(model: Encoder) -> list[Spec]:
    texts = [Spec(TEXT, "BYTES", (-1,))]
    if hasattr(model, "encode_images"):  # an image model; CLIP-like ones take texts too
        images = [Spec(IMAGE, "BYTES", (-1,))]
        return images if model.task == "classify" else [*images, *texts]
    if model.task == "classify":
        return [*texts, Spec(PAIR, "BYTES", (-1,))]
    if model.task == "rerank":
        return [*texts, Spec(QUERY, "BYTES", (1,)), Spec(PAIR, "BYTES", (-1,))]
    return texts


def outputs_of(model: Encoder, dimension: object = None) -> list[Spec]:
    """The model's outputs; an embedding's width where it is known (an int), else -1."""
    if model.task == "embed":
        width = dimension if isinstance(dimension, int) else -1
        return [Spec("embedding", "FP32", (-1, width))]
    if model.task == "classify":
        labels = len(model.labels)
        return [Spec("label", "BYTES", (-1,)), Spec("score", "FP32", (-1,)),
                Spec("scores", "FP32", (-1, labels))]  # fmt: skip
    if model.task == "rerank":
        return [Spec("score", "FP32", (-1,)), Spec("index", "INT64", (-1,))]
    return []


class Parameters(OutputOptions):
    """A request's parameters: the options of `/predict` that apply to tensors, a
    rerank's `top_n` and `truncation_direction`, and Triton's `timeout` (microseconds)."""

    model_config = ConfigDict(extra="forbid")

    top_n: StrictInt | None = Field(None, ge=1, description="rerank: the best n only.")
    truncation_direction: Literal["right", "left"] = Field(
        "right", description="Which end of an input over the token limit is cut."
    )
    timeout: StrictInt | None = Field(
        None, gt=0, description="Triton's: this request's deadline in microseconds."
    )


IGNORED = frozenset({"priority", "sequence_id", "sequence_start", "sequence_end"})
"""Triton's parameters that mean nothing here (a lane is `X-Priority`; the models keep
no state between requests)."""
NOT_FOR_TENSORS = frozenset({"encoding_format", "embedding_type", "token_embeddings",
                             "all_scores", "top_k"})  # fmt: skip


def parameters(request: InferRequest) -> Parameters:
    asked = {k: v for k, v in request.parameters.items() if k not in IGNORED}
    for name in asked.keys() & NOT_FOR_TENSORS:
        raise invalid(("parameters", name), "not an option of the Open Inference Protocol's "
                      "routes: outputs are tensors")  # fmt: skip
    try:
        return Parameters.model_validate(asked)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError(
            [{**e, "loc": ("body", "parameters", *e["loc"])} for e in errors]
        ) from None


@dataclass(frozen=True, slots=True)
class Texts:
    """A request's inputs as the model reads them."""

    texts: list[str]
    pairs: list[str] | None
    by_size: bool
    """Whether the call may go to the bulk lane by its number of inputs (not a rerank)."""


def texts_of(model: Encoder, request: InferRequest, max_texts: int, max_chars: int) -> Texts:
    """The texts of the request's inputs, checked against the model's signature and the
    server's limits (422 naming the input)."""
    known = {spec.name for spec in inputs_of(model)}
    for name in request.inputs:
        if name not in known:
            raise invalid(("inputs", name), f"this {model.task} model takes the inputs "
                          f"{', '.join(sorted(known))}")  # fmt: skip
    if TEXT not in request.inputs:
        raise invalid(("inputs",), f"give the input {TEXT!r} (BYTES)")
    texts = _strings(request.inputs[TEXT], max_texts, max_chars)
    query, pair = request.inputs.get(QUERY), request.inputs.get(PAIR)
    if query is not None and pair is not None:
        raise invalid(("inputs", QUERY), f"give {QUERY!r} or {PAIR!r}, not both")
    if query is not None:
        if len(query.elements) != 1:
            raise invalid(("inputs", QUERY), "one query: shape [1]")
        [one] = _strings(query, 1, max_chars)
        return Texts([one] * len(texts), texts, by_size=False)
    if model.task == "rerank" and pair is None:
        raise invalid(("inputs",), f"a rerank model scores pairs: give {QUERY!r} or {PAIR!r}")
    pairs = None if pair is None else _strings(pair, max_texts, max_chars)
    if pairs is not None and len(pairs) != len(texts):
        raise invalid(("inputs", PAIR), f"one pair per text: {len(texts)}, got {len(pairs)}")
    return Texts(texts, pairs, by_size=model.task != "rerank")


def images_of(model: Encoder, request: InferRequest, max_images: int) -> list[str | bytes] | None:
    """The images of an `image` input (None where the request sends texts): each element
    an image file's bytes (binary tensors), or its base64 or data URI (JSON, where bytes
    travel as text)."""
    if IMAGE not in request.inputs:
        return None
    known = {spec.name for spec in inputs_of(model)}
    others = sorted(set(request.inputs) - {IMAGE})
    if IMAGE not in known:
        raise invalid(("inputs", IMAGE), f"this {model.task} model takes the inputs "
                      f"{', '.join(sorted(known))}")  # fmt: skip
    if others:
        raise invalid(("inputs", others[0]), f"send {IMAGE!r} alone (images and texts go in "
                      "separate requests)")  # fmt: skip
    tensor = request.inputs[IMAGE]
    _check_bytes(tensor, max_images, "images")
    elements = cast("list[bytes]", tensor.elements)
    # latin-1 never fails: a non-ASCII byte then fails as base64 does, as a bad image.
    return [e.decode("latin-1") if (e and set(e) <= BASE64) or e[:5].lower() == b"data:"
            else e for e in elements]  # fmt: skip


def _check_bytes(tensor: Input, most: int, what: str) -> None:
    if tensor.datatype != "BYTES":
        raise invalid(("inputs", tensor.name, "datatype"), f"{what} come as BYTES")
    shape = tensor.shape
    if not shape or len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise invalid(("inputs", tensor.name, "shape"), f"{what} are shaped [n] or [n, 1], "
                      f"not {shape}")  # fmt: skip
    if not tensor.elements:
        raise invalid(("inputs", tensor.name), f"give at least one of the {what}")
    if len(tensor.elements) > most:
        raise invalid(("inputs", tensor.name), f"at most {most} {what} a request "
                      "(--max-client-batch)")  # fmt: skip


def _strings(tensor: Input, max_texts: int, max_chars: int) -> list[str]:
    _check_bytes(tensor, max_texts, "texts")
    texts = []
    for i, raw in enumerate(cast("list[bytes]", tensor.elements)):
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise invalid(("inputs", tensor.name, i), "a text is UTF-8") from None
        if len(text) > max_chars:
            raise invalid(("inputs", tensor.name, i), f"at most {max_chars} characters "
                          "(--max-text-chars)")  # fmt: skip
        texts.append(text)
    return texts


def wanted(model: Encoder, request: InferRequest) -> dict[str, bool]:
    """The outputs to send, each with whether it goes binary: those the request names
    (each as it asks, else as its `binary_data_output`), or all of the model's. An output
    the model has not, or an empty list, is 400, before anything is computed."""
    names = [spec.name for spec in outputs_of(model)]
    if request.outputs is None:
        return dict.fromkeys(names, request.binary)
    if not request.outputs:
        raise invalid(("outputs",), f"name at least one output: {', '.join(names)}")
    for name in request.outputs:
        if name not in names:
            raise invalid(("outputs",), f"no output {name!r}; this model's: {', '.join(names)}")
    return {
        name: request.binary if binary is None else binary
        for name, binary in request.outputs.items()
    }


def outputs_for(
    model: Encoder, results: Sequence[Result[Output]], asked: Parameters
) -> list[Tensor]:
    """Every output of the model's task, from the results in input order."""
    values = [r.value for r in results]
    n = len(values)
    if model.task == "embed":
        array = np.asarray(values, dtype=np.float32).reshape(n, -1)
        return [Tensor("embedding", "FP32", list(array.shape), array)]
    found = cast("list[Classification]", values)
    scores = np.asarray([c.score for c in found], dtype=np.float32)
    if model.task == "rerank":  # best first as /rerank orders them, by the unrounded scores
        order = best_first([c.score for c in found], asked.top_n) if asked.top_n else range(n)
        index = np.asarray(list(order), dtype=np.int64)
        return [Tensor("score", "FP32", [len(index)], scores[index]),
                Tensor("index", "INT64", [len(index)], index)]  # fmt: skip
    every = np.asarray([c.scores for c in found], dtype=np.float32).reshape(n, -1)
    return [
        Tensor("label", "BYTES", [n], [c.label for c in found]),
        Tensor("score", "FP32", [n], scores),
        Tensor("scores", "FP32", list(every.shape), every),
    ]
