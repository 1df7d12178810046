"""The clients users already have, against real `microbatch serve` processes: the
official `openai` SDK on the built-in model, TEI's routes and Cohere's rerank with plain
HTTP, each reply checked field by field against the public shapes and its numbers
against the reference libraries (sentence-transformers, transformers' tokenizer). The
servers run in float32, so that the numbers compare at float32 tolerances."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from batcher.models import DEFAULT_HUB_ID, default_source
from tests.conftest import ServerProcess
from tests.server.live import metric
from tests.tiny_models import (
    EMBEDDERS,
    TEXTS,
    save_cross_encoder,
    save_embedder,
    save_inference_free_sparse_encoder,
    save_nli_classifier,
    save_sparse_encoder,
)

pytestmark = [pytest.mark.slow, pytest.mark.reference]
warnings.filterwarnings("ignore", category=FutureWarning)

QUERY = "what is dynamic micro-batching?"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Dynamic batching groups requests that arrive close together.",
    "Paris is the capital of France.",
]


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def ours(url: str, texts: list[str], **options: object) -> np.ndarray:
    r = httpx.post(f"{url}/predict/batch", json={"texts": texts, **options}, timeout=60)
    assert r.status_code == 200, r.text
    return np.array([x["embedding"] for x in r.json()["results"]])


def test_the_openai_sdk_gets_the_vectors_predict_computes(float32_server: ServerProcess) -> None:
    url, ai = float32_server.url, client(float32_server.url)
    listed = ai.embeddings.create(input=SENTENCES, model="text-embedding-3-small")
    one = ai.embeddings.create(input=SENTENCES[0], model="text-embedding-3-small")
    floats = ai.embeddings.create(input=SENTENCES, model="x", encoding_format="float")
    short = ai.embeddings.create(input=SENTENCES, model="x", dimensions=64)
    reference = ours(url, SENTENCES)
    got = np.array([d.embedding for d in listed.data])
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, reference, atol=1e-6)  # base64 floats are float32
    np.testing.assert_allclose(one.data[0].embedding, reference[0], atol=1e-6)
    np.testing.assert_allclose([d.embedding for d in floats.data], reference, atol=1e-6)
    np.testing.assert_allclose(
        [d.embedding for d in short.data], ours(url, SENTENCES, dimensions=64), atol=1e-6
    )
    assert listed.model == DEFAULT_HUB_ID
    tokens = httpx.post(f"{url}/tokenize", json={"inputs": SENTENCES}).json()
    assert listed.usage.prompt_tokens == sum(len(t) for t in tokens)
    assert [m.id for m in ai.models.list().data] == [DEFAULT_HUB_ID]
    assert ai.models.retrieve(DEFAULT_HUB_ID).id == DEFAULT_HUB_ID


def test_token_ids_from_tokenize_embed_as_their_text(float32_server: ServerProcess) -> None:
    from transformers import AutoTokenizer

    url, ai = float32_server.url, client(float32_server.url)
    tokens = httpx.post(f"{url}/tokenize", json={"inputs": SENTENCES}).json()
    reference = AutoTokenizer.from_pretrained(default_source())(SENTENCES)
    ids = [[t["id"] for t in ts] for ts in tokens]
    assert ids == reference["input_ids"]
    first = tokens[0]
    assert first[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert first[1] == {"id": ids[0][1], "text": "The", "special": False, "start": 0, "stop": 3}
    by_ids = ai.embeddings.create(input=ids, model="x", encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in by_ids.data], ours(url, SENTENCES), atol=1e-5)
    with pytest.raises(openai.BadRequestError) as outside:
        ai.embeddings.create(input=[[101, 10**9, 102]], model="x")
    assert "outside the vocabulary" in outside.value.message


def test_the_sdk_raises_bad_request_for_empty_input(float32_server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as empty:
        client(float32_server.url).embeddings.create(input=[], model="x")
    assert empty.value.status_code == 400
    assert "input is empty" in empty.value.message


def test_tei_embed_and_info_answer_in_teis_shapes(float32_server: ServerProcess) -> None:
    from sentence_transformers import SentenceTransformer

    url = float32_server.url
    normalized = httpx.post(f"{url}/embed", json={"inputs": SENTENCES}).json()
    raw = httpx.post(f"{url}/embed", json={"inputs": SENTENCES[0], "normalize": False}).json()
    model = SentenceTransformer(default_source(), device="cpu")
    reference = model.encode(SENTENCES, normalize_embeddings=True)
    np.testing.assert_allclose(normalized, reference, atol=1e-5)
    assert len(raw) == 1
    np.testing.assert_allclose(raw[0], ours(url, SENTENCES[:1], normalize=False)[0], atol=1e-6)
    info = httpx.get(f"{url}/info").json()
    assert info["model_id"] == DEFAULT_HUB_ID
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 256
    assert info["model_dtype"] == "float32"
    assert info["max_client_batch_size"] == 2048
    assert info["auto_truncate"] is True


def serve_tiny(
    factory: pytest.TempPathFactory, name: str, save: Callable[[Path], Path]
) -> Iterator[tuple[Path, str]]:
    """A float32 server on a tiny model that `save` writes; yields its path and URL."""
    path = save(factory.mktemp(name) / "model")
    log = factory.mktemp("logs") / f"{name}.log"
    server = ServerProcess(
        ["--model", str(path), "--no-compile", "--dtype", "float32"], log
    ).start()
    yield path, server.url
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    yield from serve_tiny(tmp_path_factory, "reranker", save_cross_encoder)


def test_cohere_rerank_is_cross_encoder_predict_best_first(
    reranker: tuple[Path, str],
) -> None:
    from sentence_transformers import CrossEncoder

    path, url = reranker
    documents = list(TEXTS[:5])
    reply = httpx.post(
        f"{url}/v1/rerank",
        json={"query": QUERY, "documents": documents, "top_n": 3, "return_documents": True},
    )
    scores = CrossEncoder(str(path), device="cpu").predict([(QUERY, d) for d in documents])
    order = [int(i) for i in np.argsort(-scores, kind="stable")[:3]]
    body = reply.json()
    assert set(body) == {"id", "results", "model", "usage"}
    assert body["id"] == reply.headers["x-request-id"]
    assert [r["index"] for r in body["results"]] == order
    np.testing.assert_allclose(
        [r["relevance_score"] for r in body["results"]], scores[order], atol=1e-5
    )
    assert [r["document"] for r in body["results"]] == [{"text": documents[i]} for i in order]
    assert body["usage"]["total_tokens"] > 0
    objects = httpx.post(
        f"{url}/v1/rerank",
        json={"query": QUERY, "documents": [{"text": d} for d in documents]},
    ).json()
    assert [set(r) for r in objects["results"]] == [{"index", "relevance_score"}] * 5
    tei = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": documents}).json()
    assert [r["index"] for r in tei][:3] == order
    assert set(tei[0]) == {"index", "score"}


@pytest.fixture(scope="module")
def keyed(tiny_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = ["--model", str(tiny_encoder_dir), "--no-compile", "--api-keys", "sk-test"]
    args += ["--rate-limit-rps", "0.001", "--rate-limit-burst", "2"]
    log = tmp_path_factory.mktemp("logs") / "keyed.log"
    server = ServerProcess(args, log).start()
    yield server.url
    assert server.stop() == 0, server.log()


def test_the_sdk_raises_authentication_and_rate_limit_errors(keyed: str) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        client(keyed, "sk-wrong").embeddings.create(input="x", model="x")
    ai = client(keyed, "sk-test")
    for _ in range(2):  # the burst
        assert len(ai.embeddings.create(input="allowed", model="x").data) == 1
    with pytest.raises(openai.RateLimitError) as limited:
        ai.embeddings.create(input="one too many", model="x")
    assert "invalid API key" in refused.value.message
    assert limited.value.code == "rate_limited"
    assert int(limited.value.response.headers["retry-after"]) >= 1


def test_cohere_client_v2_reranks_as_the_cross_encoder_does(reranker: tuple[Path, str]) -> None:
    """The `cohere` SDK's current client posts to `/v2/rerank`; its typed errors carry
    our message."""
    import cohere
    from sentence_transformers import CrossEncoder

    path, url = reranker
    documents = list(TEXTS[:5])
    co = cohere.ClientV2(base_url=url, api_key="unused")
    ranked = co.rerank(model="rerank-v3.5", query=QUERY, documents=documents, top_n=3)
    everything = co.rerank(model="x", query=QUERY, documents=documents, max_tokens_per_doc=4096)
    scores = CrossEncoder(str(path), device="cpu").predict([(QUERY, d) for d in documents])
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    assert [r.index for r in ranked.results] == order[:3]
    np.testing.assert_allclose(
        [r.relevance_score for r in ranked.results], scores[order[:3]], atol=1e-5
    )
    assert [r.index for r in everything.results] == order
    assert ranked.meta is not None
    assert ranked.meta.tokens is not None
    assert everything.meta is not None
    assert everything.meta.tokens is not None
    assert ranked.meta.tokens.input_tokens == everything.meta.tokens.input_tokens > 0
    with pytest.raises(cohere.BadRequestError) as empty:
        co.rerank(model="x", query=QUERY, documents=[])
    with pytest.raises(cohere.BadRequestError) as short:
        co.rerank(model="x", query=QUERY, documents=documents, max_tokens_per_doc=16)
    assert "documents" in empty.value.body["message"]
    assert "max_tokens_per_doc 16" in short.value.body["message"]
    assert empty.value.body["id"] == empty.value.headers["x-request-id"]


def test_cohere_client_v2_rerank_on_an_embedding_model_says_why(
    float32_server: ServerProcess,
) -> None:
    import cohere

    co = cohere.ClientV2(base_url=float32_server.url, api_key="unused")
    with pytest.raises(cohere.BadRequestError) as wrong:
        co.rerank(model="x", query=QUERY, documents=SENTENCES)
    assert "cross-encoder" in wrong.value.body["message"]


def test_cohere_client_v2_hears_a_wrong_key_as_unauthorized(keyed: str) -> None:
    import cohere

    with pytest.raises(cohere.UnauthorizedError) as refused:
        cohere.ClientV2(base_url=keyed, api_key="sk-wrong").rerank(
            model="x", query=QUERY, documents=SENTENCES
        )
    assert "invalid API key" in refused.value.body["message"]


def test_huggingface_inference_client_embeds_and_compares_as_the_references_do(
    float32_server: ServerProcess,
) -> None:
    """`InferenceClient(base_url=...)` posts everything to `POST /`, which answers by the
    model's task and the body's shape, as TEI's root route does."""
    from huggingface_hub import InferenceClient
    from sentence_transformers import SentenceTransformer

    url = float32_server.url
    hf = InferenceClient(base_url=url)
    vector = hf.feature_extraction(SENTENCES[0])
    raw = hf.feature_extraction(SENTENCES[1], normalize=False)
    similarities = hf.sentence_similarity(SENTENCES[0], other_sentences=SENTENCES[1:])
    st = SentenceTransformer(default_source(), device="cpu")
    reference = st.encode(SENTENCES, convert_to_numpy=True)
    assert vector.shape == (1, 384)
    np.testing.assert_allclose(vector[0], ours(url, SENTENCES[:1])[0], atol=1e-6)
    np.testing.assert_allclose(vector[0], reference[0], atol=1e-5)
    np.testing.assert_allclose(raw[0], ours(url, SENTENCES[1:2], normalize=False)[0], atol=1e-6)
    expected = st.similarity(reference[:1], reference[1:]).numpy()[0]
    np.testing.assert_allclose(similarities, expected, atol=1e-5)
    same = httpx.post(
        f"{url}/similarity",
        json={"inputs": {"source_sentence": SENTENCES[0], "sentences": SENTENCES[1:]}},
    )
    np.testing.assert_allclose(same.json(), similarities, atol=1e-7)
    wrong = httpx.post(f"{url}/", json={"inputs": "x", "parameters": {"top_k": 1}})
    assert wrong.status_code == 422
    assert wrong.json()["error_type"] == "Validation"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    yield from serve_tiny(tmp_path_factory, "classifier", save_nli_classifier)


