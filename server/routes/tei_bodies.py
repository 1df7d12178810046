"""The bodies of TEI's routes (`server.routes.tei`), to the letter of its public API
documentation, with this server's extensions (`model`, `dimensions`) marked."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from batcher.models import TruncationDirection
from server.schemas import MODEL_FIELD, Inputs, Text, Texts

Direction = Literal["right", "left", "Right", "Left"]
"""TEI's `truncation_direction` (its enum is spelled Right/Left on the wire)."""


def cut_side(value: Direction) -> TruncationDirection:
    return "left" if value.lower() == "left" else "right"


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Inputs
    model: StrictStr | None = MODEL_FIELD
    normalize: StrictBool = Field(True, description="L2-normalise (TEI's default: true).")
    truncate: StrictBool | None = Field(
        None, description="Cut inputs over the token limit (false: 422). Default: --truncate."
    )
    truncation_direction: Direction = Field("right", description="Which end to cut.")
    prompt_name: StrictStr | None = Field(None, description="One of the model's prompts.")
    dimensions: StrictInt | None = Field(None, ge=1, description="Keep the first N values.")


class EmbedAllRequest(BaseModel):
    """TEI's `/embed_all` request."""

    model_config = ConfigDict(extra="forbid")

    inputs: Inputs
    model: StrictStr | None = MODEL_FIELD
    truncate: StrictBool | None = Field(
        None, description="Cut inputs over the token limit (false: 422). Default: --truncate."
    )
    truncation_direction: Direction = Field("right", description="Which end to cut.")
    prompt_name: StrictStr | None = Field(None, description="One of the model's prompts.")


class EmbedSparseRequest(EmbedAllRequest):
    """TEI's `/embed_sparse` request, and our `top_k` and `input_type`."""

    input_type: Literal["query", "document"] | None = Field(
        None,
        description="encode_query's or encode_document's prompt; an inference-free "
        "model answers a query from its static table, without the model.",
    )
    top_k: StrictInt | None = Field(
        None,
        ge=1,
        description="Keep the k largest weights (sentence-transformers' "
        "max_active_dims); default: every nonzero one.",
    )


class SparseValue(BaseModel):
    index: int = Field(description="The vocabulary entry (a token id: /decode names it).")
    value: float


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
    model: StrictStr | None = MODEL_FIELD
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
    model: StrictStr | None = MODEL_FIELD


class Prediction(BaseModel):
    label: str
    score: float


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: StrictStr | Texts = Field(description="A text or texts.")
    model: StrictStr | None = MODEL_FIELD
    add_special_tokens: StrictBool = Field(True, description="Include [CLS], [SEP], ...")
    prompt_name: StrictStr | None = Field(None, description="Put this prompt first.")


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[StrictInt] | list[list[StrictInt]] = Field(
        min_length=1, description="Token ids, or several sequences of them."
    )
    skip_special_tokens: StrictBool = Field(True, description="Leave out [CLS], [SEP], ...")
    model: StrictStr | None = MODEL_FIELD


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
    model: StrictStr | None = MODEL_FIELD
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
