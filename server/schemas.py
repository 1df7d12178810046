"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from batcher.models import EmbeddingType, Options


def _within_chars(text: str, info: ValidationInfo) -> str:
    limit = (info.context or {}).get("max_text_chars")
    if limit is not None and len(text) > limit:
        raise PydanticCustomError(
            "string_too_long",
            "text has {chars} characters; the limit is {limit} (--max-text-chars)",
            {"chars": len(text), "limit": limit},
        )
    return text


def within_count(texts: Any, info: ValidationInfo) -> Any:
    # Before the items are validated: an oversized list gets one error, not one per item.
    limit = (info.context or {}).get("max_client_batch")
    if limit is not None and isinstance(texts, list) and len(texts) > limit:
        raise PydanticCustomError(
            "too_long",
            "{count} texts; the limit is {limit} (--max-client-batch)",
            {"count": len(texts), "limit": limit},
        )
    return texts


Text = Annotated[
    StrictStr, Field(min_length=1, description="One input text."), AfterValidator(_within_chars)
]
"""A text, at most `max_text_chars` long when the request limits are in the context."""
Texts = Annotated[list[Text], BeforeValidator(within_count)]
"""At most `max_client_batch` texts when the request limits are in the context."""
Image = Annotated[
    StrictStr,
    Field(min_length=1, description="One image: base64 (of a PNG, JPEG, WebP, GIF, BMP or "
          "TIFF file), a data URI (data:image/png;base64,...), or a URL under the server's "
          "--image-url-allow (no URL is fetched by default)."),
]  # fmt: skip
Images = Annotated[list[Image], BeforeValidator(within_count)]
"""At most `max_client_batch` images when the request limits are in the context."""


INPUTS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1, "description": "One text."},
        {"type": "array", "items": {"type": "string"}, "description": "Texts."},
        {"type": "array", "items": {"type": "integer"}, "description": "One input, as "
         "token ids (from /tokenize: used as they are)."},
        {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "array",
         "items": {"type": "integer"}}]}, "description": "Texts and token-id inputs."},
    ]
}  # fmt: skip


def _as_inputs(value: Any, info: ValidationInfo) -> list[str | list[int]]:
    """OpenAI's and TEI's `input`: a text, texts, one input as token ids, or a list of
    texts and token-id inputs; always returned as a list of inputs."""
    context = info.context or {}
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_id(v) for v in value):
        value = [value]  # one input given as token ids
    if not isinstance(value, list):
        raise PydanticCustomError(
            "input_type", "send a text, a list of texts, token ids, or a list of token-id lists"
        )
    if not value:
        raise PydanticCustomError("too_short", "input is empty: send at least one text")
    limit = context.get("max_client_batch")
    if limit is not None and len(value) > limit:
        raise PydanticCustomError(
            "too_long",
            "{count} inputs; the limit is {limit} (--max-client-batch)",
            {"count": len(value), "limit": limit},
        )
    chars = context.get("max_text_chars")
    for index, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise PydanticCustomError(
                    "string_too_short", "input {index} is an empty text", {"index": index}
                )
            if chars is not None and len(item) > chars and not is_image_uri(item):
                raise PydanticCustomError(
                    "string_too_long",
                    "input {index} has {n} characters; the limit is {limit} (--max-text-chars)",
                    {"index": index, "n": len(item), "limit": chars},
                )
        elif isinstance(item, list) and item and all(_is_id(v) for v in item):
            pass
        else:
            raise PydanticCustomError(
                "input_type",
                "input {index} is neither a text nor a non-empty list of token ids",
                {"index": index},
            )
    return value


def is_image_uri(text: str) -> bool:
    """A data URI of an image (`data:image/png;base64,...`): an image model's input in
    OpenAI's and TEI's `input`, as Infinity takes it; not a text."""
    return text[:11].lower() == "data:image/"


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


