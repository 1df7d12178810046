"""Triton's own clients (`tritonclient.http`, with and without binary tensors, and
`tritonclient.grpc`, blocking and asyncio) against real `microbatch serve` processes in
float32: every route they call, embeddings equal to `/predict`'s, scores and labels
equal to the reference libraries', errors raised with our reason."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ServerProcess
from tests.tiny_models import save_cross_encoder, save_nli_classifier

pytestmark = [pytest.mark.slow, pytest.mark.reference]
warnings.filterwarnings("ignore", category=FutureWarning)
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
grpc_aio = pytest.importorskip("tritonclient.grpc.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Dynamic batching groups requests that arrive close together.",
    "Paris is the capital of France.",
    "ünïcödé and emoji 🚀 travel as UTF-8 bytes",
]
MODEL = "all-MiniLM-L6-v2"
"""Any name: a server of one model answers to every name, as Triton's clients need one."""


def texts(values: list[str], shape: list[int] | None = None) -> np.ndarray:
    array = np.array([v.encode() for v in values], dtype=np.object_)
    return array.reshape(shape or [len(values)])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def predicted(url: str, values: list[str], **options: object) -> np.ndarray:
    r = httpx.post(f"{url}/predict/batch", json={"texts": values, **options}, timeout=60)
    assert r.status_code == 200, r.text
    return np.asarray([x["embedding"] for x in r.json()["results"]])


def http_infer(url: str, values: list[str], *, binary: bool, **params: object) -> np.ndarray:
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    tensor = httpclient.InferInput("text", [len(values), 1], "BYTES")
    tensor.set_data_from_numpy(texts(values, [len(values), 1]), binary_data=binary)
    wanted = [httpclient.InferRequestedOutput("embedding", binary_data=binary)]
    result = client.infer(MODEL, [tensor], outputs=wanted, parameters=params or None)
    return result.as_numpy("embedding")


def grpc_infer(target: str, values: list[str], **params: object) -> np.ndarray:
    client = grpcclient.InferenceServerClient(target)
    tensor = grpcclient.InferInput("text", [len(values)], "BYTES")
    tensor.set_data_from_numpy(texts(values))
    result = client.infer(MODEL, [tensor], parameters=params or None, client_timeout=60)
    return result.as_numpy("embedding")


def test_every_client_gets_the_embeddings_predict_computes(float32_server: ServerProcess) -> None:
    url, target = float32_server.url, float32_server.grpc_target
    ours = predicted(url, SENTENCES)
    for name, theirs in {
        "http json": http_infer(url, SENTENCES, binary=False),
        "http binary": http_infer(url, SENTENCES, binary=True),
        "grpc": grpc_infer(target, SENTENCES),
    }.items():
        assert theirs.dtype == np.float32, name
        assert theirs.shape == (4, 384), name
        assert cosines(theirs, ours).min() >= 0.9999, name
    cut = grpc_infer(target, SENTENCES, dimensions=64, normalize=False)
    assert cut.shape == (4, 64)
    assert cosines(cut, predicted(url, SENTENCES, dimensions=64, normalize=False)).min() >= 0.9999
    assert not np.allclose(np.linalg.norm(cut, axis=1), 1.0)


