"""The built-in workloads: what `microbatch bench --workload` sends."""

from __future__ import annotations

import pytest

from benchmarks import corpus
from benchmarks.runs import load_corpus


def words(text: str) -> int:
    return len(text.split())


def test_each_workload_is_the_same_texts_every_time_and_its_lengths_are_as_named() -> None:
    for name in corpus.WORKLOADS:
        assert corpus.workload(name).texts == corpus.workload(name).texts
    assert {words(t) for t in corpus.workload("short").texts} <= set(range(5, 61))
    rag = corpus.workload("rag").texts
    assert min(map(words, rag)) >= 260
    assert max(map(words, rag)) <= 400
    assert len(set(rag)) == len(rag)


def test_the_mix_is_one_chunk_in_five_spread_through_the_run() -> None:
    mix = corpus.workload("mix")
    texts = mix.texts
    chunks = [words(t) >= 260 for t in texts]
    assert mix.kinds == ["chunk" if chunk else "query" for chunk in chunks]
    assert corpus.workload("rag").kinds is None
    assert sum(chunks) == round(0.2 * len(texts))
    assert all(5 <= words(t) <= 20 for t, chunk in zip(texts, chunks, strict=True) if not chunk)
    for start in range(0, len(texts), 500):  # no long stretch of one kind
        assert 0.1 < sum(chunks[start : start + 500]) / 500 < 0.3
    with pytest.raises(ValueError, match="between 0 and 1"):
        corpus.mixed(chunk_share=1.5)


def test_the_queries_workload_is_the_mixs_queries_without_its_chunks() -> None:
    mix = corpus.workload("mix")
    in_mix = {t for t, kind in zip(mix.texts, mix.kinds or [], strict=True) if kind == "query"}
    alone = corpus.workload("queries")
    assert set(alone.texts) == in_mix
    assert len(alone.texts) == len(in_mix)
    assert alone.kinds == ["query"] * len(alone.texts)


def test_rag_chunks_overflow_the_default_models_window_and_short_texts_do_not() -> None:
    """The server cuts chunks at 256 tokens: the full window, as retrieval stacks send."""
    from transformers import AutoTokenizer

    from batcher.models import default_source

    tokenizer = AutoTokenizer.from_pretrained(default_source())
    rag = [len(ids) for ids in tokenizer(corpus.workload("rag").texts[:100])["input_ids"]]
    short = [len(ids) for ids in tokenizer(corpus.workload("short").texts[:500])["input_ids"]]
    assert min(rag) > 256
    assert max(short) < 128


def test_the_tools_read_a_workload_by_name_or_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert load_corpus(None, "rag").texts == corpus.rag_chunks().texts
    assert load_corpus(None).texts == corpus.builtin().texts
    path = tmp_path / "texts.txt"
    path.write_text("one\n\ntwo\n")
    assert load_corpus(str(path), "rag").texts == ["one", "two"]
    with pytest.raises(ValueError, match="unknown workload 'long'"):
        load_corpus(None, "long")
