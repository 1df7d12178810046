"""Texts to send: a built-in deterministic workload, or one text per line of a file.

The built-in workloads (`WORKLOADS`, `workload(name)`):

- `short`: sentences of 5 to 60 words, today's default (8-63 tokens for the default model);
- `rag`: chunks of 260 to 400 words, what retrieval stacks embed: real chunks of 200 to
  400 words fill the default model's 256-token window, and so do these (the vocabulary
  below is about a token a word), which the server cuts at the window;
- `mix`: 80 % short queries (5 to 20 words) and 20 % such chunks, interleaved at random;
- `queries`: the mix's queries alone, what its queries' latency is set against.
"""

from __future__ import annotations

import random
from collections.abc import Callable
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
    kinds: list[str] | None = None
    """The kind of each text, where a workload mixes kinds (`query`, `chunk`): the load
    tools then report latencies by kind too."""


def builtin(n: int = 2000, seed: int = 0, min_words: int = 5, max_words: int = 60) -> Corpus:
    """Seeded sentences of `min_words` to `max_words` words: the same texts on every run."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(min_words, max_words))) for _ in range(n)]
    return Corpus(texts, f"built-in (seed {seed}, {n} texts of {min_words}-{max_words} words)")


def rag_chunks(n: int = 500, seed: int = 1, min_words: int = 260, max_words: int = 400) -> Corpus:
    """Seeded chunks of `min_words` to `max_words` words, as a document is cut for
    retrieval (each over the default model's window; see the module's docstring)."""
    corpus = builtin(n, seed, min_words, max_words)
    return Corpus(corpus.texts, f"built-in RAG chunks (seed {seed}, {n} texts of "
                                f"{min_words}-{max_words} words)")  # fmt: skip


def mixed(n: int = 2000, seed: int = 2, chunk_share: float = 0.2) -> Corpus:
    """Short queries (5 to 20 words) and RAG chunks (`rag_chunks`), `chunk_share` of them
    chunks, in a seeded random order: the share holds over any long enough run."""
    if not 0.0 <= chunk_share <= 1.0:
        raise ValueError(f"chunk_share must be between 0 and 1, got {chunk_share}")
    chunks = round(n * chunk_share)
    texts = builtin(n - chunks, seed, 5, 20).texts + rag_chunks(chunks, seed + 1).texts
    kinds = ["query"] * (n - chunks) + ["chunk"] * chunks
    order = list(range(n))
    random.Random(seed).shuffle(order)
    share = f"{round(chunk_share * 100)} % chunks of 260-400 words"
    source = f"built-in mix (seed {seed}, {n} texts: queries of 5-20 words, {share})"
    return Corpus([texts[i] for i in order], source, [kinds[i] for i in order])


def queries(n: int = 1600, seed: int = 2) -> Corpus:
    """The short queries of `mixed` (the same texts, in the same order) without its chunks."""
    texts = builtin(n, seed, 5, 20).texts
    return Corpus(texts, f"built-in queries (seed {seed}, {n} texts of 5-20 words: the mix's "
                         "queries alone)", ["query"] * n)  # fmt: skip


WORKLOADS: dict[str, Callable[[], Corpus]] = {
    "short": builtin, "rag": rag_chunks, "mix": mixed, "queries": queries,
}  # fmt: skip
"""The built-in workloads by name; each called with no arguments gives the same texts."""


def workload(name: str) -> Corpus:
    """The built-in workload `name` (one of `WORKLOADS`); ValueError for another."""
    make = WORKLOADS.get(name)
    if make is None:
        raise ValueError(f"unknown workload {name!r}; the built-in ones: {', '.join(WORKLOADS)}")
    return make()


def from_file(path: str | Path) -> Corpus:
    """One text per non-empty line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text (one text per line expected)")
    return Corpus(texts, str(path))
