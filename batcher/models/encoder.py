"""The text encoder: a model's tokenizer, prompts, truncation and token limits, without
torch or transformers.

It is the HTTP side of the seam: requests' texts become `Encoded` token ids here, and the
engine (in this process or another) receives only those. The engine process builds the
encoder from the model it loaded (`TextModel.encoder`) and sends it to each front-end
once; it pickles as its `EncoderSpec`, plain data and the tokenizer's own JSON, so that a
front-end needs the `tokenizers` library and nothing of torch to cut and tokenize exactly
as the model's own tokenizer does."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from tokenizers import Tokenizer

from batcher.models.chunking import Chunks, Wrapping, windows
from batcher.models.inputs import DEFAULT_OPTIONS, Encoded, InvalidOption, Options
from batcher.models.options import Task
from batcher.models.probe import PROBE_TEXTS
from batcher.models.quantize import Calibration
from batcher.models.static_sparse import StaticQuery, StaticSparse

logger = logging.getLogger("batcher.models")


TruncationDirection = Literal["right", "left"]

CUT_CHARS_PER_TOKEN = 8
"""A single text longer than `max_tokens` x this many characters is cut, at a space,
before it is tokenized: the tokenizer's cost grows with the whole text, not with the
tokens kept. If the cut text no longer overflows the limit, the whole text is tokenized
after all, so the ids are always those of the whole text truncated."""


@dataclass(frozen=True, slots=True)
class Token:
    """One token of a tokenized text, as TEI's `/tokenize` shows it."""

    id: int
    text: str
    """The characters of the input it covers; a special token's own text ([CLS])."""
    special: bool
    start: int | None
    """Character offsets in the input; None for special tokens."""
    stop: int | None


