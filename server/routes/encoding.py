"""How a request's inputs become the answering version's token ids, and what is kept
of them on the request's call (`server.calls`)."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from batcher.models import Encoded, Encoder, InvalidOption, TruncationDirection
from server.calls import Call
from server.routes.parsing import invalid, loc
from server.runtime import Runtime
from server.schemas import OutputOptions
from server.served import Served


def check_tokens(
    items: Sequence[Encoded],
    model: Encoder,
    runtime: Runtime,
    field: str,
    truncate: bool | None,
    listed: bool | None = None,
) -> None:
    allowed = runtime.settings.truncate if truncate is None else truncate
    if allowed:
        return
    why = "(the server runs with --no-truncate)" if truncate is None else "(truncate: false)"
    errors = [
        {
            "loc": loc(field, i, listed),
            "msg": f"input is over the model's limit of {model.max_tokens} tokens {why}",
            "type": "too_many_tokens",
        }
        for i, item in enumerate(items)
        if item.truncated
    ]
    if errors:
        raise RequestValidationError(errors)


async def encode(
    request: Request,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    body: OutputOptions,
    truncation_direction: TruncationDirection = "right",
) -> list[Encoded]:
    """Tokenize for the version that answers the request (`serving`) under its
    options, off the loop and batched with other requests (`server.tokenizing`); an
    option the model cannot honour is 422. The inputs are kept on the request's call,
    for its shadows and the prediction log."""
    call: Call = request.state.call
    items = await _tokenize(call.served, texts, pairs, body, truncation_direction)
    call.record(texts, pairs, body.options(), truncation_direction, items)
    return items


async def _tokenize(
    served: Served,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    body: OutputOptions,
    truncation_direction: TruncationDirection,
) -> list[Encoded]:
    model = served.encoder
    if body.all_scores and model.task == "embed":
        raise invalid("all_scores", "all_scores applies to classify and rerank models")
    if body.encoding_format != "float" and model.task != "embed":
        raise invalid("encoding_format", "encoding_format applies to embedding models")
    try:
        return await served.tokenizer.encode(texts, pairs, body.options(), truncation_direction)
    except InvalidOption as exc:
        raise invalid(exc.field, str(exc)) from None


async def encode_inputs(
    request: Request,
    inputs: Sequence[str | list[int]],
    body: OutputOptions,
    field: str,
    truncation_direction: TruncationDirection = "right",
) -> list[Encoded]:
    """Texts and token-id sequences, in one request and in order (OpenAI's and TEI's
    `input`): each kind encoded in one call."""
    call: Call = request.state.call
    items = await _mixed(call.served, inputs, body, field, truncation_direction)
    call.record(inputs, None, body.options(), truncation_direction, items)
    return items


async def _mixed(
    served: Served,
    inputs: Sequence[str | list[int]],
    body: OutputOptions,
    field: str,
    truncation_direction: TruncationDirection = "right",
) -> list[Encoded]:
    """`encode_inputs` for one version."""
    model = served.encoder
    texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
    if len(texts) == len(inputs):
        return await _tokenize(served, [t for _, t in texts], None, body, truncation_direction)
    ids = [(i, x) for i, x in enumerate(inputs) if not isinstance(x, str)]
    out: list[Encoded | None] = [None] * len(inputs)
    if texts:
        encoded = await _tokenize(served, [t for _, t in texts], None, body, truncation_direction)
        for (i, _), item in zip(texts, encoded, strict=True):
            out[i] = item
    try:
        encoded = model.encode_ids([x for _, x in ids], body.options())
    except InvalidOption as exc:
        raise invalid(field if exc.field == "input" else exc.field, str(exc)) from None
    for (i, _), item in zip(ids, encoded, strict=True):
        out[i] = item
    return [item for item in out if item is not None]
