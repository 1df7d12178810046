"""Text Embeddings Inference's HTTP API: `/embed`, `/rerank`, `/similarity`, `/tokenize`,
`/decode`, `/info`, and the root route, `POST /`, which answers by the model's task (as
TEI's does) and by the body's shape, for Hugging Face's `InferenceClient`
(`feature_extraction`, `sentence_similarity`, `text_classification`); in TEI's request and
reply shapes, so that a TEI client needs only a new URL. Errors carry TEI's `error` and `error_type`
beside our own fields (`server.errors`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter

from batcher.models import Classification, TruncationDirection
from server.routes.parsing import (
    RuntimeDep,
    best_first,
    body_of,
    check_tokens,
    deadline_of,
    encode_inputs,
    invalid,
    needs_task,
    openapi_body,
    parse,
    rank,
    reply,
    runtime_of,
    serving,
    submit_all,
    to_json,
)
from server.schemas import Inputs, OutputOptions, TEIErrorReply, Text, Texts, error_responses

router = APIRouter(tags=["TEI"])

TEI_ERRORS = error_responses(TEIErrorReply)

Direction = Literal["right", "left", "Right", "Left"]
"""TEI's `truncation_direction` (its enum is spelled Right/Left on the wire)."""


def _direction(value: Direction) -> TruncationDirection:
    return "left" if value.lower() == "left" else "right"


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Inputs
    normalize: StrictBool = Field(True, description="L2-normalise (TEI's default: true).")
    truncate: StrictBool | None = Field(
        None, description="Cut inputs over the token limit (false: 422). Default: --truncate."
    )
    truncation_direction: Direction = Field("right", description="Which end to cut.")
    prompt_name: StrictStr | None = Field(None, description="One of the model's prompts.")
    dimensions: StrictInt | None = Field(None, ge=1, description="Keep the first N values.")


class SimilarityInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_sentence: Text
    sentences: Texts = Field(min_length=1, description="Texts to compare with the source.")


class SimilarityParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    truncate: StrictBool | None = Field(
        None, description="Cut inputs over the token limit (false: 422). Default: --truncate."
    )
    truncation_direction: Direction = Field("right", description="Which end to cut.")
    prompt_name: StrictStr | None = Field(None, description="One of the model's prompts.")


class SimilarityRequest(BaseModel):
    """TEI's similarity request (what `InferenceClient.sentence_similarity` sends)."""

    model_config = ConfigDict(extra="forbid")

    inputs: SimilarityInputs
    parameters: SimilarityParameters | None = None


class ClassifyParameters(BaseModel):
    """The Inference API's text-classification parameters, as `InferenceClient` sends."""

    model_config = ConfigDict(extra="forbid")

    top_k: StrictInt | None = Field(None, ge=1, description="Only the best K labels.")
    function_to_apply: Literal["sigmoid", "softmax", "none"] | None = Field(
        None,
        description="`none`: the logits; the model's own activation (or its name) applies "
        "otherwise, and asking for another is refused.",
    )


class ClassifyRequest(BaseModel):
    """A classifier's request on `POST /`: the Inference API's text-classification body,
    as `InferenceClient.text_classification` sends it, with TEI's predict options."""

    model_config = ConfigDict(extra="forbid")

    inputs: Text | Annotated[Texts, Field(min_length=1)] = Field(
        description="A text, or several (each classified on its own: TEI reads two strings "
        "as one pair, which this route does not take)."
    )
    raw_scores: StrictBool = Field(False, description="The logits, without the activation.")
    truncate: StrictBool | None = Field(
        None, description="Cut inputs over the token limit (false: 422). Default: --truncate."
    )
    truncation_direction: Direction = Field("right", description="Which end to cut.")
    parameters: ClassifyParameters | None = None


class Prediction(BaseModel):
    label: str
    score: float


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: StrictStr | Texts = Field(description="A text or texts.")
    add_special_tokens: StrictBool = Field(True, description="Include [CLS], [SEP], ...")
    prompt_name: StrictStr | None = Field(None, description="Put this prompt first.")


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[StrictInt] | list[list[StrictInt]] = Field(
        min_length=1, description="Token ids, or several sequences of them."
    )
    skip_special_tokens: StrictBool = Field(True, description="Leave out [CLS], [SEP], ...")


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None = Field(description="Character offset in the input; null if special.")
    stop: int | None


class RerankRequest(BaseModel):
    """TEI's rerank request."""

    model_config = ConfigDict(extra="forbid")

    query: Text
    texts: Texts = Field(
        min_length=1, description="Texts to score against the query; each pair is batched."
    )
    top_n: StrictInt | None = Field(None, ge=1, description="Return only the best N.")
    return_text: StrictBool = Field(False, description="Include each text in its result.")
    raw_scores: StrictBool = Field(False, description="The logits, without the activation.")
    truncate: StrictBool | None = Field(
        None, description="Cut pairs over the token limit (false: 422). Default: --truncate."
    )
    truncation_direction: Direction = Field("right", description="Which end to cut.")