def test_huggingface_inference_client_classifies_as_the_pipeline_does(
    classifier: tuple[Path, str],
) -> None:
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import pipeline

    path, url = classifier
    hf = InferenceClient(base_url=url)
    text = SENTENCES[1]
    every = hf.text_classification(text)
    best_two = hf.text_classification(text, top_k=2)
    logits = hf.text_classification(text, function_to_apply="none")
    reference = pipeline("text-classification", model=str(path), device="cpu", top_k=None)
    [expected] = reference([text])
    [raw] = reference([text], function_to_apply="none")
    assert [e.label for e in every] == [e["label"] for e in expected]
    np.testing.assert_allclose([e.score for e in every], [e["score"] for e in expected], atol=1e-5)
    assert [e.label for e in best_two] == [e["label"] for e in expected[:2]]
    assert [e.label for e in logits] == [e["label"] for e in raw]
    np.testing.assert_allclose([e.score for e in logits], [e["score"] for e in raw], atol=1e-4)
    with pytest.raises(HfHubHTTPError) as refused:
        hf.text_classification(text, function_to_apply="sigmoid")
    assert refused.value.response.status_code == 422
    assert "function_to_apply 'sigmoid'" in refused.value.response.json()["error"]
    with pytest.raises(HfHubHTTPError) as not_an_embedder:  # normalize is /embed's field
        hf.feature_extraction(text, normalize=True)
    assert not_an_embedder.value.response.status_code == 422