def test_health_and_metadata_through_both_clients(float32_server: ServerProcess) -> None:
    http = httpclient.InferenceServerClient(float32_server.url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(float32_server.grpc_target)
    for client in (http, grpc):
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready(MODEL)
    http_meta = http.get_model_metadata(MODEL)
    grpc_meta = grpc.get_model_metadata(MODEL, as_json=True)
    assert http_meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert http_meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert grpc_meta["outputs"][0]["shape"] == ["-1", "384"]  # protobuf's JSON: int64 as text
    assert http.get_server_metadata()["name"] == grpc.get_server_metadata().name == "microbatch"


def test_clients_raise_our_reason_for_bad_input(float32_server: ServerProcess) -> None:
    http = httpclient.InferenceServerClient(float32_server.url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(float32_server.grpc_target)
    wrong = httpclient.InferInput("texts", [1], "BYTES")
    wrong.set_data_from_numpy(texts(["x"]))
    with pytest.raises(InferenceServerException) as by_http:
        http.infer(MODEL, [wrong])
    assert by_http.value.status() == "400"
    assert "this embed model takes the inputs text" in by_http.value.message()
    tensor = grpcclient.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(texts(["x"]))
    with pytest.raises(InferenceServerException) as by_grpc:
        grpc.infer(MODEL, [tensor], parameters={"dimensions": 0})
    assert by_grpc.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "dimensions" in by_grpc.value.message()


def test_concurrent_asyncio_calls_are_batched_and_each_gets_its_own(
    float32_server: ServerProcess,
) -> None:
    values = [f"sentence number {i} about batching" for i in range(24)]
    ours = predicted(float32_server.url, values)

    async def run() -> list[np.ndarray]:
        client = grpc_aio.InferenceServerClient(float32_server.grpc_target)
        try:

            async def one(text: str) -> np.ndarray:
                tensor = grpc_aio.InferInput("text", [1], "BYTES")
                tensor.set_data_from_numpy(texts([text]))
                result = await client.infer(MODEL, [tensor], client_timeout=60)
                return result.as_numpy("embedding")[0]

            return list(await asyncio.gather(*(one(t) for t in values)))
        finally:
            await client.close()

    theirs = np.stack(asyncio.run(run()))
    assert cosines(theirs, ours).min() >= 0.9999


def serve(factory: pytest.TempPathFactory, name: str, path: Path) -> Iterator[ServerProcess]:
    log = factory.mktemp("logs") / f"{name}.log"
    args = ["--model", str(path), "--no-compile", "--dtype", "float32"]
    server = ServerProcess(args, log, grpc=True).start()
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ServerProcess]]:
    path = save_cross_encoder(tmp_path_factory.mktemp("reranker") / "model")
    for server in serve(tmp_path_factory, "reranker", path):
        yield path, server


def test_a_reranker_scores_as_the_cross_encoder_does(
    reranker: tuple[Path, ServerProcess],
) -> None:
    from sentence_transformers import CrossEncoder

    path, server = reranker
    query = "what is dynamic micro-batching?"
    reference = CrossEncoder(str(path), device="cpu").predict([(query, s) for s in SENTENCES])
    client = grpcclient.InferenceServerClient(server.grpc_target)
    docs = grpcclient.InferInput("text", [len(SENTENCES)], "BYTES")
    docs.set_data_from_numpy(texts(SENTENCES))
    asked = grpcclient.InferInput("query", [1], "BYTES")
    asked.set_data_from_numpy(texts([query]))
    every = client.infer(MODEL, [docs, asked])
    best = client.infer(MODEL, [docs, asked], parameters={"top_n": 2})
    assert every.as_numpy("index").tolist() == [0, 1, 2, 3]
    assert np.allclose(every.as_numpy("score"), reference, atol=1e-5)
    order = np.argsort(-reference, kind="stable")[:2]
    assert best.as_numpy("index").tolist() == order.tolist()
    assert np.allclose(best.as_numpy("score"), reference[order], atol=1e-5)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ServerProcess]]:
    path = save_nli_classifier(tmp_path_factory.mktemp("classifier") / "model")
    for server in serve(tmp_path_factory, "classifier", path):
        yield path, server


def test_a_classifier_labels_as_the_pipeline_does(
    classifier: tuple[Path, ServerProcess],
) -> None:
    from transformers import pipeline

    path, server = classifier
    pipe = pipeline("text-classification", model=str(path), device="cpu", top_k=None)
    reference = pipe(SENTENCES)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = httpclient.InferInput("text", [len(SENTENCES)], "BYTES")
    tensor.set_data_from_numpy(texts(SENTENCES), binary_data=True)
    result = client.infer(MODEL, [tensor])
    labels = [label.decode() for label in result.as_numpy("label")]
    scores = result.as_numpy("scores")
    assert labels == [max(r, key=lambda x: x["score"])["label"] for r in reference]
    names = ["contradiction", "entailment", "neutral"]
    expected = [[{x["label"]: x["score"] for x in r}[n] for n in names] for r in reference]
    assert np.allclose(scores, expected, atol=1e-5)
    assert np.allclose(result.as_numpy("score"), scores.max(1), atol=1e-6)
