"""Our collate -> forward -> split path against the reference libraries themselves:
`SentenceTransformer.encode`, `CrossEncoder.predict` and transformers' text-classification
pipeline, on tiny models that sentence-transformers saved (both layouts)."""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from batcher import Engine, EngineConfig, Result, ThreadRunner
from batcher.models import (
    Encoded,
    LoadOptions,
    ModelLoadError,
    Options,
    Output,
    SparseVector,
    TextModel,
    TokenVectors,
)
from batcher.models.probe import PROBE_TEXTS
from batcher.models.text import HostBatch
from tests.tiny_models import (
    EMBEDDERS,
    SPARSE_KINDS,
    TEXTS,
    Kind,
    save_cross_encoder,
    save_embedder,
    save_inference_free_sparse_encoder,
    save_multi_label_classifier,
    save_nli_classifier,
    save_sparse_encoder,
)

warnings.filterwarnings("ignore", category=FutureWarning)

pytestmark = pytest.mark.reference


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def assert_same_vectors(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    assert cosines(ours, reference).min() >= 0.9999
    np.testing.assert_allclose(
        np.linalg.norm(ours, axis=1), np.linalg.norm(reference, axis=1), rtol=1e-4
    )


def load(path: Path) -> TextModel:
    return TextModel.load(LoadOptions(source=str(path), dtype="float32", compile=False))


@pytest.fixture(scope="module", params=EMBEDDERS, ids=lambda kind: kind.name)
def embedder(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Kind, Path]:
    kind: Kind = request.param
    return kind, save_embedder(tmp_path_factory.mktemp(kind.name) / "model", kind)


def test_embeddings_equal_sentence_transformers(embedder: tuple[Kind, Path]) -> None:
    from sentence_transformers import SentenceTransformer

    kind, path = embedder
    reference = SentenceTransformer(str(path), device="cpu").encode(TEXTS, batch_size=3)
    model = load(path)
    assert model.task == "embed"
    assert model.description.normalize is kind.normalize
    ours = np.array(model.predict(model.encoder.encode_many(TEXTS)))
    assert_same_vectors(ours, reference)


def test_an_item_gets_the_same_vector_alone_and_beside_longer_ones(
    embedder: tuple[Kind, Path],
) -> None:
    _, path = embedder
    model = load(path)
    items = model.encoder.encode_many(TEXTS)
    together = np.array(model.predict(items))
    for row, item in enumerate(items):
        alone = np.array(model.predict([item]))
        assert_same_vectors(alone, together[row : row + 1])


@pytest.mark.parametrize("kind", [k for k in EMBEDDERS if k.prompts], ids=lambda k: k.name)
def test_prompts_by_name_and_by_text_and_matryoshka_dimensions(tmp_path: Path, kind: Kind) -> None:
    from sentence_transformers import SentenceTransformer

    path = save_embedder(tmp_path / "model", kind)
    st = SentenceTransformer(str(path), device="cpu")
    model = load(path)
    for name in kind.prompts:
        ours = model.predict(model.encoder.encode_many(TEXTS, options=Options(prompt_name=name)))
        assert_same_vectors(np.array(ours), st.encode(TEXTS, prompt_name=name))
    own = "Instruct: find the answer\nQuery: "
    ours = model.predict(model.encoder.encode_many(TEXTS, options=Options(prompt=own)))
    assert_same_vectors(np.array(ours), st.encode(TEXTS, prompt=own))
    options = Options(dimensions=8, normalize=True)
    ours = model.predict(model.encoder.encode_many(TEXTS, options=options))
    reference = st.encode(TEXTS, truncate_dim=8, normalize_embeddings=True)
    assert_same_vectors(np.array(ours), reference)


def test_normalize_and_dimensions_per_item_in_one_batch(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    path = save_embedder(tmp_path / "model", Kind("plain", pooling="mean", normalize=False))
    st = SentenceTransformer(str(path), device="cpu")
    model = load(path)
    items = [
        model.encoder.encode("raw vector"),
        model.encoder.encode("normalised", options=Options(normalize=True)),
        model.encoder.encode("cut to 5", options=Options(dimensions=5)),
        model.encoder.encode("cut and normalised", options=Options(dimensions=5, normalize=True)),
    ]
    out = model.predict(items)
    assert_same_vectors(np.array(out[:1]), st.encode(["raw vector"]))
    assert_same_vectors(np.array(out[1:2]), st.encode(["normalised"], normalize_embeddings=True))
    assert_same_vectors(np.array(out[2:3]), st.encode(["cut to 5"], truncate_dim=5))
    reference = st.encode(["cut and normalised"], truncate_dim=5, normalize_embeddings=True)
    assert_same_vectors(np.array(out[3:]), reference)
    assert np.linalg.norm(out[3]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_cross_encoder_scores_equal_cross_encoder_predict(tmp_path: Path, layout: str) -> None:
    from sentence_transformers import CrossEncoder

    path = save_cross_encoder(tmp_path / "model", layout)  # type: ignore[arg-type]
    query = "what is micro-batching?"
    pairs = [(query, t) for t in TEXTS]
    reference = CrossEncoder(str(path), device="cpu").predict(pairs)
    model = load(path)
    assert model.task == "rerank"
    out = model.predict(model.encoder.encode_many([query] * len(TEXTS), TEXTS))
    scores = np.array([o.score for o in out])  # type: ignore[union-attr]
    np.testing.assert_allclose(scores, reference, atol=1e-4)
    assert scores.std() > 0.05, "the scores should differ from pair to pair"
    # The text pair is one input: swapping the two changes it.
    [swapped] = model.predict([model.encoder.encode(TEXTS[1], query)])
    assert swapped.score != pytest.approx(scores[1], abs=1e-4)  # type: ignore[union-attr]


def test_cross_encoder_raw_scores_are_its_logits(tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder
    from torch import nn

    path = save_cross_encoder(tmp_path / "model")
    pairs = [("query", t) for t in TEXTS]
    reference = CrossEncoder(str(path), device="cpu").predict(pairs, activation_fn=nn.Identity())
    model = load(path)
    items = model.encoder.encode_many(["query"] * len(TEXTS), TEXTS, Options(raw_scores=True))
    scores = [o.score for o in model.predict(items)]  # type: ignore[union-attr]
    np.testing.assert_allclose(scores, reference, atol=1e-4)


def _pipeline(path: Path):  # type: ignore[no-untyped-def]
    from transformers import pipeline

    return pipeline("text-classification", model=str(path), device="cpu", top_k=None)


def test_multi_label_heads_are_independent_sigmoids(tmp_path: Path) -> None:
    path = save_multi_label_classifier(tmp_path / "model")
    reference = _pipeline(path)(TEXTS, truncation=True)
    model = load(path)
    assert (model.task, model.loaded.activation) == ("classify", "sigmoid")
    out = model.predict(model.encoder.encode_many(TEXTS))
    for ours, expected in zip(out, reference, strict=True):
        by_label = {e["label"]: e["score"] for e in expected}
        assert dict(zip(model.labels, ours.scores, strict=True)) == pytest.approx(  # type: ignore[union-attr]
            by_label, abs=1e-4
        )
        assert ours.label == max(by_label, key=by_label.__getitem__)  # type: ignore[union-attr]
    sums = [sum(o.scores) for o in out]  # type: ignore[union-attr]
    assert max(abs(s - 1.0) for s in sums) > 0.01, "independent sigmoids do not sum to one"


def test_pair_classifier_softmax_equals_the_pipeline_on_pairs(tmp_path: Path) -> None:
    path = save_nli_classifier(tmp_path / "model")
    premise = "A man is playing a guitar on stage."
    pipe = _pipeline(path)
    model = load(path)
    assert (model.task, model.loaded.activation) == ("classify", "softmax")
    out = model.predict(model.encoder.encode_many([premise] * len(TEXTS), TEXTS))
    for text, ours in zip(TEXTS, out, strict=True):
        expected = pipe({"text": premise, "text_pair": text}, truncation=True)
        by_label = {e["label"]: e["score"] for e in expected}
        assert dict(zip(model.labels, ours.scores, strict=True)) == pytest.approx(  # type: ignore[union-attr]
            by_label, abs=1e-4
        )


async def through_the_engine(
    model: TextModel, texts: list[str], max_batch_size: int, thread: str
) -> tuple[list[Result[Output]], list[str]]:
    """`texts` submitted at once to an engine on `model` (its device thread named
    `thread`): their results, and the thread each of `model.prepare`'s calls ran on."""
    threads: list[str] = []
    prepare = model.prepare

    def recording_prepare(items: Sequence[Encoded]) -> HostBatch:
        threads.append(threading.current_thread().name)
        return prepare(items)

    model.prepare = recording_prepare  # type: ignore[method-assign]
    runner = ThreadRunner(model, thread_name=thread)
    try:
        async with Engine(runner, EngineConfig(max_batch_size=max_batch_size)) as engine:
            results = await asyncio.gather(*(engine.submit(model.encoder.encode(t)) for t in texts))
    finally:
        runner.close()
        del model.prepare
    return results, threads


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "kind", [k for k in EMBEDDERS if not k.include_prompt or k.decoder], ids=lambda k: k.name
)
async def test_batches_prepared_ahead_give_sentence_transformers_vectors(
    tmp_path: Path, kind: Kind
) -> None:
    """`--collate-ahead on`: batches that wait for the device are padded on the collate
    thread; through the engine, the vectors are still sentence-transformers'."""
    from sentence_transformers import SentenceTransformer

    path = save_embedder(tmp_path / "model", kind)
    model = TextModel.load(
        LoadOptions(source=str(path), dtype="float32", compile=False, collate_ahead="on")
    )
    assert model.collates_ahead
    assert model.describe()["collate_ahead"] is True
    texts = TEXTS * 4
    results, threads = await through_the_engine(model, texts, max_batch_size=3, thread="dev")
    # Submitted in one go: the first batch finds the device free (collated on the
    # device thread), each later one is prepared while the one before computes.
    assert threads[0] == "dev_0"
    assert "dev-collate_0" in threads
    reference = SentenceTransformer(str(path), device="cpu").encode(texts, batch_size=3)
    assert_same_vectors(np.array([r.value for r in results]), reference)


def test_token_vectors_equal_sentence_transformers_token_embeddings(
    embedder: tuple[Kind, Path],
) -> None:
    """`token_embeddings`: one vector per token (special tokens and any prompt included,
    no padding rows), beside pooled items in the same batch."""
    from sentence_transformers import SentenceTransformer

    _, path = embedder
    st = SentenceTransformer(str(path), device="cpu")
    # One text a batch: the reference keeps left padding rows in a batch.
    reference = [st.encode([t], output_value="token_embeddings")[0].numpy() for t in TEXTS]
    model = load(path)
    tokens = model.encoder.encode_many(TEXTS, options=Options(token_embeddings=True))
    pooled = model.encoder.encode_many(TEXTS)
    outputs = model.predict([x for pair in zip(tokens, pooled, strict=True) for x in pair])
    for row, (want, item) in enumerate(zip(reference, tokens, strict=True)):
        got = outputs[2 * row]
        assert isinstance(got, TokenVectors)
        assert got.array().shape == want.shape == (len(item.ids), want.shape[1])
        assert cosines(got.array(), want).min() >= 0.9999
        assert isinstance(outputs[2 * row + 1], list)
    assert_same_vectors(np.array(outputs[1::2]), np.array(model.predict(pooled)))


def test_int8_ranges_are_the_calibration_texts_extremes_under_the_reference(
    embedder: tuple[Kind, Path],
) -> None:
    """The fixed int8/uint8 ranges: each dimension's minimum and maximum over the
    sentence-transformers embeddings of the calibration texts, with and without a
    Matryoshka cut."""
    from sentence_transformers import SentenceTransformer

    _, path = embedder
    st = SentenceTransformer(str(path), device="cpu")
    model = load(path)
    calibration = model.encoder.calibration
    assert calibration is not None
    assert calibration.source == f"built-in ({len(PROBE_TEXTS)} texts)"
    normalize = model.encoder.spec.normalize
    for dims in (None, 8):
        reference = st.encode(list(PROBE_TEXTS), truncate_dim=dims, normalize_embeddings=normalize)
        extremes = np.vstack((reference.min(axis=0), reference.max(axis=0)))
        np.testing.assert_allclose(calibration.ranges(dims, normalize), extremes, atol=2e-5)


def test_a_calibration_file_sets_the_ranges(tmp_path: Path) -> None:
    [kind] = [k for k in EMBEDDERS if k.name == "cls"]
    path = save_embedder(tmp_path / "model", kind)
    texts = tmp_path / "texts.txt"
    texts.write_text("first text\n\n  second text  \nthird\n", encoding="utf-8")
    options = LoadOptions(source=str(path), dtype="float32", compile=False)
    model = TextModel.load(replace(options, calibration_file=str(texts)))
    assert model.encoder.calibration is not None
    assert model.encoder.calibration.source == "texts.txt (3 texts)"
    vectors = np.array(model.predict(model.encoder.encode_many(["first text", "second text",
                                                                 "third"])))  # fmt: skip
    extremes = np.vstack((vectors.min(axis=0), vectors.max(axis=0)))
    np.testing.assert_allclose(model.encoder.calibration.ranges(None, True), extremes, atol=1e-6)
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="has no text"):
        TextModel.load(replace(options, calibration_file=str(tmp_path / "empty.txt")))
    with pytest.raises(ModelLoadError, match=r"missing\.txt"):
        TextModel.load(replace(options, calibration_file=str(tmp_path / "missing.txt")))


def _dense(outputs: Sequence[Output], width: int) -> np.ndarray:
    out = np.zeros((len(outputs), width), dtype=np.float32)
    for row, value in enumerate(outputs):
        assert isinstance(value, SparseVector)
        pairs = value.pairs()
        indices = [int(p["index"]) for p in pairs]
        assert indices == sorted(indices)
        out[row, indices] = [p["value"] for p in pairs]
    return out


@pytest.mark.parametrize(
    ("pooling", "activation", "legacy"),
    [*((p, a, False) for p, a in SPARSE_KINDS), ("max", "relu", True)],
    ids=lambda v: str(v),
)
def test_sparse_vectors_equal_sparse_encoder_encode(
    tmp_path: Path, pooling: str, activation: str, legacy: bool
) -> None:
    """SPLADE: our weights are `SparseEncoder.encode`'s, the same entries nonzero; the
    query prompt as `encode_query`; `top_k` as `max_active_dims`."""
    from sentence_transformers import SparseEncoder

    path = save_sparse_encoder(tmp_path / "model", pooling, activation, legacy=legacy)
    st = SparseEncoder(str(path), device="cpu")
    model = load(path)
    assert model.task == "sparse"
    reference = st.encode(TEXTS, batch_size=3).to_dense().numpy()
    width = reference.shape[1]
    assert model.describe()["dimension"] == width
    items = model.encoder.encode_many(TEXTS)
    ours = _dense(model.predict(items), width)
    np.testing.assert_array_equal(ours != 0, reference != 0)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=1e-5)
    queries = model.encoder.encode_many(TEXTS, options=Options(prompt_name="query"))
    np.testing.assert_allclose(
        _dense(model.predict(queries), width), st.encode_query(TEXTS).to_dense().numpy(),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip
    top = model.encoder.encode_many(TEXTS, options=Options(top_k=7))
    kept = _dense(model.predict(top), width)
    expected = st.encode(TEXTS, max_active_dims=7).to_dense().numpy()
    np.testing.assert_array_equal(kept != 0, expected != 0)
    np.testing.assert_allclose(kept, expected, atol=1e-5, rtol=1e-5)
    alone = _dense(model.predict(items[:1]), width)
    np.testing.assert_allclose(alone[0], ours[0], atol=1e-6)


def test_an_inference_free_model_answers_queries_from_its_table_and_documents_by_splade(
    tmp_path: Path,
) -> None:
    """A Router's query route (a SparseStaticEmbedding, no model) as `encode_query`, its
    document route (the default) as `encode_document` and `encode`."""
    from sentence_transformers import SparseEncoder

    path = save_inference_free_sparse_encoder(tmp_path / "model")
    st = SparseEncoder(str(path), device="cpu")
    model = load(path)
    assert model.task == "sparse"
    assert model.encoder.static is not None
    queries = st.encode_query(TEXTS).to_dense().numpy()
    width = queries.shape[1]
    items = model.encoder.static_queries(TEXTS)
    ours = _dense(model.encoder.static.vectors(items), width)
    np.testing.assert_array_equal(ours != 0, queries != 0)
    np.testing.assert_allclose(ours, queries, rtol=1e-6)
    top = model.encoder.static.vectors(model.encoder.static_queries(TEXTS, Options(top_k=2)))
    expected = st.encode_query(TEXTS, max_active_dims=2).to_dense().numpy()
    np.testing.assert_allclose(_dense(top, width), expected, rtol=1e-6)
    documents = _dense(model.predict(model.encoder.encode_many(TEXTS)), width)
    for reference in (st.encode_document(TEXTS), st.encode(TEXTS)):
        np.testing.assert_allclose(documents, reference.to_dense().numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kind",
    [k for k in EMBEDDERS if not k.decoder and k.layout == "current"],
    ids=lambda k: k.name,
)
def test_a_chunked_texts_windows_are_what_sentence_transformers_pools(
    tmp_path: Path, kind: Kind
) -> None:
    """`chunking`: each window is [CLS] + the prompt + a run of the text's tokens + [SEP],
    as long as fits, pooled by sentence-transformers' own modules (the prompt left out
    where the Pooling excludes it), before the final Normalize; their token-weighted mean
    is what the server combines."""
    import torch
    from sentence_transformers import SentenceTransformer

    path = save_embedder(tmp_path / "model", kind)
    st = SentenceTransformer(str(path), device="cpu")
    model = load(path)
    text = " ".join(TEXTS) * 4
    prompt = st.prompts.get(kind.default_prompt_name or "", "")
    tokenizer = st.tokenizer
    content = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    size = model.max_tokens - 2 - len(prompt_ids)
    runs = [content[i : i + size] for i in range(0, len(content), size)]
    assert len(runs) >= 2
    chunks = model.encoder.chunk(text)
    assert chunks.weights == [len(r) for r in runs]
    modules = [m for m in st if type(m).__name__ != "Normalize"]
    expected = []
    for run in runs:
        ids = torch.tensor([[tokenizer.cls_token_id, *prompt_ids, *run, tokenizer.sep_token_id]])
        features = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids),
            "prompt_length": 1 + len(prompt_ids),
        }
        with torch.no_grad():
            for module in modules:
                features = module(features)
        expected.append(features["sentence_embedding"][0].numpy())
    ours = model.predict([replace(w, normalize=False) for w in chunks.windows])
    assert_same_vectors(np.array(ours), np.array(expected))