def test_tei_decode_gives_back_the_tokenizers_text(float32_server: ServerProcess) -> None:
    from transformers import AutoTokenizer

    url = float32_server.url
    tokens = httpx.post(f"{url}/tokenize", json={"inputs": SENTENCES}).json()
    ids = [[t["id"] for t in sequence] for sequence in tokens]
    plain = httpx.post(f"{url}/decode", json={"ids": ids})
    special = httpx.post(f"{url}/decode", json={"ids": ids[0], "skip_special_tokens": False})
    outside = httpx.post(f"{url}/decode", json={"ids": [101, 10**6]})
    reference = AutoTokenizer.from_pretrained(default_source())
    assert plain.json() == [reference.decode(s, skip_special_tokens=True) for s in ids]
    assert special.json() == [reference.decode(ids[0], skip_special_tokens=False)]
    assert outside.status_code == 422
    assert "outside the vocabulary" in outside.json()["error"]


def test_cohere_client_v2_embeds_every_embedding_type_in_one_reply(
    float32_server: ServerProcess,
) -> None:
    """`ClientV2.embed` posts to `/v2/embed`: float is `/predict`'s vector; binary and
    ubinary are `quantize_embeddings` of it; int8 and uint8 too, by the ranges the server
    publishes (`GET /model/calibration`); base64 is its float32 bytes."""
    import base64

    import cohere
    from sentence_transformers import quantize_embeddings

    url = float32_server.url
    co = cohere.ClientV2(base_url=url, api_key="unused")
    kinds = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    got = co.embed(model="embed-v4.0", texts=SENTENCES, input_type="search_document",
                   embedding_types=kinds)  # fmt: skip
    floats = ours(url, SENTENCES)
    e = got.embeddings
    assert e.float_ is not None
    np.testing.assert_allclose(e.float_, floats, atol=1e-6)
    ranges = np.array(httpx.get(f"{url}/model/calibration").json()["ranges"], dtype=np.float32)
    exact = np.array(e.float_, dtype=np.float32)
    for kind in ("binary", "ubinary"):
        assert getattr(e, kind) == quantize_embeddings(exact, kind).tolist()
    for kind in ("int8", "uint8"):
        assert getattr(e, kind) == quantize_embeddings(exact, kind, ranges=ranges).tolist()
    assert e.base64 is not None
    decoded = [np.frombuffer(base64.b64decode(b), dtype="<f4") for b in e.base64]
    np.testing.assert_array_equal(decoded, exact)
    assert got.texts == SENTENCES
    assert got.meta is not None
    assert got.meta.billed_units is not None
    tokens = httpx.post(f"{url}/tokenize", json={"inputs": SENTENCES}).json()
    assert got.meta.billed_units.input_tokens == sum(len(t) for t in tokens)
    short = co.embed(model="x", texts=SENTENCES, input_type="search_query", output_dimension=64,
                     embedding_types=["float", "ubinary", "int8"])  # fmt: skip
    cut = httpx.get(f"{url}/model/calibration", params={"dimensions": 64}).json()
    assert cut["dimensions"] == 64
    assert len(cut["ranges"][0]) == 64
    exact_cut = np.array(short.embeddings.float_, dtype=np.float32)
    assert (
        short.embeddings.int8
        == quantize_embeddings(
            exact_cut, "int8", ranges=np.array(cut["ranges"], dtype=np.float32)
        ).tolist()
    )
    np.testing.assert_allclose(short.embeddings.float_, ours(url, SENTENCES, dimensions=64),
                               atol=1e-6)  # fmt: skip
    assert short.embeddings.ubinary is not None
    assert len(short.embeddings.ubinary[0]) == 8


