"""A text model that computes nothing: the server's tests run on it, and the lab measures
the server's own cost with it (`benchmarks.lab.overhead`, `benchmarks.lab.engine_cpu`).

`NullModel` has what the engine side asks of a model (`server.host.ServedModel`), and
its `encoder` (`NullEncoder`) what the HTTP side asks of one; no torch behind either. It
embeds in one of two ways:

- read back (the default): a text's ids are its characters' code points, so a forward
  pass reads its texts back and answers `checksum_embedding` of each, or a label, `long`
  or `short`: a result handed to the wrong caller shows. Tests hold it back with its
  gates, poison it, and read what it computed (`batches`, `seen`, `warmed`).
- fixed (`embedding` given; the lab's studies): every text embeds as that vector, at
  once, and is tokenized as a real tokenizer counts it (a token per four characters, and
  two special ones), so that what crosses to an engine process has a real model's size;
  its ids are all 1, never read back (`seen` and `poison` are unused).

With `packed_outputs` (set in an engine process, as on `batcher.models.TextModel`), an
embedding is its row's float32 bytes, cut from one array per batch by the function a real
model uses.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from batcher.models import (
    DEFAULT_OPTIONS,
    Calibration,
    Chunks,
    Classification,
    Encoded,
    InvalidOption,
    Options,
    Output,
    StaticSparse,
    Task,
    Token,
    TruncationDirection,
)


def checksum_embedding(text: str) -> list[float]:
    """What the null model answers for `text` when it reads texts back: [length, checksum]."""
    return [float(len(text)), float(sum(map(ord, text)) % 997)]


@dataclass
class NullEncoder:
    """The null model's `batcher.models.Encoder`: a text's ids are its characters' code
    points (or, for a model with a fixed embedding, ones, a token per four characters and
    two special ones), cut at `max_tokens`."""

    task: Task = "embed"
    name: str = "null"
    labels: tuple[str, ...] = ("short", "long")
    max_tokens: int = 256
    fixed: bool = False
    calibration: Calibration | None = None
    prompts: Mapping[str, str] = field(default_factory=dict)
    static: StaticSparse | None = None

    def encode(
        self, text: str, pair: str | None = None, options: Options = DEFAULT_OPTIONS
    ) -> Encoded:
        if options.prompt_name is not None:
            raise InvalidOption("prompt_name", "the null model has no prompts")
        if options.token_embeddings:
            raise InvalidOption("token_embeddings", "the null model has no token vectors")
        if pair is not None:  # a pair reads as the two texts, a space between
            text = f"{text} {pair}"
        if self.fixed:
            count = len(text) // 4 + 2
            return Encoded([1] * min(count, self.max_tokens), truncated=count > self.max_tokens)
        return Encoded([ord(c) for c in text[: self.max_tokens]], len(text) > self.max_tokens)

    def encode_many(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        options: Options = DEFAULT_OPTIONS,
        truncation_direction: TruncationDirection = "right",
    ) -> list[Encoded]:
        if pairs is None:
            return [self.encode(t, None, options) for t in texts]
        return [self.encode(t, p, options) for t, p in zip(texts, pairs, strict=True)]

    def chunk(self, text: str, options: Options = DEFAULT_OPTIONS) -> Chunks:
        """Windows of `max_tokens` code points, combined by the server as a real model's."""
        ids = [ord(c) for c in text]
        runs = [ids[i : i + self.max_tokens] for i in range(0, len(ids), self.max_tokens)]
        return Chunks([Encoded(run, False) for run in runs], [len(run) for run in runs])

    def static_queries(
        self, texts: Sequence[str], options: Options = DEFAULT_OPTIONS
    ) -> list[Encoded]:
        raise InvalidOption("input_type", "the null model has no static query table")

    def encode_ids(
        self, sequences: Sequence[Sequence[int]], options: Options = DEFAULT_OPTIONS
    ) -> list[Encoded]:
        """Token ids used as they are (code points, where texts are read back); an id
        that is not a code point is refused, as a real model refuses one outside its
        vocabulary."""
        if options.token_embeddings:
            raise InvalidOption("token_embeddings", "the null model has no token vectors")
        for sequence in sequences:
            for tid in sequence:
                if not 0 <= tid <= sys.maxunicode:
                    raise InvalidOption("input", f"token id {tid} is not in the vocabulary")
        limit = self.max_tokens
        return [Encoded(list(ids[:limit]), truncated=len(ids) > limit) for ids in sequences]

    def decode(self, ids: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """Code points back to text (the ids `encode_ids` reads)."""
        for sequence in ids:
            for tid in sequence:
                if not 0 <= tid <= sys.maxunicode or 0xD800 <= tid <= 0xDFFF:
                    raise InvalidOption("ids", f"token id {tid} is not a code point")
        return ["".join(map(chr, sequence)) for sequence in ids]

    def tokenize(
        self, texts: Sequence[str], add_special_tokens: bool = True, prompt_name: str | None = None
    ) -> list[list[Token]]:
        if self.fixed:  # one token a text: nothing reads them
            return [[Token(1, t, False, 0, len(t))] for t in texts]
        limit = self.max_tokens
        return [[Token(ord(c), c, False, i, i + 1) for i, c in enumerate(t[:limit])] for t in texts]


@dataclass
class NullModel:
    """Embeds a text as `checksum_embedding(text)` (or as `embedding`, if given), or
    classifies it as `long` or `short`, at once.

    `warm_gate` blocks warm-up until it is set; `predict_gate` blocks forward passes
    (`entered` is set once one has started); `poison` makes any batch holding it raise;
    `batches` records the size of every forward pass, `seen` every text computed,
    `warmed` the batch size of every warm-up. The gates start open."""

    task: Task = "embed"
    name: str = "null"
    labels: tuple[str, ...] = ("short", "long")
    max_tokens: int = 256
    embedding: list[float] | None = None
    """Every text's embedding, when given; see the module's docstring."""
    packed_outputs: bool = False
    warm_gate: threading.Event = field(default_factory=threading.Event)
    warm_entered: threading.Event = field(default_factory=threading.Event)
    predict_gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    poison: str = "boom"
    batches: list[int] = field(default_factory=list)
    warmed: list[int] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)
    _row: Any = field(default=None, init=False, repr=False, compare=False)
    """`embedding` as a [1, D] tensor, for packing."""

    def __post_init__(self) -> None:
        if self.embedding is not None and self.task != "embed":
            raise ValueError(f"a fixed embedding needs task 'embed', got task {self.task!r}")
        self.warm_gate.set()
        self.predict_gate.set()
        if self.packed_outputs:
            self._prepare_packing()

    @property
    def encoder(self) -> NullEncoder:
        """What the HTTP side encodes with: a copy of this model's input rules, plain
        data (it crosses to the front-ends of `--workers N`)."""
        return NullEncoder(self.task, self.name, self.labels, self.max_tokens,
                           fixed=self.embedding is not None)  # fmt: skip

    def cost(self, item: Encoded) -> int:
        return len(item.ids)

    def predict(self, items: Sequence[Encoded]) -> list[Output]:
        self.entered.set()
        if not self.predict_gate.wait(timeout=30):
            raise TimeoutError("the test never released predict_gate")
        self.batches.append(len(items))
        if self.embedding is not None:
            if self.packed_outputs:
                return self._packed(self._fixed_rows(len(items)))
            return [self.embedding] * len(items)
        texts = ["".join(map(chr, item.ids)) for item in items]
        self.seen.extend(texts)
        if any(self.poison in t for t in texts):
            raise ValueError("poisoned batch")
        if self.task == "embed":
            vectors: list[Output] = [checksum_embedding(t) for t in texts]
            if self.packed_outputs:
                import torch

                return self._packed(torch.tensor(vectors))
            return vectors
        out: list[Output] = []
        for t in texts:
            p_long = min(len(t) / 20.0, 1.0)
            label = "long" if p_long > 0.5 else "short"
            out.append(Classification(label, max(p_long, 1 - p_long), [1 - p_long, p_long]))
        return out

    def _prepare_packing(self) -> None:
        """Import torch and make `embedding`'s row now: in the first batch, the import
        (seconds) would stall the device thread of a run being measured."""
        import torch

        import batcher.models.heads  # noqa: F401

        if self.embedding is not None and self._row is None:
            self._row = torch.tensor([self.embedding])

    def _fixed_rows(self, n: int) -> Any:
        """`embedding` n times, as one [n, D] tensor ("the forward pass's output")."""
        if self._row is None:
            self._prepare_packing()
        return self._row.expand(n, -1)

    def _packed(self, vectors: Any) -> list[Output]:
        """Each row's float32 bytes, as `TextModel.packed_outputs` gives them."""
        from batcher.models.heads import finish_embeddings

        n = vectors.shape[0]
        packed = finish_embeddings(vectors, [None] * n, [False] * n, packed=True)
        return packed  # type: ignore[return-value]

    def warm_up(
        self, max_batch_size: int, on_step: Callable[[int, int, str], None] | None = None
    ) -> None:
        if on_step is not None:
            on_step(1, 1, f"batch {max_batch_size}")
        if self.packed_outputs:
            self._prepare_packing()
        self.warm_entered.set()
        if not self.warm_gate.wait(timeout=30):
            raise TimeoutError("the test never released warm_gate")
        self.warmed.append(max_batch_size)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "task": self.task, "device": "cpu", "labels": list(self.labels)}