Inputs = Annotated[
    list[str | list[int]], BeforeValidator(_as_inputs), WithJsonSchema(INPUTS_SCHEMA)
]
"""OpenAI's `input`, TEI's `inputs`: texts and token-id inputs, at most `max_client_batch`,
each text at most `max_text_chars`, when the request limits are in the context."""


def request_limits(max_text_chars: int, max_client_batch: int) -> dict[str, int]:
    """The validation context that applies the server's request limits to a body."""
    return {"max_text_chars": max_text_chars, "max_client_batch": max_client_batch}


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
    encoding_format: Literal["float", "base64"] = Field(
        "float",
        description="embed: `base64` sends each vector as its little-endian float32 bytes, "
        "base64-encoded (as OpenAI does): a quarter of the size of JSON numbers; with an "
        "embedding_type, its bytes.",
    )
    embedding_type: EmbeddingType = Field(
        "float",
        description="embed: int8 or uint8 (each value as one of 256 steps of its dimension's "
        "range on the model's calibration texts), binary or ubinary (the signs, 8 values a "
        "byte, signed or not), as sentence-transformers' quantize_embeddings computes them.",
    )

    chunking: Literal["none", "mean"] | None = Field(
        None,
        description="embed: mean computes a text over the token limit as windows of it, "
        "each batched on its own, and answers their token-weighted mean (then "
        "dimensions and normalize); none cuts or refuses it. Default: --chunking.",
    )
    input_type: Literal["query", "document"] | None = Field(
        None,
        description="embed, sparse: what the text is, as sentence-transformers' encode_query "
        "and encode_document: the model's prompt of that name where it has one (unless "
        "prompt_name or prompt is given); an inference-free sparse model computes a query "
        "from its static table, without the model.",
    )
    top_k: StrictInt | None = Field(
        None,
        ge=1,
        description="sparse: keep the k largest weights (sentence-transformers' "
        "max_active_dims); default: every nonzero one.",
    )
    token_embeddings: StrictBool = Field(
        False,
        description="embed: one vector per token (the model's last hidden states, special "
        "tokens included, in /tokenize's order) instead of the pooled vector; as TEI's "
        "/embed_all and sentence-transformers' output_value='token_embeddings'.",
    )

    def options(self) -> Options:
        return Options(
            normalize=self.normalize,
            prompt_name=self.prompt_name,
            prompt=self.prompt,
            dimensions=self.dimensions,
            raw_scores=self.raw_scores,
            token_embeddings=self.token_embeddings,
            top_k=self.top_k,
        )


MODEL_ANSWERS = (
    "Which model answers, by its served name (GET /v1/models lists them); default: the "
    "server's default model. Where one model is served, any name is accepted."
)
MODEL_FIELD = Field(None, description=MODEL_ANSWERS)


class PredictRequest(OutputOptions):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"oneOf": [{"required": ["text"]}, {"required": ["image"]}]},
    )

    text: Text | None = Field(None, description="One input text (or send an image).")
    image: Image | None = Field(
        None, description="An image model's input (an image classifier, CLIP, SigLIP): base64 "
        "or a data URI; or upload the file as multipart/form-data, field image.",
    )  # fmt: skip
    model: StrictStr | None = MODEL_FIELD
    text_pair: Text | None = Field(
        None, description="classify/rerank: the second text of a pair (query, passage; NLI)."
    )

    @model_validator(mode="after")
    def _text_or_image(self) -> PredictRequest:
        if (self.text is None) == (self.image is None):
            raise PydanticCustomError(
                "missing" if self.text is None else "value_error",
                "send text or image (one of them)",
            )
        if self.image is not None and self.text_pair is not None:
            raise PydanticCustomError("value_error", "text_pair goes with text, not an image")
        return self


