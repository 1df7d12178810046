"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from batcher import BatchSizing, Policy
from batcher.models import Options

Text = Annotated[StrictStr, Field(min_length=1, description="One input text.")]


class OutputOptions(BaseModel):
    """Per-request choices; each applies to the tasks it names (422 elsewhere)."""

    truncate: StrictBool | None = Field(
        None,
        description="Cut an input over the model's token limit (false: 422 instead). "
        "Default: the server's --truncate.",
    )
    normalize: StrictBool | None = Field(
        None,
        description="embed: L2-normalise the vector. Default: as the model declares (a "
        "Normalize module); plain transformers models: true.",
    )
    prompt_name: StrictStr | None = Field(
        None,
        description="embed: one of the model's prompts (GET /model lists them), put before "
        "the text. Default: the model's default_prompt_name, if any.",
    )
    prompt: StrictStr | None = Field(
        None, description="embed: your own prompt, put before the text (instead of prompt_name)."
    )
    dimensions: StrictInt | None = Field(
        None,
        ge=1,
        description="embed: keep the first N values (Matryoshka), normalised afterwards when "
        "normalising.",
    )
    raw_scores: StrictBool = Field(
        False, description="classify/rerank: the logits, without the head's activation."
    )
    all_scores: StrictBool = Field(
        False, description="classify/rerank: also return every label's score."
    )

    def options(self) -> Options:
        return Options(
            normalize=self.normalize,
            prompt_name=self.prompt_name,
            prompt=self.prompt,
            dimensions=self.dimensions,
            raw_scores=self.raw_scores,
        )


class PredictRequest(OutputOptions):
    model_config = ConfigDict(extra="forbid")

    text: Text
    text_pair: Text | None = Field(
        None, description="classify/rerank: the second text of a pair (query, passage; NLI)."
    )


class BatchPredictRequest(OutputOptions):
    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(min_length=1, description="Texts, each batched on its own.")
    text_pairs: list[Text] | None = Field(
        None, description="classify/rerank: one second text per text, in the same order."
    )


class RerankRequest(BaseModel):
    """TEI's rerank request."""

    model_config = ConfigDict(extra="forbid")

    query: Text
    texts: list[Text] = Field(
        min_length=1, description="Texts to score against the query; each pair is batched."
    )
    top_n: StrictInt | None = Field(None, ge=1, description="Return only the best N.")
    return_text: StrictBool = Field(False, description="Include each text in its result.")
    raw_scores: StrictBool = Field(False, description="The logits, without the activation.")
    truncate: StrictBool | None = Field(
        None, description="Cut pairs over the token limit (false: 422). Default: --truncate."
    )


class RerankResult(BaseModel):
    index: int = Field(description="Position of the text in the request.")
    score: float = Field(description="Relevance (the cross-encoder's activated score).")
    text: str | None = Field(None, description="The text, with return_text.")


class Embedding(BaseModel):
    embedding: list[float] = Field(
        description="The model's embedding: its pooling, Dense and Normalize modules, with "
        "this request's dimensions and normalize."
    )
    truncated: bool = Field(description="The text was cut to the model's token limit.")


class Label(BaseModel):
    label: str = Field(description="The label with the highest score.")
    score: float = Field(
        description="Score of `label`: softmax probability, sigmoid (multi-label and "
        "one-output models, or the CrossEncoder's activation), or the logit with raw_scores."
    )
    scores: dict[str, float] | None = Field(None, description="Every label's score.")
    truncated: bool


class PredictMeta(BaseModel):
    model: str
    request_id: str
    processing_time_ms: float = Field(description="Time in the server, admission to reply.")


class EmbeddingResponse(Embedding, PredictMeta):
    pass


class LabelResponse(Label, PredictMeta):
    pass


class BatchResponse(PredictMeta):
    results: list[Embedding] | list[Label]


class Batching(BaseModel):
    """The live batching settings."""

    max_batch_size: int
    max_wait_ms: float
    max_batch_tokens: int | None
    max_queue_size: int
    policy: Policy
    batch_sizing: BatchSizing


class BatchingPatch(BaseModel):
    """Fields to change; the others keep their value. `max_batch_tokens: null` lifts
    the token cap."""

    model_config = ConfigDict(extra="forbid")

    # Omitted fields keep their value; only max_batch_tokens accepts null.
    max_batch_size: int = Field(None, ge=1)  # type: ignore[assignment]
    max_wait_ms: float = Field(None, ge=0)  # type: ignore[assignment]
    max_batch_tokens: int | None = Field(None, ge=8)
    max_queue_size: int = Field(None, ge=1)  # type: ignore[assignment]
    policy: Policy = Field(None)  # type: ignore[arg-type]
    batch_sizing: BatchSizing = Field(None)  # type: ignore[arg-type]


class Status(BaseModel):
    status: str
    detail: str | None = None


class ErrorReply(BaseModel):
    """Every error's shape."""

    detail: Any = Field(description="What was wrong; for 422 a list of {loc, msg, type}.")
    type: str = Field(description="A stable name: invalid_input, queue_full, ...")
    request_id: str | None
