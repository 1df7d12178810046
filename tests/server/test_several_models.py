"""Several models in one real server: an embedder, a cross-encoder and a classifier built
from configs, served side by side (`--model NAME=PATH` repeated), each request routed by
its `model`, each answer checked against the reference library for that model, and every
per-model reading (metrics, /model, /admin/batching, the dashboard) kept apart."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import ServerProcess
from tests.server.live import metric
from tests.tiny_models import TEXTS, Kind, save_cross_encoder, save_embedder, save_nli_classifier

pytestmark = [pytest.mark.slow, pytest.mark.reference]

QUERY = "what is dynamic micro-batching?"


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Path], str]]:
    """One server on three tiny models; yields their paths by name, and its URL."""
    root = tmp_path_factory.mktemp("models")
    paths = {
        "emb": save_embedder(root / "emb", Kind("cls", pooling="cls")),
        "rr": save_cross_encoder(root / "rr"),
        "nli": save_nli_classifier(root / "nli"),
    }
    models = [arg for name, path in paths.items() for arg in ("--model", f"{name}={path}")]
    log = tmp_path_factory.mktemp("logs") / "three.log"
    server = ServerProcess([*models, "--no-compile", "--dtype", "float32"], log).start()
    yield paths, server.url
    assert server.stop() == 0, server.log()


def test_every_model_is_listed_with_its_task_and_state(three: tuple[dict[str, Path], str]) -> None:
    _, url = three
    listed = openai.OpenAI(base_url=f"{url}/v1", api_key="unused").models.list()
    by_id = {m.id: m.model_dump() for m in listed.data}
    assert list(by_id) == ["emb", "rr", "nli"]
    assert [by_id[n]["task"] for n in by_id] == ["embed", "rerank", "classify"]
    assert by_id["emb"]["pooling"] == ["cls"]
    assert by_id["rr"]["pooling"] is None
    assert all(m["status"] == "ready" for m in by_id.values())
    assert [m["default"] for m in by_id.values()] == [True, False, False]
    info = httpx.get(f"{url}/model").json()
    assert info["name"] == "emb"
    assert [m["name"] for m in info["models"]] == ["emb", "rr", "nli"]
    assert httpx.get(f"{url}/model", params={"model": "rr"}).json()["task"] == "rerank"


def test_each_request_goes_to_the_model_it_names(three: tuple[dict[str, Path], str]) -> None:
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from transformers import pipeline

    paths, url = three
    texts = list(TEXTS[:4])
    ai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    reply = ai.embeddings.create(input=texts, model="emb")
    ours = np.array([d.embedding for d in reply.data])
    reference = SentenceTransformer(str(paths["emb"]), device="cpu").encode(texts)
    assert reply.model == "emb"
    assert np.min(np.sum(ours * reference, axis=1)) > 0.9999
    # Naming none is the default model, the embedder.
    default = httpx.post(f"{url}/predict", json={"text": texts[0]}).json()
    assert default["model"] == "emb"
    assert np.dot(default["embedding"], reference[0]) > 0.9999

    ranked = httpx.post(
        f"{url}/v1/rerank", json={"model": "rr", "query": QUERY, "documents": texts}
    ).json()
    scores = CrossEncoder(str(paths["rr"]), device="cpu").predict([(QUERY, t) for t in texts])
    assert ranked["model"] == "rr"
    assert [r["index"] for r in ranked["results"]] == list(np.argsort(-scores, kind="stable"))
    tei = httpx.post(f"{url}/rerank", json={"model": "rr", "query": QUERY, "texts": texts})
    assert [r["index"] for r in tei.json()] == list(np.argsort(-scores, kind="stable"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classify = pipeline("text-classification", model=str(paths["nli"]), device="cpu")
        expected = [r["label"] for r in classify(texts)]
    labels = [
        httpx.post(f"{url}/predict", json={"model": "nli", "text": t}).json()["label"]
        for t in texts
    ]
    assert labels == expected


def test_an_unknown_model_is_404_naming_the_served_ones(three: tuple[dict[str, Path], str]) -> None:
    _, url = three
    ai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        ai.embeddings.create(input="x", model="text-embedding-3-small")
    assert "served: emb, rr, nli" in missing.value.message
    ours = httpx.post(f"{url}/predict", json={"model": "nope", "text": "x"})
    assert ours.status_code == 404
    assert ours.json()["type"] == "model_not_found"
    tei = httpx.post(f"{url}/embed", json={"model": "nope", "inputs": "x"})
    assert tei.status_code == 404
    assert "served: emb, rr, nli" in tei.json()["error"]
    v2 = httpx.post(f"{url}/v2/rerank", json={"model": "nope", "query": "q", "documents": ["d"]})
    assert v2.status_code == 404
    assert "'nope'" in v2.json()["message"]
    # A model that exists but does the wrong task: 400, as with one model.
    wrong = httpx.post(f"{url}/v1/embeddings", json={"model": "rr", "input": "x"})
    assert wrong.status_code == 400
    assert wrong.json()["error"]["code"] == "wrong_task"


def test_settings_metrics_and_the_dashboard_are_per_model(
    three: tuple[dict[str, Path], str],
) -> None:
    _, url = three
    before = httpx.get(f"{url}/admin/batching", params={"model": "emb"}).json()
    changed = httpx.patch(
        f"{url}/admin/batching", params={"model": "rr"}, json={"max_wait_ms": 7}
    ).json()
    assert changed["max_wait_ms"] == 7
    assert httpx.get(f"{url}/admin/batching", params={"model": "rr"}).json()["max_wait_ms"] == 7
    assert httpx.get(f"{url}/admin/batching", params={"model": "emb"}).json() == before
    httpx.post(f"{url}/rerank", json={"model": "rr", "query": QUERY, "texts": ["a", "b"]})
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, 'microbatch_items_total{model="rr",outcome="ok"}') >= 2
    assert metric(text, 'microbatch_max_wait_seconds{model="rr"}') == pytest.approx(0.007)
    assert metric(text, 'microbatch_max_wait_seconds{model="emb"}') == before["max_wait_ms"] / 1e3
    data = httpx.get(f"{url}/dashboard/data", params={"model": "rr"}).json()
    assert data["model"] == "rr"
    assert data["models"] == ["emb", "rr", "nli"]
    assert data["batching"]["max_wait_ms"] == 7
    assert httpx.get(f"{url}/admin/batching", params={"model": "x"}).status_code == 404


def test_models_are_named_by_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.settings import Settings
    from server.specs import ModelSpec

    monkeypatch.delenv("MICROBATCH_MODEL", raising=False)
    assert Settings().model_specs() == [ModelSpec(None, None)]  # the built-in model
    assert Settings(model="/p").model_specs() == [ModelSpec(None, "/p")]
    ordered = Settings(model=("emb=/a", "rr=/b"), default_model="rr").model_specs()
    assert ordered == [ModelSpec("rr", "/b"), ModelSpec("emb", "/a")]
    monkeypatch.setenv("MICROBATCH_MODEL", "emb=/a, rr=/b")
    assert [m.name for m in Settings().model_specs()] == ["emb", "rr"]
