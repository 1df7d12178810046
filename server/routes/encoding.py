"""How a request's inputs become the answering version's token ids, and what is kept
of them on the request's call (`server.calls`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import cast

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from batcher.models import Encoded, Encoder, InvalidOption, Options, TruncationDirection
from server.calls import Call
from server.routes.chunking import chunk_long_inputs, chunks_long_inputs
from server.routes.embedding_types import check_embedding_type
from server.routes.parsing import invalid, loc, runtime_of
from server.runtime import Runtime
from server.schemas import OutputOptions, is_image_uri
from server.served import Served


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
    `input`): each kind encoded in one call (`Served.encode`); or data URIs of images,
    for an image model (`image_inputs`). An option the model cannot honour is 422, on
    `field` where it is about the inputs themselves."""
    call: Call = request.state.call
    served = call.served
    model = served.encoder
    images = image_inputs(served, inputs, field)
    if images is not None:  # data URIs of images, for an image model
        return await encode_images(request, images, body, field, listed=True)
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
    options = _with_input_type(body, model)
    try:
        if body.input_type == "query" and model.static is not None:
            items = _static_queries(call, model, inputs, options, field)
        else:
            items = await served.encode(inputs, pairs, options, truncation_direction)
        if chunking:
            items = await chunk_long_inputs(call, model, inputs, items, options)
    except InvalidOption as exc:
        raise invalid(field if exc.field == "input" else exc.field, str(exc)) from None
    call.record(inputs, pairs, options, truncation_direction, items)
    return items


INPUT_TYPE_PROMPTS = {"query": ("query",), "document": ("document", "passage", "corpus")}
"""The prompts `input_type` takes, the first the model has: sentence-transformers'
`encode_query` and `encode_document`; a model with none of them gets its default prompt."""


def _with_input_type(body: OutputOptions, model: Encoder) -> Options:
    """The request's options, with `input_type`'s prompt where the model has one and the
    request names none (sentence-transformers' `encode_query`, `encode_document`)."""
    options = body.options()
    kind = body.input_type
    if kind is None:
        return options
    if model.task not in ("embed", "sparse"):
        raise invalid("input_type", f"input_type applies to embedding and sparse models; "
                      f"this is a {model.task} model")  # fmt: skip
    name = first_prompt(model, INPUT_TYPE_PROMPTS[kind])
    if options.prompt is None and options.prompt_name is None and name is not None:
        return replace(options, prompt_name=name)
    return options


def first_prompt(model: Encoder, names: Sequence[str]) -> str | None:
    """The first of `names` that the model has a prompt of, or None."""
    return next((name for name in names if name in model.prompts), None)


def _static_queries(
    call: Call, model: Encoder, inputs: Sequence[str | list[int]], options: Options, field: str
) -> list[Encoded]:
    """An inference-free sparse model's queries, answered here from its static table:
    no engine, no batch (`call.computed`). Cut at the table's tokenizer's limit, as the
    reference cuts them."""
    assert model.static is not None
    if not all(isinstance(text, str) for text in inputs):
        raise invalid(field, "a query of an inference-free model is a text, not token ids")
    items = model.static_queries([str(text) for text in inputs], options)
    call.computed = list(model.static.vectors(items))
    return items


async def encode_images(
    request: Request,
    images: Sequence[str | bytes],
    body: OutputOptions,
    field: str,
    listed: bool | None = None,
) -> list[Encoded]:
    """Images for the version that answers the request, decoded and preprocessed off the
    loop (`server.imaging`); 422 for a model that takes no images, an option an image
    cannot take, and each image that cannot be read, naming its position and why (its
    `type` is the kind: `not_an_image`, `too_many_pixels`, ...). Kept on the request's
    call, for its shadows and the prediction log."""
    call: Call = request.state.call
    served = call.served
    model = served.encoder
    if not served.takes_images:
        raise invalid(field, f"{model.name} is a text model; send text, not images")
    if body.all_scores and model.task == "embed":
        raise invalid("all_scores", "all_scores applies to classifiers")
    if body.encoding_format != "float" and model.task != "embed":
        raise invalid("encoding_format", "encoding_format applies to embedding models")
    check_embedding_type(model, body.embedding_type, "embedding_type")
    if body.input_type is not None:
        raise invalid("input_type", "input_type applies to texts, not images")
    try:
        decoded = await served.encode_images(images, body.options())
    except InvalidOption as exc:
        raise invalid(exc.field, str(exc)) from None
    if decoded.bad:
        raise RequestValidationError([
            {"loc": loc(field, i, listed), "msg": str(bad), "type": bad.kind}
            for i, bad in decoded.bad
        ])  # fmt: skip
    # Pixels go where Encoded items go (the engine, the cache, the log): they carry every
    # field the server reads of an item.
    items = cast("list[Encoded]", decoded.pixels)
    call.record(images, None, body.options(), "right", items)
    call.images = True
    return items


def image_inputs(served: Served, inputs: Sequence[str | list[int]], field: str) -> list[str] | None:
    """OpenAI's or TEI's `input` as images, when they are data URIs of images (None when
    they are texts); 422 for images to a text model, and for images and texts in one
    request (sentence-transformers encodes one modality a call too)."""
    uris = [isinstance(x, str) and is_image_uri(x) for x in inputs]
    if not any(uris):
        return None
    if not served.takes_images:
        raise invalid(field, f"{served.encoder.name} is a text model; image inputs "
                      "(data:image/... URIs) need an image model")  # fmt: skip
    if not all(uris):
        raise invalid(field, "send images and texts in separate requests (this one mixes them)")
    return cast("list[str]", list(inputs))
