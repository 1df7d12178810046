"""Text models behind the engine: tokenize one input (or text pair) under its request's
options, collate a batch into padded tensors, run one forward pass, and split the outputs
back, finished per item (`batcher.models.heads`), once per batch."""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import numpy as np
import torch

from batcher.errors import DeviceOutOfMemory
from batcher.models.compiling import CompileState, compile_forward, graphs_compiled
from batcher.models.description import Dense
from batcher.models.heads import EmbeddingHead, finish_embeddings
from batcher.models.loading import Loaded, load
from batcher.models.options import CompileMode, LoadOptions, Task
from batcher.models.precision import PROBE_TEXTS, Precision, judge
from batcher.padding import bucket_length

logger = logging.getLogger("batcher.models")


@dataclass(frozen=True, slots=True)
class Options:
    """One request's choices about its outputs; None means "as the model declares"."""

    normalize: bool | None = None
    """embed: L2-normalise (default: whether the model ends with a Normalize module)."""
    prompt_name: str | None = None
    """embed: one of the model's prompts (default: its `default_prompt_name`, if any)."""
    prompt: str | None = None
    """embed: a prompt of the caller's own, put before the text."""
    dimensions: int | None = None
    """embed: keep the first N values (Matryoshka), then normalise if normalising."""
    raw_scores: bool = False
    """classify/rerank: the logits, without the head's activation."""


DEFAULT_OPTIONS = Options()


class InvalidOption(ValueError):
    """An option the model cannot honour; `field` names it, the message says what is
    allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized input: token ids with special tokens, truncated to the model's limit,
    and what its output must look like."""

    ids: list[int]
    truncated: bool
    type_ids: list[int] | None = None
    """Segment ids (0 for the text, 1 for its pair), for models that take them."""
    prompt_tokens: int = 0
    """Leading tokens (the prompt) that the model leaves out of its pooling."""
    dimensions: int | None = None
    normalize: bool = False
    raw_scores: bool = False

    def __reduce__(self) -> tuple[type[Encoded], tuple[object, ...]]:
        # Fast pickling to an engine process (batcher.remote): the constructor's arguments.
        return Encoded, (self.ids, self.truncated, self.type_ids, self.prompt_tokens,
                         self.dimensions, self.normalize, self.raw_scores)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Classification:
    label: str
    """The label with the highest score."""
    score: float
    scores: list[float]
    """Every label's score (probability, or logit with `raw_scores`), in the order of
    `TextModel.labels`."""


Output = list[float] | Classification
TruncationDirection = Literal["right", "left"]
WarmStep = Callable[[int, int, str], None]
"""Told of each warm-up shape before it runs: (step, steps, what)."""

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