def _cut_at_space(text: str, chars: int, direction: TruncationDirection) -> str:
    """The first (or, cutting from the left, the last) `chars` characters of `text`,
    ending (starting) at a space when there is one in the second half of the piece."""
    if direction == "right":
        space = text.rfind(" ", chars // 2, chars)
        return text[: space if space > 0 else chars]
    start = len(text) - chars
    space = text.find(" ", start, start + chars // 2)
    return text[space + 1 if space >= 0 else start :]


@dataclass(frozen=True, slots=True)
class EncoderSpec:
    """What a `TextEncoder` is made of: the model's tokenizer (its JSON, as
    `tokenizer.json` holds it, with the model's own changes such as lowercasing) and
    what the model declares about its inputs and outputs. Plain data: it crosses to
    front-end processes."""

    name: str
    task: Task
    tokenizer_json: str
    max_tokens: int
    labels: tuple[str, ...] = ()
    type_ids: bool = False
    """Whether the model takes segment ids (`token_type_ids`)."""
    special_ids: frozenset[int] = frozenset()
    normalize: bool = False
    """embed: whether the model ends with a Normalize module."""
    prompts: Mapping[str, str] = field(default_factory=dict)
    default_prompt: str = ""
    prompt_pooled: bool = True
    """embed: whether pooling includes the prompt's tokens."""
    dimension: int | None = None
    """embed: the embedding's size."""
    calibration: bytes = b""
    """embed: the raw float32 outputs of the calibration texts (`batcher.models.quantize`),
    whose ranges int8 and uint8 outputs are quantized by."""
    calibration_source: str = ""
    static_query: StaticQuery | None = None
    """sparse, inference-free: the table and tokenizer queries take instead of the model."""


class Encoder(Protocol):
    """What the HTTP side needs of a model: its name, task, labels and token limit, and
    its inputs turned into `Encoded` items. `TextEncoder` is the real one."""

    name: str
    task: Task
    labels: tuple[str, ...]
    max_tokens: int
    calibration: Calibration | None
    """embed: the fixed ranges of int8 and uint8 outputs; None: the model has none."""
    prompts: Mapping[str, str]
    """embed: the model's prompts by name."""
    static: StaticSparse | None
    """sparse, inference-free: computes queries without the model."""

    def encode_many(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        options: Options = ...,
        truncation_direction: TruncationDirection = "right",
    ) -> list[Encoded]:
        """Raises InvalidOption for options the model cannot honour."""
        ...

    def encode_ids(
        self, sequences: Sequence[Sequence[int]], options: Options = ...
    ) -> list[Encoded]:
        """Inputs given as token ids, used as they are. Raises InvalidOption."""
        ...

    def decode(self, ids: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """Each sequence of token ids as text (TEI's /decode). Raises InvalidOption for an
        id outside the vocabulary."""
        ...

    def chunk(self, text: str, options: Options = ...) -> Chunks:
        """A long text as windows that each fit the model (`batcher.models.chunking`)."""
        ...

    def static_queries(self, texts: Sequence[str], options: Options = ...) -> list[Encoded]:
        """Queries of an inference-free sparse model, tokenized for its static table."""
        ...

    def tokenize(
        self, texts: Sequence[str], add_special_tokens: bool = True, prompt_name: str | None = None
    ) -> list[list[Token]]: ...


class TextEncoder:
    """A model's tokenizer under the model's rules (`batcher.models.encoder.Encoder`):
    prompts, truncation from either side, segment ids, the ids' range. Pickles as its
    spec."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.task = spec.task
        self.labels = spec.labels
        self.max_tokens = spec.max_tokens
        self.dimension = spec.dimension
        self.prompts = spec.prompts
        self.static: StaticSparse | None = None
        if spec.static_query is not None:
            self.static = StaticSparse(spec.static_query)
        self.calibration: Calibration | None = None
        if spec.calibration and spec.dimension is not None:
            self.calibration = Calibration(
                spec.calibration, spec.dimension, spec.calibration_source
            )
        self._tokenizer = Tokenizer.from_str(spec.tokenizer_json)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=spec.max_tokens)
        self._left_tokenizer: Any = None
        self._whole: Any = None
        self._wrapping: Wrapping | None = None
        self._special_ids = spec.special_ids
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        self._type_ids = spec.type_ids
        self._prompt_pooled = spec.prompt_pooled
        self._prompt_tokens: dict[str, int] = {}
        self._normalize = spec.normalize
        self._cut_chars: int | None = spec.max_tokens * CUT_CHARS_PER_TOKEN
        self._cut_chars = self._cut_chars if self._cutting_is_exact() else None

    def __reduce__(self) -> tuple[type[TextEncoder], tuple[EncoderSpec]]:
        return TextEncoder, (self.spec,)

    def encode(
        self, text: str, pair: str | None = None, options: Options = DEFAULT_OPTIONS
    ) -> Encoded:
        """Tokenize one input (a text, or a text pair for classify/rerank) under
        `options`. Raises InvalidOption."""
        simple = options == DEFAULT_OPTIONS and pair is None and not self.spec.default_prompt
        if simple and (self._cut_chars is None or len(text) <= self._cut_chars):
            encoding = self._tokenizer.encode(text)  # the common case, without the checks
            return Encoded(encoding.ids, bool(encoding.overflowing), normalize=self._normalize)
        return self.encode_many([text], None if pair is None else [pair], options)[0]

    def encode_many(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        options: Options = DEFAULT_OPTIONS,
        truncation_direction: TruncationDirection = "right",
    ) -> list[Encoded]:
        """`encode` for several inputs in one call of the Rust tokenizer. An input over
        the limit loses its end (or, with `truncation_direction="left"`, its start)."""
        prompt, fields = self._resolve(options, pairs is not None)
        tokenizer = self._tokenizer if truncation_direction == "right" else self._left()
        if pairs is not None:
            encodings = tokenizer.encode_batch(list(zip(texts, pairs, strict=True)))
        elif prompt:
            encodings = self._cut_and_encode(tokenizer, [prompt + t for t in texts],
                                             truncation_direction)  # fmt: skip
        else:
            encodings = self._cut_and_encode(tokenizer, list(texts), truncation_direction)
        prompt_tokens = 0 if self._prompt_pooled or not prompt else self._prompt_length(prompt)
        return [
            Encoded(
                e.ids,
                bool(e.overflowing),
                type_ids=e.type_ids if self._type_ids else None,
                prompt_tokens=prompt_tokens,
                **fields,
            )
            for e in encodings
        ]

    def _cutting_is_exact(self) -> bool:
        """Whether cutting long texts at a space gives the same ids as tokenizing them
        whole, for this tokenizer (true of whitespace-splitting ones such as WordPiece,
        byte-level BPE and Metaspace); checked once, at load, on long probe texts."""
        probe = " ".join(PROBE_TEXTS) + " "
        cut = self._cut_chars
        assert cut is not None
        texts = [(probe * (2 + cut // len(probe)))[: cut * 3 // 2 + shift] for shift in range(3)]
        right, left = self._tokenizer, self._left()
        sides: tuple[tuple[Any, TruncationDirection], ...] = ((right, "right"), (left, "left"))
        for text in texts:
            for tokenizer, direction in sides:
                whole = tokenizer.encode(text).ids
                [kept] = self._cut_and_encode(tokenizer, [text], direction)
                if kept.ids != whole:
                    logger.info("tokenizing long texts whole: cutting changes this tokenizer's ids")
                    return False
        return True

    def _cut_and_encode(
        self, tokenizer: Any, texts: list[str], direction: TruncationDirection
    ) -> list[Any]:
        """`tokenizer.encode_batch(texts)`, with texts over the cut length cut first (see
        CUT_CHARS_PER_TOKEN); those whose cut no longer overflows are tokenized whole."""
        cut = self._cut_chars
        if cut is None or all(len(t) <= cut for t in texts):
            return list(tokenizer.encode_batch(texts))
        cuts = [t if len(t) <= cut else _cut_at_space(t, cut, direction) for t in texts]
        encodings = list(tokenizer.encode_batch(cuts))
        redo = [i for i, e in enumerate(encodings) if cuts[i] is not texts[i] and not e.overflowing]
        if redo:
            for i, e in zip(redo, tokenizer.encode_batch([texts[i] for i in redo]), strict=True):
                encodings[i] = e
        return encodings

    def _left(self) -> Any:
        """A copy of the tokenizer that cuts over-long inputs from the left."""
        if self._left_tokenizer is None:
            left = type(self._tokenizer).from_str(self._tokenizer.to_str())
            left.no_padding()
            left.enable_truncation(max_length=self.max_tokens, direction="left")
            self._left_tokenizer = left
        return self._left_tokenizer

    def encode_ids(
        self, sequences: Sequence[Sequence[int]], options: Options = DEFAULT_OPTIONS
    ) -> list[Encoded]:
        """Inputs given as token ids, used as they are: no special tokens are added and
        no prompt is put before them (ids from `tokenize` with special tokens give the
        text's own vector). Cut to the model's limit. Raises InvalidOption for an id
        outside the vocabulary, or a prompt asked for."""
        if options.prompt is not None or options.prompt_name is not None:
            raise InvalidOption("input", "prompts apply to texts, not to token ids")
        _, fields = self._resolve(options, paired=False)
        encoded = []
        for index, ids in enumerate(sequences):
            bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
            if bad is not None:
                raise InvalidOption(
                    "input",
                    f"input {index}: token id {bad} is outside the vocabulary "
                    f"(0 to {self.vocab_size - 1})",
                )
            kept = list(ids[: self.max_tokens])
            type_ids = [0] * len(kept) if self._type_ids else None
            encoded.append(Encoded(kept, len(ids) > len(kept), type_ids=type_ids, **fields))
        return encoded

    def decode(self, ids: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """Each sequence of token ids as text (TEI's /decode). Raises InvalidOption for an
        id outside the vocabulary."""
        for sequence in ids:
            for tid in sequence:
                if not 0 <= tid < self.vocab_size:
                    raise InvalidOption(
                        "ids",
                        f"token id {tid} is outside the vocabulary (0 to {self.vocab_size - 1})",
                    )
        return list(
            self._tokenizer.decode_batch(
                [list(s) for s in ids], skip_special_tokens=skip_special_tokens
            )
        )

    def chunk(self, text: str, options: Options = DEFAULT_OPTIONS) -> Chunks:
        """`text` as consecutive windows that each fit the model's limit
        (`batcher.models.chunking`): special tokens, the prompt's tokens, a run of the
        text's tokens; raw outputs asked for (no cut, no normalisation), which the caller
        combines. Raises InvalidOption."""
        prompt, _ = self._resolve(options, paired=False)
        if self._wrapping is None:
            self._whole = Tokenizer.from_str(self.spec.tokenizer_json)
            self._whole.no_truncation()
            self._whole.no_padding()
            try:
                self._wrapping = Wrapping.of(self._whole)
            except ValueError as exc:
                message = f"this model's texts cannot be chunked: {exc}"
                raise InvalidOption("chunking", message) from None
        before, after = self._wrapping.before, self._wrapping.after
        prompt_ids = self._whole.encode(prompt, add_special_tokens=False).ids if prompt else []
        size = self.max_tokens - len(before) - len(after) - len(prompt_ids)
        if size < 1:
            raise InvalidOption("chunking", "the prompt leaves no room for the text in a window")
        content = self._whole.encode(text, add_special_tokens=False).ids
        pooled_from = 0 if self._prompt_pooled or not prompt else len(before) + len(prompt_ids)
        out, weights = [], []
        for run in windows(content, size):
            ids = [*before, *prompt_ids, *run, *after]
            type_ids = [0] * len(ids) if self._type_ids else None
            out.append(Encoded(ids, False, type_ids=type_ids, prompt_tokens=pooled_from))
            weights.append(len(run))
        return Chunks(out, weights)

    def static_queries(
        self, texts: Sequence[str], options: Options = DEFAULT_OPTIONS
    ) -> list[Encoded]:
        """Queries of an inference-free sparse model (`static` is set), tokenized for its
        static table under the request's prompt and `top_k`. Raises InvalidOption."""
        assert self.static is not None, "only an inference-free sparse model; a bug"
        prompt, fields = self._resolve(options, paired=False)
        return self.static.encode(texts, prompt, fields["top_k"])

    def tokenize(
        self, texts: Sequence[str], add_special_tokens: bool = True, prompt_name: str | None = None
    ) -> list[list[Token]]:
        """Each text's tokens, as `encode` would feed them to the model (prompt included,
        cut to the model's limit). Raises InvalidOption for an unknown prompt."""
        prompt, _ = self._resolve(Options(prompt_name=prompt_name), paired=False)
        inputs = [prompt + t for t in texts]
        encodings = self._tokenizer.encode_batch(inputs, add_special_tokens=add_special_tokens)
        out = []
        for text, e in zip(inputs, encodings, strict=True):
            tokens = []
            for tid, token, (start, stop), special in zip(
                e.ids, e.tokens, e.offsets, e.special_tokens_mask, strict=True
            ):
                if special:
                    tokens.append(Token(tid, token, True, None, None))
                else:
                    tokens.append(Token(tid, text[start:stop], False, start, stop))
            out.append(tokens)
        return out

    def _resolve(self, options: Options, paired: bool) -> tuple[str, dict[str, Any]]:
        """The prompt text and the output fields of `Encoded`, or InvalidOption."""
        task = self.task
        if options.token_embeddings and task != "embed":
            raise InvalidOption(
                "token_embeddings", f"token vectors come from embedding models; this is a "
                f"{task} model",
            )  # fmt: skip
        if options.top_k is not None and task != "sparse":
            raise InvalidOption("top_k", f"top_k applies to sparse models; this is a {task} model")
        if task in ("classify", "rerank"):
            for name in ("normalize", "prompt_name", "prompt", "dimensions"):
                if getattr(options, name) is not None:
                    raise InvalidOption(
                        name, f"{name} applies to embedding models; this is a {task} model"
                    )
            return "", {"raw_scores": options.raw_scores}
        if paired:
            raise InvalidOption(
                "text_pair",
                "this model embeds single texts; text pairs need a classify or rerank model",
            )
        if options.raw_scores:
            which = "this one embeds" if task == "embed" else f"this is a {task} model"
            raise InvalidOption(
                "raw_scores", f"raw_scores applies to classify and rerank models; {which}"
            )
        if task == "sparse" or options.token_embeddings:
            what = "sparse vectors" if task == "sparse" else "token vectors"
            for name in ("normalize", "dimensions"):
                if getattr(options, name) is not None:
                    raise InvalidOption(name, f"{name} applies to pooled embeddings, not to {what}")
        prompt = self._prompt(options)
        if task == "sparse":
            if options.top_k is not None and options.top_k < 1:
                raise InvalidOption("top_k", f"top_k must be at least 1, got {options.top_k}")
            return prompt, {"top_k": options.top_k}
        dims = options.dimensions
        if dims is not None and not (self.dimension is not None and 1 <= dims <= self.dimension):
            raise InvalidOption(
                "dimensions", f"dimensions must be between 1 and {self.dimension}, got {dims}"
            )
        normalize = self.spec.normalize if options.normalize is None else options.normalize
        if options.token_embeddings:
            return prompt, {"tokens": True}
        return prompt, {"dimensions": dims, "normalize": normalize}

    def _prompt(self, options: Options) -> str:
        """The text put before the input: the request's own, one of the model's by name,
        or the model's default (often none)."""
        prompts = self.spec.prompts
        if options.prompt is not None and options.prompt_name is not None:
            raise InvalidOption("prompt", "give prompt_name or prompt, not both")
        if options.prompt is not None:
            return options.prompt
        if options.prompt_name is None:
            return self.spec.default_prompt
        if options.prompt_name not in prompts:
            known = ", ".join(repr(p) for p in sorted(prompts)) or "none"
            raise InvalidOption(
                "prompt_name",
                f"unknown prompt {options.prompt_name!r}; this model's prompts: {known} "
                "(or send your own in `prompt`)",
            )
        return prompts[options.prompt_name]

    def _prompt_length(self, prompt: str) -> int:
        """The prompt's tokens as sentence-transformers counts them: the prompt alone,
        tokenized, less a trailing special token (SEP, EOS)."""
        length = self._prompt_tokens.get(prompt)
        if length is None:
            ids = self._tokenizer.encode(prompt).ids
            length = len(ids) - (1 if ids and ids[-1] in self._special_ids else 0)
            if len(self._prompt_tokens) < 1024:  # callers may send prompts of their own
                self._prompt_tokens[prompt] = length
        return length

    def cost(self, item: Encoded) -> int:
        return len(item.ids)