def test_cohere_client_v2_embed_cuts_or_refuses_long_texts_and_says_why(
    float32_server: ServerProcess,
) -> None:
    import cohere

    url = float32_server.url
    co = cohere.ClientV2(base_url=url, api_key="unused")
    long = " ".join(f"word{i}" for i in range(400))
    end = co.embed(model="x", texts=[long], input_type="search_document", truncate="END")
    start = co.embed(model="x", texts=[long], input_type="search_document", truncate="START")
    cut = httpx.post(f"{url}/embed", json={"inputs": long, "truncation_direction": "left"})
    np.testing.assert_allclose(end.embeddings.float_[0], ours(url, [long])[0], atol=1e-6)
    np.testing.assert_allclose(start.embeddings.float_[0], cut.json()[0], atol=1e-6)
    with pytest.raises(cohere.BadRequestError) as refused:
        co.embed(model="x", texts=[long], input_type="search_document", truncate="NONE")
    assert "limit of 256 tokens (truncate: NONE)" in refused.value.body["message"]
    with pytest.raises(cohere.BadRequestError) as image:
        co.embed(model="x", images=["data:image/png;base64,AAAA"], input_type="image")
    assert "is a text model" in image.value.body["message"]
    with pytest.raises(cohere.BadRequestError) as short:
        co.embed(model="x", texts=["a"], input_type="search_query", max_tokens=8)
    assert "max_tokens 8" in short.value.body["message"]


