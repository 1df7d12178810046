"""How a request's inputs become the answering version's token ids, and what is kept
of them on the request's call (`server.calls`)."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from batcher.models import Encoded, Encoder, InvalidOption, TruncationDirection
from server.calls import Call
from server.routes.chunking import chunk_long_inputs, chunks_long_inputs
from server.routes.embedding_types import check_embedding_type
from server.routes.parsing import invalid, loc, runtime_of
from server.runtime import Runtime
from server.schemas import OutputOptions


def check_tokens(
    items: Sequence[Encoded],
    model: Encoder,
    runtime: Runtime,
    field: str,
    truncate: bool | None,
    listed: bool | None = None,
    why: str = "(truncate: false)",
) -> None:
    allowed = runtime.settings.truncate if truncate is None else truncate
    if allowed:
        return
    why = "(the server runs with --no-truncate)" if truncate is None else why
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
    return await encode_inputs(request, texts, body, "text", truncation_direction, pairs)


async def encode_inputs(
    request: Request,
    inputs: Sequence[str | list[int]],
    body: OutputOptions,
    field: str,
    truncation_direction: TruncationDirection = "right",
    pairs: Sequence[str] | None = None,
) -> list[Encoded]:
    """Texts and token-id sequences, in one request and in order (OpenAI's and TEI's
    `input`): each kind encoded in one call (`Served.encode`). An option the model
    cannot honour is 422, on `field` where it is about the inputs themselves."""
    call: Call = request.state.call
    served = call.served
    model = served.encoder
    if body.all_scores and model.task in ("embed", "sparse"):
        raise invalid("all_scores", "all_scores applies to classify and rerank models")
    if body.encoding_format != "float" and model.task != "embed":
        raise invalid("encoding_format", "encoding_format applies to embedding models")
    check_embedding_type(model, body.embedding_type, "embedding_type")
    if body.token_embeddings and (
        body.embedding_type != "float" or body.encoding_format != "float"
    ):
        raise invalid("token_embeddings", "token vectors are sent as float JSON numbers only")
    chunking = chunks_long_inputs(body, runtime_of(request), model)
    options = body.options()
    try:
        items = await served.encode(inputs, pairs, options, truncation_direction)
    except InvalidOption as exc:
        raise invalid(field if exc.field == "input" else exc.field, str(exc)) from None
    if chunking:
        items = await chunk_long_inputs(call, model, inputs, items, options)
    call.record(inputs, pairs, options, truncation_direction, items)
    return items