class RerankResult(BaseModel):
    index: int = Field(description="Position of the text in the request.")
    score: float = Field(description="Relevance (the cross-encoder's activated score).")
    text: str | None = Field(None, description="The text, with return_text.")


class Info(BaseModel):
    """TEI's `/info`, with the fields that apply to this server."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_type: dict[str, dict[str, object]] = Field(
        description='{"embedding": {"pooling": ...}}, or {"classifier"|"reranker": '
        "{id2label, label2id}}."
    )
    max_concurrent_requests: int = Field(description="Items the queue holds (429 beyond).")
    max_input_length: int = Field(description="The model's token limit.")
    max_batch_tokens: int | None
    max_batch_requests: int = Field(description="Items per forward pass.")
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int = Field(
        description="Processes that tokenize: one per front-end (--workers), each with its "
        "tokenizer thread."
    )
    version: str
    sha: str | None = None
    docker_label: str | None = None


_TOKENS = TypeAdapter(list[list[SimpleToken]])
_PREDICTIONS = TypeAdapter(list[list[Prediction]])
_RANKED = TypeAdapter(list[RerankResult])


@router.post(
    "/embed",
    response_model=list[list[float]],
    summary="Embed texts or token ids (TEI's shape): one vector per input, in order",
    responses=TEI_ERRORS,
    openapi_extra=openapi_body(EmbedRequest, {"inputs": ["What is Deep Learning?"]}),
)
async def embed(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, EmbedRequest, runtime)
    model, engine = serving(runtime, request)
    needs_task(model, "embed", "/embed", "an embedding model")
    deadline = deadline_of(engine, runtime, request)
    options = OutputOptions(
        normalize=body.normalize, prompt_name=body.prompt_name, dimensions=body.dimensions
    )
    direction = _direction(body.truncation_direction)
    items = await encode_inputs(runtime, body.inputs, options, "inputs", direction)
    check_tokens(items, model, runtime, "inputs", body.truncate, listed=True)
    results = await submit_all(request, runtime, engine, items, deadline)
    vectors = [cast("list[float]", r.value) for r in results]
    return reply(to_json(vectors), results)


@router.post(
    "/rerank",
    response_model=list[RerankResult],
    summary="Score texts against a query with a cross-encoder, best first (TEI's shape)",
    responses=TEI_ERRORS,
    openapi_extra=openapi_body(RerankRequest, {"query": "What is Deep Learning?",
                               "texts": ["Deep Learning is ...", "Paris is in France."]}),
)  # fmt: skip
async def rerank(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, RerankRequest, runtime)
    ranking = await rank(
        request, runtime, "/rerank", body.query, body.texts, field="texts",
        options=OutputOptions(raw_scores=body.raw_scores), truncate=body.truncate,
        top_n=body.top_n, truncation_direction=_direction(body.truncation_direction),
    )  # fmt: skip
    ranked = [
        RerankResult.model_construct(
            index=i, score=ranking.scores[i], text=body.texts[i] if body.return_text else None
        )
        for i in ranking.order
    ]
    return reply(_RANKED.dump_json(ranked, exclude_none=True), ranking.results)


@router.post(
    "/tokenize",
    response_model=list[list[SimpleToken]],
    summary="The tokens the model sees for each text (TEI's shape)",
    responses=TEI_ERRORS,
    openapi_extra=openapi_body(TokenizeRequest, {"inputs": "What is Deep Learning?"}),
)
async def tokenize(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, TokenizeRequest, runtime)
    serving(runtime, request)  # 503 unless ready
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    try:
        tokens = await runtime.tokenizer.tokenize(texts, body.add_special_tokens, body.prompt_name)
    except ValueError as exc:  # InvalidOption: an unknown prompt
        raise invalid("prompt_name", str(exc)) from None
    shaped = [
        [
            SimpleToken.model_construct(
                id=t.id, text=t.text, special=t.special, start=t.start, stop=t.stop
            )
            for t in ts
        ]
        for ts in tokens
    ]
    return Response(_TOKENS.dump_json(shaped), media_type="application/json")


@router.get("/info", response_model=Info, summary="Model and limits (TEI's shape)")
async def info(request: Request, runtime: RuntimeDep) -> Info:
    model, settings = runtime.encoder, runtime.settings
    described = runtime.describe()
    config = runtime.engine.stats().config
    if model.task == "embed":
        pooling = described.get("pooling") or ["mean"]
        model_type: dict[str, dict[str, object]] = {
            "embedding": {"pooling": "+".join(map(str, cast("list[object]", pooling)))}
        }
    else:
        id2label = {str(i): label for i, label in enumerate(model.labels)}
        labels = {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}
        model_type = {"reranker" if model.task == "rerank" else "classifier": labels}
    return Info(
        model_id=model.name,
        model_dtype=str(described.get("dtype", "float32")),
        model_type=model_type,
        max_concurrent_requests=config.max_queue_size,
        max_input_length=model.max_tokens,
        max_batch_tokens=config.max_batch_tokens,
        max_batch_requests=config.max_batch_size,
        max_client_batch_size=settings.max_client_batch,
        auto_truncate=settings.truncate,
        tokenization_workers=runtime.settings.workers,
        version=request.app.version,
    )


@router.post(
    "/decode",
    response_model=list[str],
    summary="Token ids back to text (TEI's shape): one text per sequence",
    responses=TEI_ERRORS,
    openapi_extra=openapi_body(DecodeRequest, {"ids": [101, 7592, 102]}),
)
async def decode(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, DecodeRequest, runtime)
    serving(runtime, request)  # 503 unless ready
    ids = cast("list[list[int]]", body.ids if isinstance(body.ids[0], list) else [body.ids])
    if len(ids) > runtime.settings.max_client_batch:
        raise invalid(
            "ids",
            f"at most {runtime.settings.max_client_batch} sequences a call (--max-client-batch)",
        )
    try:
        texts = await runtime.tokenizer.decode(ids, body.skip_special_tokens)
    except ValueError as exc:  # InvalidOption: an id outside the vocabulary
        raise invalid("ids", str(exc)) from None
    return Response(orjson.dumps(texts), media_type="application/json")


@router.post(
    "/similarity",
    response_model=list[float],
    summary="Cosine similarity of a source text to each of several (TEI's shape)",
    responses=TEI_ERRORS,
    openapi_extra=openapi_body(SimilarityRequest, {"inputs": {"source_sentence": "What is "
                               "Deep Learning?", "sentences": ["Deep Learning is ...",
                               "Paris is in France."]}}),
)  # fmt: skip
async def similarity(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await parse(request, SimilarityRequest, runtime)
    model, engine = serving(runtime, request)
    needs_task(model, "embed", request.url.path, "an embedding model")
    deadline = deadline_of(engine, runtime, request)
    parameters = body.parameters or SimilarityParameters()
    options = OutputOptions(normalize=True, prompt_name=parameters.prompt_name)
    texts = [body.inputs.source_sentence, *body.inputs.sentences]
    direction = _direction(parameters.truncation_direction)
    items = await encode_inputs(runtime, texts, options, "inputs", direction)
    check_tokens(items, model, runtime, "inputs", parameters.truncate, listed=True)
    results = await submit_all(request, runtime, engine, items, deadline)
    vectors = np.asarray([cast("list[float]", r.value) for r in results], dtype=np.float32)
    return reply(to_json((vectors[1:] @ vectors[0]).tolist()), results)


async def _classify(request: Request) -> Response:
    """A classifier on `POST /`: every label's score, best first, as a list per input
    even for one (the Inference API's text-classification shape, which
    `InferenceClient.text_classification` reads; TEI's predict answers one input flat)."""
    runtime = runtime_of(request)
    body = await parse(request, ClassifyRequest, runtime)
    model, engine = serving(runtime, request)
    needs_task(model, "classify", "/", "a classifier")
    parameters = body.parameters or ClassifyParameters()
    function = parameters.function_to_apply
    if function not in (None, "none"):
        own = str(runtime.describe().get("head_activation", "")).lower()
        if function != own:
            raise invalid(
                "parameters",
                f"function_to_apply {function!r} is not supported: the model's own "
                f"activation ({own or 'unknown'}) applies, or 'none' for the logits",
            )
    deadline = deadline_of(engine, runtime, request)
    options = OutputOptions(raw_scores=body.raw_scores or function == "none")
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    items = await encode_inputs(
        runtime, texts, options, "inputs", _direction(body.truncation_direction)
    )
    check_tokens(items, model, runtime, "inputs", body.truncate, listed=True)
    results = await submit_all(request, runtime, engine, items, deadline)
    labels = model.labels
    shaped = []
    for result in results:
        scores = cast("Classification", result.value).scores
        shaped.append(
            [
                Prediction.model_construct(label=labels[i], score=scores[i])
                for i in best_first(scores, parameters.top_k)
            ]
        )
    return reply(_PREDICTIONS.dump_json(shaped), results)


def _is_similarity(raw: bytes) -> bool:
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False  # the embed route's parser says what is wrong with it
    return isinstance(body, dict) and isinstance(body.get("inputs"), dict)


@router.post(
    "/",
    summary="TEI's root route: by the model's task, embed (or similarity), classify or rerank",
    description="What Hugging Face's `InferenceClient(base_url=...)` posts to: an embedding "
    "model answers `/embed`'s body as `/embed` does and `/similarity`'s as `/similarity` "
    'does; a classifier answers `{"inputs", "parameters"?: {"top_k", '
    '"function_to_apply"}}` with every label\'s score, best first, per input; a '
    "cross-encoder answers `/rerank`'s body.",
    responses=TEI_ERRORS,
    openapi_extra=openapi_body(EmbedRequest, {"inputs": "What is Deep Learning?"}),
)
async def root(request: Request) -> Response:
    runtime = runtime_of(request)
    serving(runtime, request)  # 503 unless ready: the task is known then
    task = runtime.encoder.task
    if task == "rerank":
        return await rerank(request)
    if task == "classify":
        return await _classify(request)
    if _is_similarity(await body_of(request)):
        return await similarity(request)
    return await embed(request)