Inputs = dict[str, torch.Tensor]
Forward = Callable[[Inputs, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class HostBatch:
    """A batch's padded inputs on the host (`TextModel.prepare`), before the device."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    pool_mask: torch.Tensor | None
    """The tokens to pool, where it differs from `attention_mask` (a prompt not pooled)."""


def _embed_forward(model: Any, head: EmbeddingHead) -> Forward:
    def forward(inputs: Inputs, pool_mask: torch.Tensor) -> torch.Tensor:
        hidden = model(**inputs).last_hidden_state
        out: torch.Tensor = head(hidden, inputs["attention_mask"], pool_mask)
        return out

    return forward


def _classify_forward(model: Any) -> Forward:
    def forward(inputs: Inputs, pool_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = model(**inputs).logits
        return logits.float()

    return forward


def _forward_of(loaded: Loaded) -> Forward:
    if loaded.task == "embed":
        assert loaded.head is not None, "an embedding model needs its head; this is a bug"
        return _embed_forward(loaded.model, loaded.head)
    return _classify_forward(loaded.model)


def _takes_type_ids(loaded: Loaded) -> bool:
    accepts = inspect.signature(loaded.model.forward).parameters
    names = getattr(loaded.tokenizer, "model_input_names", ())
    return "token_type_ids" in accepts and "token_type_ids" in names


class TextModel:
    """A loaded text model that implements `batcher.Model[Encoded, Output]`.

    `encode` is cheap and runs at submit; `predict` runs on the device worker thread.
    """

    def __init__(
        self,
        loaded: Loaded,
        *,
        compile: bool = True,
        compile_mode: CompileMode = "default",
        collate_ahead: bool | None = None,
    ) -> None:
        self.loaded = loaded
        self.name = loaded.name
        self.task: Task = loaded.task
        self.labels = loaded.labels
        self.max_tokens = loaded.max_tokens
        self.device = loaded.device
        self.description = loaded.description
        self.dimension = loaded.description.embedding_dimension if self.task == "embed" else None
        self._tokenizer = loaded.tokenizer.backend_tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=loaded.max_tokens)
        self._left_tokenizer: Any = None
        self._cut_chars: int | None = loaded.max_tokens * CUT_CHARS_PER_TOKEN
        self._cut_chars = self._cut_chars if self._cutting_is_exact() else None
        self._special_ids = set(getattr(loaded.tokenizer, "all_special_ids", ()))
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        self._pad_id = int(loaded.tokenizer.pad_token_id or 0)
        self._type_ids = _takes_type_ids(loaded)
        pooling = loaded.description.pooling
        self._prompt_pooled = pooling is None or pooling.include_prompt
        self._prompt_tokens: dict[str, int] = {}
        self._normalize = loaded.description.normalize
        self._eager: Forward = _forward_of(loaded)
        self._forward: Forward = self._eager
        self.compile_state = CompileState(requested=compile, mode=compile_mode)
        self._collate_ahead = collate_ahead
        self.warmed = False
        self.packed_outputs = False
        """Embeddings as float32 bytes (`batcher.models.wire`), for an engine process."""

    @property
    def precision(self) -> Precision:
        return self.loaded.precision

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.dtype

    @classmethod
    def load(cls, options: LoadOptions) -> TextModel:
        """Load `options`' model; with `dtype="auto"` on a CPU with native bfloat16,
        probe bfloat16 against float32 first and keep the one the probe allows."""
        ahead = {"auto": None, "on": True, "off": False}[options.collate_ahead]
        model = cls(
            load(options),
            compile=options.compile,
            compile_mode=options.compile_mode,
            collate_ahead=ahead,
        )
        if model.loaded.probe_dtype is not None:
            model._probe_precision(model.loaded.probe_dtype, options.min_accuracy)
        return model

    def _probe_precision(self, dtype: torch.dtype, min_accuracy: float) -> Precision:
        """Run the probe inputs in the current (float32) weights and in a `dtype` copy,
        eager, and keep the copy only if every output agrees within `min_accuracy`
        (`batcher.models.precision.judge`). Before warm-up only."""
        assert not self.warmed, "the precision is settled before warm-up; this is a bug"
        started = time.perf_counter()
        items = self._probe_items()
        reference = self._outputs(self._eager, items)
        lower: Any = copy.deepcopy(self.loaded.model)
        lower.to(dtype)
        candidate = self._outputs(_forward_of(replace(self.loaded, model=lower)), items)
        precision = judge(reference, candidate, dtype, min_accuracy)
        if precision.dtype == dtype:
            self.loaded = replace(self.loaded, model=lower, precision=precision, probe_dtype=None)
        else:
            self.loaded = replace(self.loaded, precision=precision, probe_dtype=None)
        del lower
        self._eager = self._forward = _forward_of(self.loaded)
        log = logger.info if precision.dtype == dtype else logger.warning
        log("precision %s (probe %.1fs): %s", precision.name, time.perf_counter() - started,
            precision.reason)  # fmt: skip
        return precision

    def _probe_items(self) -> list[Encoded]:
        texts = list(PROBE_TEXTS)
        if self.task == "rerank":
            return self.encode_many(texts, texts[1:] + texts[:1])
        return self.encode_many(texts)

    def _outputs(self, forward: Forward, items: Sequence[Encoded], chunk: int = 8) -> torch.Tensor:
        """`forward`'s raw outputs (pooled vectors, logits) for `items`, in float32."""
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(items), chunk):
                inputs, pool_mask = self.collate(items[start : start + chunk])
                outputs.append(forward(inputs, pool_mask).float().cpu())
        return torch.cat(outputs)

    # -- on the event loop ---------------------------------------------------------------

    def encode(
        self, text: str, pair: str | None = None, options: Options = DEFAULT_OPTIONS
    ) -> Encoded:
        """Tokenize one input (a text, or a text pair for classify/rerank) under
        `options`. Raises InvalidOption."""
        simple = options == DEFAULT_OPTIONS and pair is None and not self.description.default_prompt
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
        if self.task != "embed":
            for name in ("normalize", "prompt_name", "prompt", "dimensions"):
                if getattr(options, name) is not None:
                    raise InvalidOption(
                        name, f"{name} applies to embedding models; this is a {self.task} model"
                    )
            return "", {"raw_scores": options.raw_scores}
        if paired:
            raise InvalidOption(
                "text_pair",
                "this model embeds single texts; text pairs need a classify or rerank model",
            )
        if options.raw_scores:
            raise InvalidOption(
                "raw_scores", "raw_scores applies to classify and rerank models; this one embeds"
            )
        prompts = self.description.prompts
        if options.prompt is not None and options.prompt_name is not None:
            raise InvalidOption("prompt", "give prompt_name or prompt, not both")
        if options.prompt is not None:
            prompt = options.prompt
        elif options.prompt_name is not None:
            if options.prompt_name not in prompts:
                known = ", ".join(repr(p) for p in sorted(prompts)) or "none"
                raise InvalidOption(
                    "prompt_name",
                    f"unknown prompt {options.prompt_name!r}; this model's prompts: {known} "
                    "(or send your own in `prompt`)",
                )
            prompt = prompts[options.prompt_name]
        else:
            prompt = self.description.default_prompt
        dims = options.dimensions
        if dims is not None and not (self.dimension is not None and 1 <= dims <= self.dimension):
            raise InvalidOption(
                "dimensions", f"dimensions must be between 1 and {self.dimension}, got {dims}"
            )
        normalize = self.description.normalize if options.normalize is None else options.normalize
        return prompt, {"dimensions": dims, "normalize": normalize}

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

    # -- on the device worker -------------------------------------------------------------

    def prepare(self, items: Sequence[Encoded]) -> HostBatch:
        """The batch's inputs on the host: padded to a bucket, in pinned memory when the
        model runs on CUDA (so that the copies to the device need not wait). Touches no
        device: the engine may call it on the collate thread while the device thread
        runs the batch before (`collates_ahead`)."""
        rows, pinned = len(items), self.device.type == "cuda"
        length = bucket_length(max(len(item.ids) for item in items), cap=self.max_tokens)

        def buffer(fill: int) -> tuple[torch.Tensor, np.ndarray[Any, Any]]:
            if not pinned:  # numpy's allocation is the cheaper one (13 against 31 µs)
                array = np.full((rows, length), fill, dtype=np.int64)
                return torch.from_numpy(array), array
            tensor = torch.full((rows, length), fill, dtype=torch.int64, pin_memory=True)
            return tensor, tensor.numpy()

        ids, ids_view = buffer(self._pad_id)
        mask, mask_view = buffer(0)
        types, types_view = buffer(0) if self._type_ids else (None, None)
        pool, pool_view = buffer(0) if not self._prompt_pooled else (None, None)
        for row, item in enumerate(items):
            n = len(item.ids)
            ids_view[row, :n] = item.ids
            mask_view[row, :n] = 1
            if types_view is not None and item.type_ids is not None:
                types_view[row, : len(item.type_ids)] = item.type_ids
            if pool_view is not None:
                pool_view[row, item.prompt_tokens : n] = 1
        return HostBatch(ids, mask, types, pool)

    def collate(self, items: Sequence[Encoded]) -> tuple[Inputs, torch.Tensor]:
        """The model's inputs as padded tensors on the device (length rounded up to a
        bucket), and the mask of the tokens to pool."""
        return self._to_device(self.prepare(items))

    def _to_device(self, host: HostBatch) -> tuple[Inputs, torch.Tensor]:
        """The prepared inputs on the model's device; from pinned memory, the copies are
        queued behind the running kernels and the thread goes on at once."""
        device, non_blocking = self.device, self.device.type == "cuda"
        inputs = {
            "input_ids": host.input_ids.to(device, non_blocking=non_blocking),
            "attention_mask": host.attention_mask.to(device, non_blocking=non_blocking),
        }
        if host.token_type_ids is not None:
            inputs["token_type_ids"] = host.token_type_ids.to(device, non_blocking=non_blocking)
        if host.pool_mask is None:
            return inputs, inputs["attention_mask"]
        return inputs, host.pool_mask.to(device, non_blocking=non_blocking)

    @property
    def collates_ahead(self) -> bool:
        """Whether the engine prepares a batch while the one before still computes: set
        by `--collate-ahead`; by default on CUDA, where the device thread mostly waits
        for the kernels, not on a CPU, where the forward pass has the cores."""
        return self.device.type == "cuda" if self._collate_ahead is None else self._collate_ahead

    def predict(self, items: Sequence[Encoded]) -> list[Output]:
        """One forward pass for the whole batch; one host copy per batch, and one `tolist`
        per batch (per group of items with the same options)."""
        return self.predict_prepared(items, self.prepare(items))

    def predict_prepared(self, items: Sequence[Encoded], prepared: object) -> list[Output]:
        """`predict(items)` from `prepare(items)`'s result, made ahead on another thread."""
        assert isinstance(prepared, HostBatch), "prepared by another model; this is a bug"
        out_of_memory = False
        try:
            inputs, pool_mask = self._to_device(prepared)
            with torch.inference_mode(), torch.compiler.set_stance(self.compile_state.stance):
                out = self._forward(inputs, pool_mask)
        except torch.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:
            # Raised outside the handler, so that no traceback keeps the failed pass's
            # tensors alive; the engine splits the batch and retries the halves.
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise DeviceOutOfMemory(f"a batch of {len(items)} did not fit on {self.device}")
        host = out.cpu()
        if self.task == "embed":
            dims, norms = [i.dimensions for i in items], [i.normalize for i in items]
            # Packed (for an engine process), each embedding is bytes until the
            # front-end unpacks it (`batcher.models.wire`).
            finished = finish_embeddings(host, dims, norms, self.packed_outputs)
            return cast("list[Output]", finished)
        return self._classifications(host, [i.raw_scores for i in items])

    def _classifications(self, logits: torch.Tensor, raw: Sequence[bool]) -> list[Output]:
        """One `tolist` of the logits and one of the activated scores, each only when
        some item asked for it."""
        assert self.loaded.score is not None, "a classifier needs its activation; this is a bug"
        best = logits.argmax(dim=-1).tolist()
        logit_rows = logits.tolist() if any(raw) else []
        score_rows = self.loaded.score(logits).tolist() if not all(raw) else []
        out: list[Output] = []
        for row, (label, is_raw) in enumerate(zip(best, raw, strict=True)):
            scores = logit_rows[row] if is_raw else score_rows[row]
            out.append(Classification(self.labels[label], scores[label], scores))
        return out

    def warm_up(self, max_batch_size: int, on_step: WarmStep | None = None) -> None:
        """Compile (when asked) and run every kind of shape that can occur, so that no
        request ever triggers a compile. Falls back to eager, with a warning, if
        compiling fails. Called again with a larger `max_batch_size` (a live change of
        the limit), it runs the new shapes only, compiling what they need now rather than
        when a request meets them. `on_step(step, steps, what)` hears of each shape
        before it runs (on this thread), and each is logged with the time so far."""
        if self.warmed:
            self._warm_more(max_batch_size)
            return
        started = time.perf_counter()
        try:
            if self.compile_state.requested:
                self._forward = compile_forward(self._eager, self.compile_state)
            self._run_shapes(max_batch_size, on_step, started)
        except Exception as exc:
            if self._forward is self._eager:
                raise
            logger.warning("torch.compile failed (%s: %s); running eager", type(exc).__name__, exc)
            self.compile_state.fail(exc)
            self._forward = self._eager
            self._run_shapes(max_batch_size, on_step, started)
        self.compile_state.finish_warm_up()
        self.warmed = True
        logger.info("warm-up done in %.1fs (%s)", time.perf_counter() - started, self.compile_state)

    def _warm_more(self, max_batch_size: int) -> None:
        state = self.compile_state
        before, stance = graphs_compiled(), state.stance
        state.stance = "default"
        try:
            self._run_shapes(max_batch_size)
        finally:
            state.stance = stance
            if state.graphs_at_warm_up is not None:
                # Graphs made here were made on purpose: they are not request recompiles.
                state.graphs_at_warm_up += graphs_compiled() - before
        logger.info("warmed batches of up to %d", max_batch_size)

    def _run_shapes(
        self, max_batch_size: int, on_step: WarmStep | None = None, started: float | None = None
    ) -> None:
        # With dynamic shapes one graph serves every (batch, length); these calls make any
        # specialisation (batch of 1, the longest bucket) happen now rather than later.
        sizes = sorted({2, 1, max_batch_size})
        lengths = sorted({16, 8, self.max_tokens})
        shapes = [(size, length) for size in sizes for length in lengths]
        for step, (size, length) in enumerate(shapes, start=1):
            what = f"batch {size} x {length} tokens"
            if on_step is not None:
                on_step(step, len(shapes), what)
            if started is not None:
                elapsed = time.perf_counter() - started
                logger.info("warm-up %d/%d: %s, %.1fs so far", step, len(shapes), what, elapsed)
            items = [Encoded([self._pad_id + 1] * length, False)] * size
            self.predict(items)

    def describe(self) -> dict[str, object]:
        """What `/model` shows: the task, and how outputs are computed."""
        described: dict[str, object] = {
            "name": self.name,
            "task": self.task,
            "device": str(self.device),
            "dtype": self.precision.name,
            "precision": self.precision.describe(),
            "max_tokens": self.max_tokens,
            "labels": list(self.labels),
            "compile": self.compile_state.describe(),
            "collate_ahead": self.collates_ahead,
            "description": self.description.kind,
        }
        if self.task == "embed":
            d = self.description
            assert d.pooling is not None
            described |= {
                "pooling": list(d.pooling.modes),
                "pooling_includes_prompt": d.pooling.include_prompt,
                "dense": [
                    {"in": s.in_features, "out": s.out_features, "activation": s.activation}
                    for s in d.steps
                    if isinstance(s, Dense)
                ],
                "normalize": d.normalize,
                "dimension": self.dimension,
                "prompts": dict(d.prompts),
                "default_prompt_name": d.default_prompt_name,
            }
        else:
            described |= {"head_activation": self.loaded.activation, "text_pairs": True}
        return described