def test_quantized_bytes_of_a_text_do_not_depend_on_its_batch(
    float32_server: ServerProcess,
) -> None:
    """The int8 ranges are fixed at start: a text alone and among others gets the same
    bytes; and `/predict` quantizes as sentence-transformers does."""
    from sentence_transformers import quantize_embeddings

    url = float32_server.url
    ranges = np.array(httpx.get(f"{url}/model/calibration").json()["ranges"], dtype=np.float32)
    others = [f"another text about topic {i}" for i in range(12)]
    for kind in ("int8", "uint8", "binary", "ubinary"):
        alone = httpx.post(f"{url}/predict", json={"text": SENTENCES[0], "embedding_type": kind})
        among = ours(url, [*others, SENTENCES[0]], embedding_type=kind)
        assert alone.json()["embedding"] == among[-1].tolist()
        floats = ours(url, SENTENCES[:1]).astype(np.float32)
        expected = quantize_embeddings(floats, kind, ranges=ranges if "int8" in kind else None)
        assert alone.json()["embedding"] == expected[0].tolist()
    packed = httpx.post(f"{url}/predict", json={"text": SENTENCES[0], "embedding_type": "int8",
                                                "encoding_format": "base64"})  # fmt: skip
    import base64

    raw = np.frombuffer(base64.b64decode(packed.json()["embedding"]), dtype=np.int8)
    assert raw.tolist() == ours(url, SENTENCES[:1], embedding_type="int8")[0].tolist()


