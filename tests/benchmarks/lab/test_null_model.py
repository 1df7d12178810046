"""The null model as the lab runs it (a fixed embedding, packed in an engine process);
the server tests run it reading texts back, as `tests.server.fakes.FakeTextModel`."""

from __future__ import annotations

import pytest

from batcher.models import Classification, Encoded, unpack_output
from benchmarks.lab.null_model import NullModel, checksum_embedding
from benchmarks.trivial import EMBEDDING


def test_a_fixed_embedding_answers_every_text_with_it_counting_tokens_as_a_tokenizer() -> None:
    model = NullModel(embedding=EMBEDDING)
    items = model.encoder.encode_many(["a" * 40, "b" * 2000])
    assert [item.ids for item in items] == [[1] * 12, [1] * 256]
    assert [item.truncated for item in items] == [False, True]
    assert model.predict(items) == [EMBEDDING, EMBEDDING]
    assert model.batches == [2]
    assert model.seen == [], "texts are not read back"


def test_packed_outputs_are_each_rows_float32_bytes_and_unpack_exactly() -> None:
    fixed = NullModel(embedding=EMBEDDING, packed_outputs=True)
    packed = fixed.predict([Encoded([1, 1], truncated=False)] * 3)
    assert all(isinstance(value, bytes) for value in packed)
    assert len({id(value) for value in packed}) == 3, "one object each, as a real model's"
    assert [unpack_output(value) for value in packed] == [EMBEDDING] * 3

    read_back = NullModel(packed_outputs=True)
    texts = ["one", "three"]
    outputs = read_back.predict(read_back.encoder.encode_many(texts))
    assert [unpack_output(value) for value in outputs] == [checksum_embedding(t) for t in texts]


def test_reading_texts_back_routes_each_result_to_its_text() -> None:
    model = NullModel()
    texts = ["short", "a text long enough to be long"]
    assert model.predict(model.encoder.encode_many(texts)) == [checksum_embedding(t) for t in texts]
    assert model.seen == texts
    labels = NullModel(task="classify")
    answers = labels.predict(labels.encoder.encode_many(texts))
    assert [a.label for a in answers if isinstance(a, Classification)] == ["short", "long"]


def test_a_fixed_embedding_is_for_embedding_only() -> None:
    with pytest.raises(ValueError, match="needs task 'embed', got task 'classify'"):
        NullModel(task="classify", embedding=EMBEDDING)
