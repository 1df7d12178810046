"""Every kind of model, served by a real `microbatch serve` process, answers what the
reference library computes for the same inputs: `SentenceTransformer.encode`,
`CrossEncoder.predict`, transformers' text-classification pipeline."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import ServerProcess
from tests.tiny_models import (
    EMBEDDERS,
    TEXTS,
    Kind,
    save_cross_encoder,
    save_embedder,
    save_multi_label_classifier,
    save_nli_classifier,
)

pytestmark = [pytest.mark.slow, pytest.mark.reference]
warnings.filterwarnings("ignore", category=FutureWarning)

QUERY = "what is dynamic micro-batching?"

BUILDERS: dict[str, Callable[[Path], Path]] = {
    **{k.name: (lambda path, k=k: save_embedder(path, k)) for k in EMBEDDERS},  # type: ignore[misc]
    "cross-encoder": save_cross_encoder,
    "cross-encoder-legacy": lambda path: save_cross_encoder(path, "legacy"),
    "multi-label": save_multi_label_classifier,
    "nli": save_nli_classifier,
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, str]]]:
    """One server per kind of model, started side by side: name -> (model dir, URL)."""
    paths = {
        name: build(tmp_path_factory.mktemp(name) / "model") for name, build in BUILDERS.items()
    }
    logs = tmp_path_factory.mktemp("logs")
    processes = {
        name: ServerProcess(
            ["--model", str(path), "--no-compile", "--dtype", "float32"], logs / f"{name}.log"
        )
        for name, path in paths.items()
    }
    with ThreadPoolExecutor(max_workers=len(processes)) as pool:
        started = {name: pool.submit(p.start, 300) for name, p in processes.items()}
        failures = {name: f.exception() for name, f in started.items() if f.exception()}
    try:
        assert not failures, failures
        yield {name: (paths[name], processes[name].url) for name in processes}
    finally:
        for process in processes.values():
            if process.process is not None:
                assert process.stop() == 0, process.log()


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def embeddings(url: str, **options: Any) -> np.ndarray:
    r = post(url, "/predict/batch", {"texts": TEXTS, **options})
    assert r.status_code == 200, r.text
    return np.array([result["embedding"] for result in r.json()["results"]])


def assert_same_vectors(ours: np.ndarray, reference: np.ndarray) -> float:
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1)
    cosine /= np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(
        np.linalg.norm(ours, axis=1), np.linalg.norm(reference, axis=1), rtol=1e-4
    )
    return float(cosine.min())


@pytest.mark.parametrize("kind", EMBEDDERS, ids=lambda k: k.name)
def test_served_embeddings_equal_sentence_transformers(
    servers: dict[str, tuple[Path, str]], kind: Kind
) -> None:
    from sentence_transformers import SentenceTransformer

    path, url = servers[kind.name]
    st = SentenceTransformer(str(path), device="cpu")
    assert_same_vectors(embeddings(url), st.encode(TEXTS))
    for name in kind.prompts:
        assert_same_vectors(embeddings(url, prompt_name=name), st.encode(TEXTS, prompt_name=name))
    reference = st.encode(TEXTS, truncate_dim=4, normalize_embeddings=True)
    assert_same_vectors(embeddings(url, dimensions=4, normalize=True), reference)
    # One text alone equals the same text inside a batch of longer ones.
    r = post(url, "/predict", {"text": TEXTS[5]})
    assert_same_vectors(np.array([r.json()["embedding"]]), st.encode(TEXTS[5:6]))

    model = httpx.get(f"{url}/model").json()
    modes = (kind.pooling,) if isinstance(kind.pooling, str) else kind.pooling
    assert model["task"] == "embed"
    assert model["pooling"] == list(modes)
    assert model["normalize"] is kind.normalize
    assert model["dimension"] == st.get_embedding_dimension()
    assert model["default_prompt_name"] == kind.default_prompt_name


@pytest.mark.parametrize("name", ["cross-encoder", "cross-encoder-legacy"])
def test_rerank_equals_cross_encoder_predict_best_first(
    servers: dict[str, tuple[Path, str]], name: str
) -> None:
    from sentence_transformers import CrossEncoder

    path, url = servers[name]
    reference = CrossEncoder(str(path), device="cpu").predict([(QUERY, t) for t in TEXTS])
    r = post(url, "/rerank", {"query": QUERY, "texts": TEXTS, "return_text": True})
    assert r.status_code == 200, r.text
    ranked = r.json()
    assert sorted(x["index"] for x in ranked) == list(range(len(TEXTS)))
    assert [x["score"] for x in ranked] == sorted((x["score"] for x in ranked), reverse=True)
    for x in ranked:
        assert x["score"] == pytest.approx(float(reference[x["index"]]), abs=1e-4)
        assert x["text"] == TEXTS[x["index"]]
    top = post(url, "/rerank", {"query": QUERY, "texts": TEXTS, "top_n": 2}).json()
    assert [x["index"] for x in top] == [x["index"] for x in ranked[:2]]
    assert all("text" not in x for x in top)
    # The same pair through /predict.
    one = post(url, "/predict", {"text": QUERY, "text_pair": TEXTS[1]}).json()
    assert one["score"] == pytest.approx(float(reference[1]), abs=1e-4)


def test_raw_scores_are_the_cross_encoder_logits(servers: dict[str, tuple[Path, str]]) -> None:
    from sentence_transformers import CrossEncoder
    from torch import nn

    path, url = servers["cross-encoder"]
    pairs = [(QUERY, t) for t in TEXTS]
    logits = CrossEncoder(str(path), device="cpu").predict(pairs, activation_fn=nn.Identity())
    body = {"query": QUERY, "texts": TEXTS, "raw_scores": True}
    for x in post(url, "/rerank", body).json():
        assert x["score"] == pytest.approx(float(logits[x["index"]]), abs=1e-4)


def test_a_long_rerank_is_batched_not_queued_behind_itself(
    servers: dict[str, tuple[Path, str]],
) -> None:
    from sentence_transformers import CrossEncoder

    path, url = servers["cross-encoder"]
    texts = [f"passage {i}: " + " ".join(["batching"] * (i % 40)) for i in range(200)]
    r = post(url, "/rerank", {"query": QUERY, "texts": texts})
    assert r.status_code == 200, r.text
    assert int(r.headers["x-batch-size"]) > 1  # pairs shared forward passes
    reference = CrossEncoder(str(path), device="cpu").predict([(QUERY, t) for t in texts])
    for x in r.json():
        assert x["score"] == pytest.approx(float(reference[x["index"]]), abs=1e-4)


def _pipeline(path: Path) -> Any:
    from transformers import pipeline

    return pipeline("text-classification", model=str(path), device="cpu", top_k=None)


def test_multi_label_scores_are_sigmoids_as_transformers_computes_them(
    servers: dict[str, tuple[Path, str]],
) -> None:
    path, url = servers["multi-label"]
    reference = _pipeline(path)(TEXTS, truncation=True)
    r = post(url, "/predict/batch", {"texts": TEXTS, "all_scores": True})
    assert r.status_code == 200, r.text
    for ours, expected in zip(r.json()["results"], reference, strict=True):
        by_label = {e["label"]: e["score"] for e in expected}
        assert ours["scores"] == pytest.approx(by_label, abs=1e-4)
        assert ours["label"] == max(by_label, key=by_label.__getitem__)


def test_pairs_classify_as_the_pipeline_classifies_them(
    servers: dict[str, tuple[Path, str]],
) -> None:
    path, url = servers["nli"]
    pipe = _pipeline(path)
    premise = "A man is playing a guitar on stage."
    body = {"texts": [premise] * len(TEXTS), "text_pairs": TEXTS, "all_scores": True}
    r = post(url, "/predict/batch", body)
    assert r.status_code == 200, r.text
    for text, ours in zip(TEXTS, r.json()["results"], strict=True):
        expected = pipe({"text": premise, "text_pair": text}, truncation=True)
        assert ours["scores"] == pytest.approx({e["label"]: e["score"] for e in expected}, abs=1e-4)


def error(r: httpx.Response) -> tuple[int, str, str]:
    body = r.json()
    detail = body["detail"]
    if isinstance(detail, list):
        return r.status_code, ".".join(map(str, detail[0]["loc"])), detail[0]["msg"]
    return r.status_code, body["type"], detail


def test_options_a_model_cannot_honour_get_422_saying_what_is_allowed(
    servers: dict[str, tuple[Path, str]],
) -> None:
    _, embed = servers["prompts-excluded-from-pooling"]
    _, rerank = servers["cross-encoder"]
    cases = [
        (embed, {"text": "a", "prompt_name": "nope"}, "body.prompt_name", "'passage', 'query'"),
        (embed, {"text": "a", "prompt_name": "query", "prompt": "q: "}, "body.prompt", "not both"),
        (embed, {"text": "a", "dimensions": 999}, "body.dimensions", "between 1 and 32"),
        (embed, {"text": "a", "dimensions": 0}, "body.dimensions", "greater than or equal to 1"),
        (embed, {"text": "a", "text_pair": "b"}, "body.text_pair", "embeds single texts"),
        (embed, {"text": "a", "raw_scores": True}, "body.raw_scores", "classify and rerank"),
        (embed, {"text": "a", "all_scores": True}, "body.all_scores", "classify and rerank"),
        (rerank, {"text": "a", "normalize": True}, "body.normalize", "embedding models"),
        (rerank, {"text": "a", "prompt": "q: "}, "body.prompt", "embedding models"),
        (embed, {"text": "word " * 300, "truncate": False}, "body.text", "limit of 128 tokens"),
    ]
    for url, body, where, message in cases:
        status, loc, msg = error(post(url, "/predict", body))
        assert (status, loc) == (422, where), (body, msg)
        assert message in msg, (body, msg)
    r = post(embed, "/predict", {"text": "word " * 300})
    assert (r.status_code, r.json()["truncated"]) == (200, True)
    r = post(embed, "/rerank", {"query": "q", "texts": ["a"]})
    status, kind, msg = error(r)
    assert (status, kind) == (400, "wrong_task")
    assert "/rerank needs a cross-encoder" in msg
    r = post(rerank, "/predict/batch", {"texts": ["a", "b"], "text_pairs": ["c"]})
    assert error(r)[:2] == (422, "body.text_pairs")
    # The servers keep serving.
    assert post(embed, "/predict", {"text": "still fine"}).status_code == 200
    assert post(rerank, "/rerank", {"query": "q", "texts": ["a"]}).status_code == 200