def test_embed_all_gives_the_references_token_embeddings(float32_server: ServerProcess) -> None:
    """TEI's `/embed_all`: per input, one vector per token that `/tokenize` shows."""
    from sentence_transformers import SentenceTransformer

    url = float32_server.url
    got = httpx.post(f"{url}/embed_all", json={"inputs": SENTENCES})
    assert got.status_code == 200, got.text
    st = SentenceTransformer(default_source(), device="cpu")
    tokens = httpx.post(f"{url}/tokenize", json={"inputs": SENTENCES}).json()
    for text, matrix, shown in zip(SENTENCES, got.json(), tokens, strict=True):
        want = st.encode([text], output_value="token_embeddings")[0].numpy()
        assert np.array(matrix).shape == want.shape == (len(shown), 384)
        np.testing.assert_allclose(matrix, want, atol=1e-5)
    same = httpx.post(f"{url}/predict", json={"text": SENTENCES[1], "token_embeddings": True})
    np.testing.assert_allclose(same.json()["embedding"], got.json()[1], atol=1e-7)
    wrong = httpx.post(f"{url}/predict", json={"text": "x", "token_embeddings": True,
                                               "embedding_type": "int8"})  # fmt: skip
    assert wrong.status_code == 422
    assert "float JSON numbers only" in wrong.text


@pytest.fixture(scope="module")
def prompted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    [kind] = [k for k in EMBEDDERS if k.name == "prompts-excluded-from-pooling"]
    yield from serve_tiny(tmp_path_factory, "prompted", lambda p: save_embedder(p, kind))


def test_cohere_input_type_picks_the_models_prompt(prompted: tuple[Path, str]) -> None:
    import cohere

    _, url = prompted
    co = cohere.ClientV2(base_url=url, api_key="unused")
    # sentence-transformers 6 saves an empty "document" prompt beside the model's own.
    prompts = httpx.get(f"{url}/model").json()["prompts"]
    document = "document" if "document" in prompts else "passage"
    for input_type, prompt in [("search_query", "query"), ("search_document", document),
                               ("clustering", "query")]:  # fmt: skip
        got = co.embed(model="x", texts=SENTENCES, input_type=input_type)
        expected = ours(url, SENTENCES, prompt_name=prompt)
        np.testing.assert_allclose(got.embeddings.float_, expected, atol=1e-6, err_msg=input_type)


def test_a_chunked_long_text_is_the_token_weighted_mean_of_its_windows(
    float32_server: ServerProcess,
) -> None:
    """`"truncate": false, "chunking": "mean"`: windows of 254 of the text's tokens
    between [CLS] and [SEP], each pooled by sentence-transformers' own modules, averaged
    by their token counts, then normalised as the model's Normalize does."""
    import torch
    from sentence_transformers import SentenceTransformer

    url = float32_server.url
    text = " ".join(f"sentence {i} says something about queues and batches." for i in range(60))
    got = httpx.post(f"{url}/predict", json={"text": text, "truncate": False, "chunking": "mean"})
    assert got.status_code == 200, got.text
    st = SentenceTransformer(default_source(), device="cpu")
    tokenizer = st.tokenizer
    content = tokenizer(text, add_special_tokens=False)["input_ids"]
    runs = [content[i : i + 254] for i in range(0, len(content), 254)]
    assert len(runs) >= 3
    pooled = []
    for run in runs:
        ids = torch.tensor([[tokenizer.cls_token_id, *run, tokenizer.sep_token_id]])
        features = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "token_type_ids": torch.zeros_like(ids)}  # fmt: skip
        with torch.no_grad():
            pooled.append(st[1](st[0](features))["sentence_embedding"][0].numpy())
    mean = np.average(pooled, axis=0, weights=[len(r) for r in runs])
    np.testing.assert_allclose(got.json()["embedding"], mean / np.linalg.norm(mean), atol=1e-6)
    short = ours(url, SENTENCES, chunking="mean", truncate=False)
    np.testing.assert_array_equal(short, ours(url, SENTENCES))
    no_room = httpx.post(f"{url}/predict", json={"text": text, "chunking": "mean",
                                                 "prompt": "word " * 300})  # fmt: skip
    assert no_room.status_code == 422
    assert "the prompt leaves no room" in no_room.text


@pytest.fixture(scope="module")
def splade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    yield from serve_tiny(tmp_path_factory, "splade", save_sparse_encoder)