class BatchPredictRequest(OutputOptions):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"oneOf": [{"required": ["texts"]}, {"required": ["images"]}]},
    )

    texts: Texts | None = Field(None, min_length=1, description="Texts, each batched on its own.")
    images: Images | None = Field(
        None, min_length=1, description="Images (base64 or data URIs), each batched on its "
        "own, for an image model; instead of texts.",
    )  # fmt: skip
    model: StrictStr | None = MODEL_FIELD
    text_pairs: Texts | None = Field(
        None, description="classify/rerank: one second text per text, in the same order."
    )

    @model_validator(mode="after")
    def _texts_or_images(self) -> BatchPredictRequest:
        if (self.texts is None) == (self.images is None):
            raise PydanticCustomError(
                "missing" if self.texts is None else "value_error",
                "send texts or images (one of them)",
            )
        if self.images is not None and self.text_pairs is not None:
            raise PydanticCustomError("value_error", "text_pairs go with texts, not images")
        return self

    @field_validator("text_pairs")
    @classmethod
    def _one_pair_per_text(cls, pairs: list[str] | None, info: ValidationInfo) -> list[str] | None:
        texts = info.data.get("texts")
        if pairs is not None and texts is not None and len(pairs) != len(texts):
            raise PydanticCustomError(
                "value_error",
                "{pairs} text_pairs for {texts} texts; send one second text per text",
                {"pairs": len(pairs), "texts": len(texts)},
            )
        return pairs


class Embedding(BaseModel):
    embedding: list[float] | list[int] | list[list[float]] | str = Field(
        description="The model's embedding: its pooling, Dense and Normalize modules, with "
        "this request's dimensions and normalize; integers with an embedding_type. A base64 "
        "string with encoding_format: base64. With token_embeddings, one vector per token."
    )
    truncated: bool = Field(description="The text was cut to the model's token limit.")


class SparseWeight(BaseModel):
    index: int = Field(description="The vocabulary entry (a token id: /decode names it).")
    value: float


class Sparse(BaseModel):
    sparse: list[SparseWeight] = Field(
        description="A sparse model's nonzero weights by vocabulary index (ascending): "
        "sentence-transformers' SparseEncoder.encode."
    )
    truncated: bool


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
    version: str = Field(description="The version of the model that answered.")
    request_id: str
    processing_time_ms: float = Field(description="Time in the server, admission to reply.")


class EmbeddingResponse(Embedding, PredictMeta):
    pass


class LabelResponse(Label, PredictMeta):
    pass


class SparseResponse(Sparse, PredictMeta):
    pass


class BatchResponse(PredictMeta):
    results: list[Embedding] | list[Label] | list[Sparse]


class Status(BaseModel):
    status: str
    detail: str | None = None


class ErrorReply(BaseModel):
    """Every error's shape."""

    detail: Any = Field(description="What was wrong; for 422 a list of {loc, msg, type}.")
    type: str = Field(description="A stable name: invalid_input, queue_full, ...")
    request_id: str | None


class TEIErrorReply(ErrorReply):
    """An error on TEI's routes: ours, with TEI's two fields."""

    error: str = Field(description="What was wrong (TEI's field).")
    error_type: str = Field(description="Validation, Overloaded, Unhealthy or Backend.")


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, ...")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="Our stable name: invalid_input, queue_full, ...")


class OpenAIErrorReply(BaseModel):
    """An error on `/v1/*`, in OpenAI's shape."""

    error: OpenAIError


def error_responses(reply: type[BaseModel], invalid_status: int = 422) -> dict[int | str, Any]:
    """The documented error replies of a route that computes, in its family's shape."""
    return {
        400: {"model": reply, "description": "Not JSON, the model does not do this task, "
              + ("or invalid input." if invalid_status == 400 else "(wrong_task).")},
        **({422: {"model": reply, "description": "JSON of the wrong shape, or over a limit."}}
           if invalid_status == 422 else {}),
        401: {"model": reply, "description": "API keys are set and none matched."},
        429: {"model": reply, "description": "Queue full, deadline unreachable, or rate "
              "limited; see Retry-After."},
        503: {"model": reply, "description": "Warming up or draining; see Retry-After."},
        504: {"model": reply, "description": "The deadline passed before it was computed."},
    }  # fmt: skip
