"""Text Embeddings Inference's HTTP API: `/embed`, `/rerank`, `/similarity`, `/tokenize`,
`/decode`, `/info`, and the root route, `POST /`, which answers by the model's task (as
TEI's does) and by the body's shape, for Hugging Face's `InferenceClient`
(`feature_extraction`, `sentence_similarity`, `text_classification`); in TEI's request and
reply shapes, so that a TEI client needs only a new URL. Errors carry TEI's `error` and `error_type`
beside our own fields (`server.errors`)."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import TypeAdapter

from batcher import Result
from batcher.models import Classification, Output, SparseVector, TokenVectors
from server.routes.encoding import check_tokens, encode_inputs
from server.routes.headers import deadline_of
from server.routes.parsing import (
    ModelQuery,
    RuntimeDep,
    best_first,
    body_of,
    invalid,
    needs_task,
    openapi_body,
    parse,
    reply,
    runtime_of,
    serving,
    submit_all,
    to_json,
)
from server.routes.ranking import rank
from server.routes.tei_bodies import (
    ClassifyParameters,
    ClassifyRequest,
    DecodeRequest,
    EmbedAllRequest,
    EmbedRequest,
    EmbedSparseRequest,
    Info,
    Prediction,
    RerankRequest,
    RerankResult,
    SimilarityParameters,
    SimilarityRequest,
    SimpleToken,
    SparseValue,
    TokenizeRequest,
    cut_side,
)
from server.schemas import (
    OutputOptions,
    TEIErrorReply,
    error_responses,
)

router = APIRouter(tags=["TEI"])

TEI_ERRORS = error_responses(TEIErrorReply)

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
    body = await parse(request, EmbedRequest, runtime_of(request))
    options = OutputOptions(
        normalize=body.normalize, prompt_name=body.prompt_name, dimensions=body.dimensions,
        truncate=body.truncate,
    )  # fmt: skip
    results = await _compute(request, body, options, ("embed", "/embed", "an embedding model"))
    vectors = [cast("list[float]", r.value) for r in results]
    return reply(request, to_json(vectors), results)


async def _compute(
    request: Request,
    body: EmbedRequest | EmbedAllRequest,
    options: OutputOptions,
    needs: tuple[str, str, str],
) -> list[Result[Output]]:
    """What `/embed`, `/embed_all` and `/embed_sparse` share: the model the body names
    (`needs`: its task, the route, what it needs), its inputs encoded under `options`,
    cut or refused as `truncate` says, and computed, in order."""
    runtime = runtime_of(request)
    served, engine = serving(runtime, request, body.model)
    model = served.encoder
    needs_task(model, *needs)
    deadline = deadline_of(engine, runtime, request)
    direction = cut_side(body.truncation_direction)
    items = await encode_inputs(request, body.inputs, options, "inputs", direction)
    check_tokens(items, model, runtime, "inputs", body.truncate, listed=True)
    return await submit_all(request, runtime, engine, items, deadline)


@router.post(
    "/embed_all",
    response_model=list[list[list[float]]],
    summary="Token vectors (TEI's shape): per input, the model's last hidden state at each "
    "token, special tokens included, in /tokenize's order",
    responses=TEI_ERRORS,
    openapi_extra=openapi_body(EmbedAllRequest, {"inputs": ["What is Deep Learning?"]}),
)
async def embed_all(request: Request) -> Response:
    body = await parse(request, EmbedAllRequest, runtime_of(request))
    options = OutputOptions(
        prompt_name=body.prompt_name, token_embeddings=True, truncate=body.truncate
    )
    needs = ("embed", "/embed_all", "an embedding model")
    results = await _compute(request, body, options, needs)
    matrices = [cast("TokenVectors", r.value).array() for r in results]
    return reply(request, orjson.dumps(matrices, option=orjson.OPT_SERIALIZE_NUMPY), results)


@router.post(
    "/embed_sparse",
    response_model=list[list[SparseValue]],
    summary="Sparse vectors of a SPLADE model (TEI's shape): per input, its nonzero "
    "weights by vocabulary index",
    responses=TEI_ERRORS,
    openapi_extra=openapi_body(EmbedSparseRequest, {"inputs": ["What is Deep Learning?"]}),
)
async def embed_sparse(request: Request) -> Response:
    body = await parse(request, EmbedSparseRequest, runtime_of(request))
    options = OutputOptions(prompt_name=body.prompt_name, top_k=body.top_k, truncate=body.truncate,
                            input_type=body.input_type)  # fmt: skip
    needs = ("sparse", "/embed_sparse", "a sparse model (a SPLADE SparseEncoder)")
    results = await _compute(request, body, options, needs)
    return reply(
        request, to_json([cast("SparseVector", r.value).pairs() for r in results]), results
    )


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
        top_n=body.top_n, truncation_direction=cut_side(body.truncation_direction),
        model_name=body.model,
    )  # fmt: skip
    ranked = [
        RerankResult.model_construct(
            index=i, score=ranking.scores[i], text=body.texts[i] if body.return_text else None
        )
        for i in ranking.order
    ]
    return reply(request, _RANKED.dump_json(ranked, exclude_none=True), ranking.results)


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
    served, _ = serving(runtime, request, body.model)  # 503 unless ready
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    try:
        tokens = await served.tokenizer.tokenize(texts, body.add_special_tokens, body.prompt_name)
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
async def info(request: Request, runtime: RuntimeDep, model: ModelQuery = None) -> Info:
    served = runtime.model(model)
    settings = runtime.settings
    described = served.describe()
    config = served.engine.stats().config
    encoder = served.encoder
    if encoder.task in ("embed", "sparse"):
        pooling = described.get("pooling") or ["mean"]
        model_type: dict[str, dict[str, object]] = {
            "embedding": {"pooling": "+".join(map(str, cast("list[object]", pooling)))}
        }
    else:
        id2label = {str(i): label for i, label in enumerate(encoder.labels)}
        labels = {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}
        model_type = {"reranker" if encoder.task == "rerank" else "classifier": labels}
    return Info(
        model_id=encoder.name,
        model_dtype=str(described.get("dtype", "float32")),
        model_type=model_type,
        max_concurrent_requests=config.max_queue_size,
        max_input_length=encoder.max_tokens,
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
    served, _ = serving(runtime, request, body.model)  # 503 unless ready
    ids = cast("list[list[int]]", body.ids if isinstance(body.ids[0], list) else [body.ids])
    if len(ids) > runtime.settings.max_client_batch:
        raise invalid(
            "ids",
            f"at most {runtime.settings.max_client_batch} sequences a call (--max-client-batch)",
        )
    try:
        texts = await served.tokenizer.decode(ids, body.skip_special_tokens)
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
    served, engine = serving(runtime, request, body.model)
    model = served.encoder
    needs_task(model, "embed", request.url.path, "an embedding model")
    deadline = deadline_of(engine, runtime, request)
    parameters = body.parameters or SimilarityParameters()
    options = OutputOptions(
        normalize=True, prompt_name=parameters.prompt_name, truncate=parameters.truncate
    )
    texts = [body.inputs.source_sentence, *body.inputs.sentences]
    direction = cut_side(parameters.truncation_direction)
    items = await encode_inputs(request, texts, options, "inputs", direction)
    check_tokens(items, model, runtime, "inputs", parameters.truncate, listed=True)
    results = await submit_all(request, runtime, engine, items, deadline)
    vectors = np.asarray([cast("list[float]", r.value) for r in results], dtype=np.float32)
    return reply(request, to_json((vectors[1:] @ vectors[0]).tolist()), results)


async def _classify(request: Request) -> Response:
    """A classifier on `POST /`: every label's score, best first, as a list per input
    even for one (the Inference API's text-classification shape, which
    `InferenceClient.text_classification` reads; TEI's predict answers one input flat)."""
    runtime = runtime_of(request)
    body = await parse(request, ClassifyRequest, runtime)
    served, engine = serving(runtime, request, body.model)
    model = served.encoder
    needs_task(model, "classify", "/", "a classifier")
    parameters = body.parameters or ClassifyParameters()
    function = parameters.function_to_apply
    if function not in (None, "none"):
        own = str(served.describe().get("head_activation", "")).lower()
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
        request, texts, options, "inputs", cut_side(body.truncation_direction)
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
    return reply(request, _PREDICTIONS.dump_json(shaped), results)


def _peek(raw: bytes) -> tuple[str | None, bool]:
    """The model a root request names, and whether its body is `/similarity`'s (the
    routes' own parsers say what is wrong with a bad body)."""
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, False
    if not isinstance(body, dict):
        return None, False
    model = body.get("model")
    return model if isinstance(model, str) else None, isinstance(body.get("inputs"), dict)


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
    model, similar = _peek(await body_of(request))
    served, _ = serving(runtime, request, model)  # 503 unless ready: the task is known then
    task = served.encoder.task
    if task == "rerank":
        return await rerank(request)
    if task == "classify":
        return await _classify(request)
    if task == "sparse":
        return await embed_sparse(request)
    if similar:
        return await similarity(request)
    return await embed(request)