def test_embed_sparse_gives_sparse_encoder_encode(splade: tuple[Path, str]) -> None:
    """TEI's `/embed_sparse` and `/predict` on a SPLADE model: every nonzero weight, by
    vocabulary index, as `SparseEncoder.encode` computes them; `top_k` keeps the largest."""
    from sentence_transformers import SparseEncoder

    path, url = splade
    st = SparseEncoder(str(path), device="cpu")
    reference = st.encode(SENTENCES).to_dense().numpy()
    got = httpx.post(f"{url}/embed_sparse", json={"inputs": SENTENCES})
    assert got.status_code == 200, got.text
    for row, weights in enumerate(got.json()):
        indices = [w["index"] for w in weights]
        assert indices == list(np.flatnonzero(reference[row]))
        np.testing.assert_allclose([w["value"] for w in weights], reference[row, indices],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    one = httpx.post(f"{url}/predict", json={"text": SENTENCES[0], "top_k": 3}).json()
    kept = st.encode(SENTENCES[:1], max_active_dims=3).to_dense().numpy()[0]
    assert [w["index"] for w in one["sparse"]] == list(np.flatnonzero(kept))
    root = httpx.post(f"{url}/", json={"inputs": SENTENCES[:1]})
    assert root.json() == got.json()[:1]
    dense = httpx.post(f"{url}/embed", json={"inputs": "x"})
    assert dense.status_code == 400
    assert "needs an embedding model" in dense.json()["error"]
    wrong = httpx.post(f"{url}/predict", json={"text": "x", "dimensions": 8})
    assert wrong.status_code == 422
    assert "not to sparse vectors" in wrong.text


def test_llamaindex_tei_client_embeds_as_predict_does(float32_server: ServerProcess) -> None:
    """LlamaIndex's `TextEmbeddingsInference` posts to `/embed`: a new URL is all it needs."""
    import asyncio

    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    url = float32_server.url
    client = TextEmbeddingsInference(model_name="any", base_url=url, timeout=60)
    one = client.get_text_embedding(SENTENCES[0])
    query = client.get_query_embedding(SENTENCES[1])
    batch = client.get_text_embedding_batch(SENTENCES)
    later = asyncio.run(client.aget_text_embedding(SENTENCES[2]))
    reference = ours(url, SENTENCES)
    np.testing.assert_allclose(one, reference[0], atol=1e-7)
    np.testing.assert_allclose(query, reference[1], atol=1e-7)
    np.testing.assert_allclose(batch, reference, atol=1e-7)
    np.testing.assert_allclose(later, reference[2], atol=1e-7)


@pytest.fixture(scope="module")
def inference_free(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    yield from serve_tiny(tmp_path_factory, "if", save_inference_free_sparse_encoder)


def test_an_inference_free_models_queries_never_reach_the_engine(
    inference_free: tuple[Path, str],
) -> None:
    """`"input_type": "query"` on an inference-free SPLADE model: `encode_query`'s weights,
    from the static table, answered without a batch; documents by the model."""
    from sentence_transformers import SparseEncoder

    path, url = inference_free
    st = SparseEncoder(str(path), device="cpu")
    queries = st.encode_query(SENTENCES).to_dense().numpy()
    documents = st.encode_document(SENTENCES).to_dense().numpy()
    before = httpx.get(f"{url}/metrics").text
    got = httpx.post(f"{url}/embed_sparse", json={"inputs": SENTENCES, "input_type": "query"})
    after = httpx.get(f"{url}/metrics").text
    assert got.status_code == 200, got.text
    assert got.headers["x-batch-size"] == "0"
    assert metric(after, "microbatch_batches_total") == metric(before, "microbatch_batches_total")
    for row, weights in enumerate(got.json()):
        assert [w["index"] for w in weights] == list(np.flatnonzero(queries[row]))
        np.testing.assert_allclose([w["value"] for w in weights],
                                   queries[row][queries[row] != 0], rtol=1e-6)  # fmt: skip
    document = httpx.post(f"{url}/predict/batch", json={"texts": SENTENCES}).json()["results"]
    for row, result in enumerate(document):
        indices = [w["index"] for w in result["sparse"]]
        np.testing.assert_allclose([w["value"] for w in result["sparse"]],
                                   documents[row, indices], atol=1e-5, rtol=1e-5)  # fmt: skip
    ids = httpx.post(f"{url}/embed_sparse", json={"inputs": [[101, 102]], "input_type": "query"})
    assert ids.status_code == 422
    assert "not token ids" in ids.text
