"""The text adapters on tiny models built from a config, loaded through the real loader."""

from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path

import pytest
import torch

from batcher.models import (
    CompileMode,
    DtypeOption,
    LoadOptions,
    ModelLoadError,
    Options,
    TextEncoder,
    TextModel,
    TruncationDirection,
    load,
)
from tests.tiny_models import save_cross_encoder


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the a model batch queue device token text server light heavy fast slow".split()
    return [" ".join(rng.choices(words, k=rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def classifier(tiny_classifier_dir: Path) -> TextModel:
    model = TextModel.load(
        LoadOptions(source=str(tiny_classifier_dir), dtype="float32", compile=False)
    )
    model.warm_up(max_batch_size=8)
    return model


def test_task_follows_the_model_config(tiny_classifier_dir: Path, tiny_encoder_dir: Path) -> None:
    assert load(LoadOptions(source=str(tiny_classifier_dir))).task == "classify"
    assert load(LoadOptions(source=str(tiny_encoder_dir))).task == "embed"
    assert load(LoadOptions(source=str(tiny_classifier_dir), task="embed")).task == "embed"


def test_classify_needs_a_classification_head(tiny_encoder_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="needs a sequence-classification model"):
        load(LoadOptions(source=str(tiny_encoder_dir), task="classify"))


def test_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load(LoadOptions(source=str(tmp_path / "nothing-here")))


def test_labels_come_from_the_config(classifier: TextModel) -> None:
    assert classifier.labels == ("negative", "neutral", "positive")


def test_batched_classification_equals_unbatched(classifier: TextModel) -> None:
    texts = sentences(40)
    items = [classifier.encoder.encode(t) for t in texts]
    batched = classifier.predict(items)
    for item, together in zip(items, batched, strict=True):
        [alone] = classifier.predict([item])
        assert together.label == alone.label  # type: ignore[union-attr]
        assert together.score == pytest.approx(alone.score, abs=1e-4)  # type: ignore[union-attr]
        assert together.scores == pytest.approx(alone.scores, abs=1e-4)  # type: ignore[union-attr]
        assert sum(together.scores) == pytest.approx(1.0, abs=1e-5)  # type: ignore[union-attr]


def test_embeddings_are_masked_mean_pooled_and_unit_length(tiny_encoder_dir: Path) -> None:
    model = TextModel.load(
        LoadOptions(source=str(tiny_encoder_dir), dtype="float32", compile=False)
    )
    texts = ["short", "a much longer sentence with many more tokens in it"]
    items = [model.encoder.encode(t) for t in texts]
    embeddings = torch.tensor(model.predict(items))
    assert torch.linalg.norm(embeddings, dim=1) == pytest.approx([1.0, 1.0], abs=1e-5)
    # By hand, without padding: mean of the hidden states, normalised.
    for item, embedding in zip(items, embeddings, strict=True):
        with torch.inference_mode():
            hidden = model.loaded.model(input_ids=torch.tensor([item.ids])).last_hidden_state[0]
        expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
        assert torch.allclose(embedding, expected, atol=1e-5)


def test_long_text_is_truncated_to_the_token_limit(tiny_encoder_dir: Path) -> None:
    model = TextModel.load(LoadOptions(source=str(tiny_encoder_dir), max_tokens=16))
    long, short = model.encoder.encode("word " * 100), model.encoder.encode("word")
    assert (len(long.ids), long.truncated) == (16, True)
    assert short.truncated is False


@pytest.mark.parametrize("direction", ["right", "left"])
def test_huge_texts_cut_before_tokenizing_keep_the_whole_texts_ids(
    tiny_encoder_dir: Path, direction: TruncationDirection
) -> None:
    """Texts far over the limit are cut at a space before the tokenizer sees them; the
    ids must still be those that transformers' own tokenizer gives the whole text."""
    from transformers import AutoTokenizer

    model = TextModel.load(LoadOptions(source=str(tiny_encoder_dir), compile=False))
    assert model.encoder._cut_chars is not None, "WordPiece splits at spaces: cutting is exact"
    reference = AutoTokenizer.from_pretrained(tiny_encoder_dir)  # its own backend copy
    reference.truncation_side = direction
    rng = random.Random(1)
    words = "alpha beta δέλτα 東京は日本の首都 supercalifragilistic x, y. (z) don't 123 ".split(" ")
    texts = [" ".join(rng.choices(words, k=rng.randint(300, 3000))) for _ in range(30)]
    # Cut, these no longer overflow (a 20-character word is one [UNK]; a 5,000-character
    # word too): they must be tokenized whole after all.
    texts += ["u" * 20 + (" " + "u" * 20) * 300, "u" * 5000, "word " * 2000]
    assert max(len(t) for t in texts) > 4 * model.encoder._cut_chars
    encoded = model.encoder.encode_many(texts, truncation_direction=direction)
    for text, item in zip(texts, encoded, strict=True):
        expected = reference(text, truncation=True, max_length=model.max_tokens)["input_ids"]
        assert item.ids == expected
        assert item.truncated == (len(reference(text)["input_ids"]) > model.max_tokens)
    if direction == "right":
        assert [model.encoder.encode(t).ids for t in texts] == [item.ids for item in encoded]


def test_max_tokens_above_the_model_limit_is_refused(tiny_encoder_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="between 1 and 128"):
        load(LoadOptions(source=str(tiny_encoder_dir), max_tokens=4096))


@pytest.mark.parametrize(
    ("dtype", "mode"),
    [("float32", "default"), ("bfloat16", "default"), ("float32", "reduce-overhead")],
)
def test_no_recompile_after_warm_up_over_random_lengths_and_batch_sizes(
    tiny_encoder_dir: Path, dtype: DtypeOption, mode: CompileMode
) -> None:
    options = LoadOptions(source=str(tiny_encoder_dir), dtype=dtype, compile_mode=mode)
    model = TextModel.load(options)
    assert model.dtype == getattr(torch, dtype)
    model.warm_up(max_batch_size=32)
    assert model.compile_state.enabled, model.compile_state.error
    assert model.describe()["compile"]["mode"] == mode  # type: ignore[index]
    model.compile_state.stance = "fail_on_recompile"  # any recompile now raises
    rng = random.Random(1)
    texts = [*sentences(400, seed=2), "word " * 200]  # up to the 128-token limit
    for _ in range(40):
        batch = rng.sample(texts, rng.randint(1, 40))  # beyond max_batch_size too
        assert len(model.predict([model.encoder.encode(t) for t in batch])) == len(batch)
    assert model.compile_state.graphs_since_warm_up == 0


def test_compile_failure_falls_back_to_eager_with_a_warning(
    tiny_encoder_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        def forward(*a: object) -> object:
            raise RuntimeError("no C++ compiler")

        return forward

    monkeypatch.setattr("batcher.models.text.compile_forward", broken)
    model = TextModel.load(LoadOptions(source=str(tiny_encoder_dir), compile=True))
    with caplog.at_level(logging.WARNING):
        model.warm_up(max_batch_size=4)
    assert "torch.compile failed (RuntimeError: no C++ compiler); running eager" in caplog.text
    assert model.describe()["compile"] == {
        "requested": True,
        "mode": "default",
        "enabled": False,
        "error": "RuntimeError: no C++ compiler",
        "graphs_since_warm_up": 0,
    }
    assert len(model.predict([model.encoder.encode("still works")])) == 1


@pytest.mark.reference
def test_no_recompile_with_prompts_left_out_of_pooling_and_a_dense_head(tmp_path: Path) -> None:
    from tests.tiny_models import Kind, save_embedder

    kind = Kind("compiled", pooling=("cls", "mean"), dense=True, prompts={"q": "query: "},
                include_prompt=False)  # fmt: skip
    model = TextModel.load(LoadOptions(source=str(save_embedder(tmp_path / "m", kind))))
    model.warm_up(max_batch_size=16)
    assert model.compile_state.enabled, model.compile_state.error
    model.compile_state.stance = "fail_on_recompile"
    rng = random.Random(3)
    texts = sentences(200, seed=4)
    for _ in range(20):
        batch = rng.sample(texts, rng.randint(1, 20))
        items = [
            model.encoder.encode(t, options=Options(prompt_name="q" if rng.random() < 0.5 else None,
                                            dimensions=rng.choice([None, 4])))
            for t in batch
        ]  # fmt: skip
        assert len(model.predict(items)) == len(batch)
    assert model.compile_state.graphs_since_warm_up == 0


def test_packed_embeddings_unpack_to_exactly_the_floats(tiny_encoder_dir: Path) -> None:
    """For an engine process, embeddings leave as float32 bytes; the front-end's floats
    must be exactly those of the in-process path, Matryoshka and normalising included."""
    from batcher.models import unpack_output

    model = TextModel.load(LoadOptions(source=str(tiny_encoder_dir), compile=False))
    texts = sentences(12)
    items = model.encoder.encode_many(texts[:6]) + model.encoder.encode_many(
        texts[6:], options=Options(dimensions=8, normalize=False)
    )
    plain = model.predict(items)
    model.packed_outputs = True
    packed = model.predict(items)
    assert all(isinstance(value, bytes) for value in packed)
    assert [unpack_output(value) for value in packed] == plain
    assert [len(unpack_output(value)) for value in packed[6:]] == [8] * 6


@pytest.mark.parametrize("kind", ["encoder", "cross-encoder"])
def test_the_encoder_a_front_end_receives_tokenizes_as_the_models_own_tokenizer(
    kind: str, tiny_encoder_dir: Path, tmp_path: Path
) -> None:
    """What a front-end of `serve --workers` gets from the engine process: the encoder,
    pickled and rebuilt from its spec. Its ids are transformers' for the same inputs,
    cut from either side."""
    source = str(tiny_encoder_dir if kind == "encoder" else save_cross_encoder(tmp_path))
    real = TextModel.load(LoadOptions(source=source, dtype="float32", compile=False))
    received = pickle.loads(pickle.dumps(real.encoder))
    assert isinstance(received, TextEncoder)
    reference = real.loaded.tokenizer
    texts = [*sentences(50, seed=9), "word " * 300, "x"]
    for direction in ("right", "left"):
        reference.truncation_side = direction
        expected = reference(texts, truncation=True, max_length=real.max_tokens)["input_ids"]
        ours = received.encode_many(texts, truncation_direction=direction)
        assert [list(item.ids) for item in ours] == expected
        whole = reference(texts)["input_ids"]
        assert [item.truncated for item in ours] == [len(ids) > real.max_tokens for ids in whole]
    if real.task == "rerank":
        reference.truncation_side = "right"
        pairs = sentences(len(texts), seed=10)
        expected_pairs = reference(texts, pairs, truncation=True, max_length=real.max_tokens)
        ours = received.encode_many(texts, pairs)
        assert [list(item.ids) for item in ours] == expected_pairs["input_ids"]
        assert [item.type_ids for item in ours] == expected_pairs["token_type_ids"]
    assert (received.max_tokens, received.name, received.task) == (
        real.max_tokens, real.name, real.task
    )  # fmt: skip
