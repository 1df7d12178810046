"""A fake text model for in-process server tests: no torch, outputs derived from input."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from batcher.models import (
    DEFAULT_OPTIONS,
    Classification,
    Encoded,
    InvalidOption,
    Options,
    Output,
    Task,
    Token,
    TruncationDirection,
)


def fake_embedding(text: str) -> list[float]:
    return [float(len(text)), float(sum(map(ord, text)) % 997)]


@dataclass
class FakeTextModel:
    """Embeds a text as [length, checksum]; or classifies it as `long`/`short`.

    `warm_gate` blocks warm-up until the test sets it; `predict_gate` blocks forward
    passes (`entered` is set once one has started); `poison` makes any batch holding it
    raise; `batches` records the size of every forward pass, `seen` every text computed,
    `warmed` the batch size of every warm-up."""

    task: Task = "embed"
    name: str = "fake"
    labels: tuple[str, ...] = ("short", "long")
    max_tokens: int = 64
    warm_gate: threading.Event = field(default_factory=threading.Event)
    warm_entered: threading.Event = field(default_factory=threading.Event)
    predict_gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    poison: str = "boom"
    batches: list[int] = field(default_factory=list)
    warmed: list[int] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.warm_gate.set()
        self.predict_gate.set()

    def encode(
        self, text: str, pair: str | None = None, options: Options = DEFAULT_OPTIONS
    ) -> Encoded:
        if options.prompt_name is not None:
            raise InvalidOption("prompt_name", "the fake model has no prompts")
        return Encoded([ord(c) for c in text[:64]], truncated=len(text) > 64)

    def encode_many(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        options: Options = DEFAULT_OPTIONS,
        truncation_direction: TruncationDirection = "right",
    ) -> list[Encoded]:
        return [self.encode(t, None, options) for t in texts]

    def encode_ids(
        self, sequences: Sequence[Sequence[int]], options: Options = DEFAULT_OPTIONS
    ) -> list[Encoded]:
        """Token ids are the characters' code points, as `encode` makes them."""
        return [Encoded(list(ids[:64]), truncated=len(ids) > 64) for ids in sequences]

    def tokenize(
        self, texts: Sequence[str], add_special_tokens: bool = True, prompt_name: str | None = None
    ) -> list[list[Token]]:
        return [[Token(ord(c), c, False, i, i + 1) for i, c in enumerate(t[:64])] for t in texts]

    def cost(self, item: Encoded) -> int:
        return len(item.ids)

    def predict(self, items: Sequence[Encoded]) -> list[Output]:
        self.entered.set()
        if not self.predict_gate.wait(timeout=30):
            raise TimeoutError("the test never released predict_gate")
        self.batches.append(len(items))
        texts = ["".join(map(chr, item.ids)) for item in items]
        self.seen.extend(texts)
        if any(self.poison in t for t in texts):
            raise ValueError("poisoned batch")
        if self.task == "embed":
            return [fake_embedding(t) for t in texts]
        out: list[Output] = []
        for t in texts:
            p_long = min(len(t) / 20.0, 1.0)
            label = "long" if p_long > 0.5 else "short"
            out.append(Classification(label, max(p_long, 1 - p_long), [1 - p_long, p_long]))
        return out

    def warm_up(
        self, max_batch_size: int, on_step: Callable[[int, int, str], None] | None = None
    ) -> None:
        if on_step is not None:
            on_step(1, 1, f"batch {max_batch_size}")
        self.warm_entered.set()
        if not self.warm_gate.wait(timeout=30):
            raise TimeoutError("the test never released warm_gate")
        self.warmed.append(max_batch_size)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "task": self.task, "device": "cpu", "labels": list(self.labels)}
