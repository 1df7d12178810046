"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from batcher import Policy
from batcher.config import BatchSizing

Text = Annotated[StrictStr, Field(min_length=1, description="One input text.")]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text
    all_scores: StrictBool = Field(
        False, description="classify only: also return every label's probability."
    )


class BatchPredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(min_length=1, description="Texts, each batched on its own.")
    all_scores: StrictBool = False


class Embedding(BaseModel):
    embedding: list[float] = Field(description="Mean-pooled, L2-normalised embedding.")
    truncated: bool = Field(description="The text was cut to the model's token limit.")


class Label(BaseModel):
    label: str
    score: float = Field(description="Probability of `label`.")
    scores: dict[str, float] | None = Field(None, description="Every label's probability.")
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
