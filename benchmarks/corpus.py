"""Texts to send: a built-in deterministic corpus, or one text per line of a file."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "the of and to in is was for on are with as by at from that this be it an or have not "
    "batch queue model server latency throughput device token request response embedding "
    "window policy adaptive padding length sentence vector search index cluster compute"
).split()


@dataclass(frozen=True)
class Corpus:
    texts: list[str]
    source: str
    """'built-in (seed S, W1-W2 words)' or the file's path."""


def builtin(n: int = 2000, seed: int = 0, min_words: int = 5, max_words: int = 60) -> Corpus:
    """Seeded sentences of `min_words` to `max_words` words: the same texts on every run."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(min_words, max_words))) for _ in range(n)]
    return Corpus(texts, f"built-in (seed {seed}, {n} texts of {min_words}-{max_words} words)")


def from_file(path: str | Path) -> Corpus:
    """One text per non-empty line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text (one text per line expected)")
    return Corpus(texts, str(path))
