"""The Open Inference Protocol (KServe v2) over HTTP, in process on fake models: the
tensors of each task equal what `/predict/batch` and `/rerank` answer, in JSON and in
Triton's binary form; bad tensors get a 400 in the protocol's shape (`error`); probes
stay open where keys guard the models. Triton's own clients are in
`tests/server/test_triton_clients.py`."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import numpy as np
import pytest

from server.kserve.tensors import pack_bytes, unpack_bytes
from tests.server.fakes import FakeTextModel, fake_embedding
from tests.server.test_app import serve, wait_until_admitted
from tests.server.test_versions import V1, V2, embedders, route
from tests.server.test_versions import serve as serve_versions

pytestmark = pytest.mark.asyncio

TEXTS = ["a short one", "a rather longer text than that", "x"]


def text_input(
    texts: list[str], name: str = "text", shape: list[int] | None = None
) -> dict[str, Any]:
    return {"name": name, "datatype": "BYTES", "shape": shape or [len(texts)], "data": texts}


def binary_body(
    inputs: list[tuple[str, list[bytes]]], **header: Any
) -> tuple[bytes, dict[str, str]]:
    """A request in Triton's binary form: the JSON header, then each input's bytes."""
    blobs = [pack_bytes(values) for _, values in inputs]
    described = [
        {"name": name, "datatype": "BYTES", "shape": [len(values)],
         "parameters": {"binary_data_size": len(blob)}}
        for (name, values), blob in zip(inputs, blobs, strict=True)
    ]  # fmt: skip
    head = json.dumps({"inputs": described, **header}).encode()
    headers = {"Inference-Header-Content-Length": str(len(head))}
    return head + b"".join(blobs), headers


def read_binary(body: bytes, json_size: int) -> dict[str, np.ndarray | list[bytes]]:
    """The outputs of a binary reply, by name."""
    header = json.loads(body[:json_size])
    found: dict[str, np.ndarray | list[bytes]] = {}
    at = json_size
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        raw = body[at : at + size]
        at += size
        if output["datatype"] == "BYTES":
            found[output["name"]] = unpack_bytes(raw, ())
        else:
            dtype = {"FP32": "<f4", "INT64": "<i8"}[output["datatype"]]
            found[output["name"]] = np.frombuffer(raw, dtype=dtype).reshape(output["shape"])
    assert at == len(body)
    return found


async def test_metadata_and_probes_describe_each_task() -> None:
    async with serve(FakeTextModel()) as client:
        server = (await client.get("/v2")).json()
        live = await client.get("/v2/health/live")
        ready = await client.get("/v2/health/ready")
        model = (await client.get("/v2/models/fake")).json()
        version = await client.get("/v2/models/fake/versions/1")
        model_ready = await client.get("/v2/models/fake/ready")
        missing = await client.get("/v2/models/fake/versions/7")
    assert server["name"] == "microbatch"
    assert "binary_tensor_data" in server["extensions"]
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert model == version.json()
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}]
    assert (model_ready.status_code, model_ready.json()["ready"]) == (200, True)
    assert missing.status_code == 404
    assert "not served" in missing.json()["error"]

    async with serve(FakeTextModel(task="classify")) as client:
        classify = (await client.get("/v2/models/fake")).json()
    assert [o["name"] for o in classify["outputs"]] == ["label", "score", "scores"]
    assert classify["outputs"][2]["shape"] == [-1, 2]
    async with serve(FakeTextModel(task="rerank")) as client:
        rerank = (await client.get("/v2/models/fake")).json()
    assert [i["name"] for i in rerank["inputs"]] == ["text", "query", "text_pair"]
    assert [o["name"] for o in rerank["outputs"]] == ["score", "index"]


async def test_readiness_is_503_while_the_model_warms() -> None:
    model = FakeTextModel()
    model.warm_gate.clear()
    async with serve(model, wait_ready=False) as client:
        ready = await client.get("/v2/health/ready")
        live = await client.get("/v2/health/live")
        model.warm_gate.set()
    assert (ready.status_code, ready.json()) == (503, {"ready": False})
    assert live.status_code == 200


async def test_json_infer_gives_predict_batchs_embeddings_in_order() -> None:
    async with serve(FakeTextModel()) as client:
        r = await client.post("/v2/models/fake/infer", json={
            "id": "req-1", "inputs": [text_input(TEXTS, shape=[3, 1])],
        })  # fmt: skip
        batch = await client.post("/predict/batch", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("fake", "1", "req-1")
    [output] = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("embedding", "FP32", [3, 2])
    expected = [x["embedding"] for x in batch.json()["results"]]
    assert np.asarray(output["data"]).reshape(3, 2).tolist() == expected
    assert expected == [fake_embedding(t) for t in TEXTS]
    assert r.headers["x-model-version"] == "1"


async def test_binary_tensors_in_and_out_carry_the_same_numbers() -> None:
    body, headers = binary_body(
        [("text", [t.encode() for t in TEXTS])], parameters={"binary_data_output": True}
    )
    async with serve(FakeTextModel()) as client:
        r = await client.post("/v2/models/fake/infer", content=body, headers=headers)
        mixed = await client.post("/v2/models/fake/infer", json={
            "inputs": [text_input(TEXTS)],
            "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}],
        })  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    found = read_binary(r.content, int(r.headers["inference-header-content-length"]))
    assert found["embedding"].tolist() == [fake_embedding(t) for t in TEXTS]
    mixed_found = read_binary(mixed.content, int(mixed.headers["inference-header-content-length"]))
    assert mixed_found["embedding"].tolist() == found["embedding"].tolist()


async def test_a_classifier_answers_label_score_and_every_score() -> None:
    async with serve(FakeTextModel(task="classify")) as client:
        r = await client.post("/v2/models/fake/infer", json={"inputs": [text_input(TEXTS)]})
        ours = await client.post("/predict/batch", json={"texts": TEXTS, "all_scores": True})
        some = await client.post("/v2/models/fake/infer", json={
            "inputs": [text_input(TEXTS)], "outputs": [{"name": "label"}],
        })  # fmt: skip
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    expected = ours.json()["results"]
    assert outputs["label"]["data"] == [x["label"] for x in expected]
    assert outputs["label"]["datatype"] == "BYTES"
    assert np.allclose(outputs["score"]["data"], [x["score"] for x in expected])
    every = np.asarray(outputs["scores"]["data"]).reshape(outputs["scores"]["shape"])
    assert np.allclose(every, [[x["scores"]["short"], x["scores"]["long"]] for x in expected])
    assert [o["name"] for o in some.json()["outputs"]] == ["label"]


async def test_a_reranker_scores_a_query_against_texts_as_rerank_does() -> None:
    query = "which one"
    model = FakeTextModel(task="rerank")
    async with serve(model) as client:
        plain = await client.post("/v2/models/fake/infer", json={
            "inputs": [text_input(TEXTS), text_input([query], name="query")],
        })  # fmt: skip
        as_queried = sorted(model.seen)
        top = await client.post("/v2/models/fake/infer", json={
            "inputs": [text_input(TEXTS), text_input([query], name="query")],
            "parameters": {"top_n": 2},
        })  # fmt: skip
        ranked = await client.post("/rerank", json={"query": query, "texts": TEXTS})
        two = await client.post("/v2/models/fake/infer", json={
            "inputs": [text_input(TEXTS), text_input([query, query], name="query")],
        })  # fmt: skip
    outputs = {o["name"]: o["data"] for o in plain.json()["outputs"]}
    assert outputs["index"] == [0, 1, 2]
    by_index = {x["index"]: x["score"] for x in ranked.json()}
    assert np.allclose(outputs["score"], [by_index[i] for i in range(3)])
    best = {o["name"]: o["data"] for o in top.json()["outputs"]}
    assert best["index"] == [x["index"] for x in ranked.json()][:2]
    assert np.allclose(best["score"], [x["score"] for x in ranked.json()][:2])
    # the fake model reads each pair back as "FIRST SECOND": the query comes first
    assert as_queried == sorted(f"{query} {t}" for t in TEXTS)
    assert (two.status_code, "one query: shape [1]" in two.json()["error"]) == (400, True)


async def test_pairs_are_read_as_predict_batch_reads_texts_and_text_pairs() -> None:
    pairs = ["first pair", "second", "third one"]
    for task in ("rerank", "classify"):
        model = FakeTextModel(task=task)
        async with serve(model) as client:
            r = await client.post("/v2/models/fake/infer", json={
                "inputs": [text_input(TEXTS), text_input(pairs, name="text_pair")],
            })  # fmt: skip
            seen = list(model.seen)
            batch = await client.post("/predict/batch", json={"texts": TEXTS, "text_pairs": pairs})
        assert sorted(seen) == sorted(f"{t} {p}" for t, p in zip(TEXTS, pairs, strict=True))
        scores = {o["name"]: o["data"] for o in r.json()["outputs"]}["score"]
        assert np.allclose(scores, [x["score"] for x in batch.json()["results"]]), task


async def test_an_unknown_output_is_refused_before_anything_is_computed() -> None:
    model = FakeTextModel()
    async with serve(model) as client:
        r = await client.post("/v2/models/fake/infer", json={
            "inputs": [text_input(["never computed"])], "outputs": [{"name": "vector"}],
        })  # fmt: skip
        get_infer = await client.get("/v2/models/fake/infer")
    assert r.status_code == 400
    assert model.seen == []
    assert get_infer.status_code == 405


@pytest.mark.parametrize(
    ("request_body", "where"),
    [
        ({"inputs": [text_input(["a", "b"], shape=[3])]}, "inputs.0"),
        ({"inputs": [text_input(["a", "b"], shape=[1, 2])]}, "inputs.text.shape"),
        ({"inputs": [{**text_input(["a"]), "datatype": "FP32", "data": [1.0]}]}, "datatype"),
        ({"inputs": [text_input(["a"], name="texts")]}, "inputs.texts"),
        ({"inputs": [text_input(["a"])], "parameters": {"normalise": True}}, "normalise"),
        ({"inputs": [text_input(["a"])], "parameters": {"dimensions": "8"}}, "dimensions"),
        ({"inputs": [text_input(["a"])], "parameters": {"top_n": 1}}, "top_n"),
        ({"inputs": [text_input(["a"])], "parameters": {"embedding_type": "int8"}}, "embedding"),
        ({"inputs": [text_input(["a"])], "outputs": [{"name": "vector"}]}, "vector"),
        ({"inputs": [text_input(["a"])], "outputs": []}, "at least one output"),
        ({"inputs": [text_input(["a"])], "parameters": {"binary_data_output": "no"}}, "binary"),
        ({"inputs": [text_input(["a", "b"], shape=[2, 1]) | {"data": [["a", "b"]]}]}, "nesting"),
        ({"inputs": [text_input(["a"] * 3, shape=[1, 3])]}, "shape"),
        ({"inputs": [{**text_input(["a"]), "shape": [1000, 1000]}]}, "elements a tensor"),
        ({"inputs": [text_input([])]}, "at least one"),
        ({"inputs": [text_input(["a"] * 5)]}, "max-client-batch"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [text_input(["a"]), text_input(["b"])]}, "twice"),
    ],
)
async def test_bad_tensors_get_400_naming_what_is_wrong(
    request_body: dict[str, Any], where: str
) -> None:
    async with serve(FakeTextModel(), max_client_batch=4) as client:
        r = await client.post("/v2/models/fake/infer", json=request_body)
        after = await client.post("/v2/models/fake/infer", json={"inputs": [text_input(["ok"])]})
    assert r.status_code == 400, r.text
    assert where in r.json()["error"], r.json()["error"]
    assert r.json()["type"] == "invalid_input"
    assert after.status_code == 200


@pytest.mark.parametrize(
    ("blob", "length", "reason"),
    [
        (struct.pack("<I", 10) + b"abc", None, "longer than the bytes"),
        (b"\x01\x00", None, "cut short"),
        (pack_bytes([b"\xff\xfe"]), None, "UTF-8"),
        (pack_bytes([b"fine"]), "99999", "Inference-Header-Content-Length"),
        (pack_bytes([b"fine"]), b"\xb2", "Inference-Header-Content-Length"),
        (pack_bytes([b"a", b"b"]), None, "more than the shape's 1"),
        (pack_bytes([b"fine"]) + b"extra", None, "more binary data"),
    ],
)
async def test_broken_binary_tensors_get_400(
    blob: bytes, length: str | bytes | None, reason: str
) -> None:
    declared = {"binary_data_size": len(blob)}
    tensor = {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": declared}
    head = json.dumps({"inputs": [tensor]}).encode()
    if reason == "more binary data":
        head = head.replace(str(len(blob)).encode(), str(len(blob) - 5).encode())
    headers: dict[str, str | bytes] = {"Inference-Header-Content-Length": length or str(len(head))}
    async with serve(FakeTextModel()) as client:
        r = await client.post("/v2/models/fake/infer", content=head + blob, headers=headers)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"], r.json()["error"]


async def test_keys_guard_the_models_but_not_the_probes() -> None:
    async with serve(FakeTextModel(), api_keys="k1") as client:
        probes = [await client.get(p) for p in ("/v2", "/v2/health/live", "/v2/health/ready")]
        metadata = await client.get("/v2/models/fake")
        infer = await client.post("/v2/models/fake/infer", json={"inputs": [text_input(["a"])]})
        keyed = await client.post(
            "/v2/models/fake/infer",
            json={"inputs": [text_input(["a"])]},
            headers={"Authorization": "Bearer k1"},
        )
    assert [r.status_code for r in probes] == [200, 200, 200]
    assert metadata.status_code == 401
    assert "API key" in metadata.json()["error"]
    assert infer.status_code == 401
    assert keyed.status_code == 200


async def test_infer_takes_triton_bodies_without_a_json_content_type() -> None:
    body, headers = binary_body([("text", [b"hello"])])
    async with serve(FakeTextModel()) as client:
        bare = await client.post("/v2/models/fake/infer", content=body, headers=headers)
        octets = await client.post(
            "/v2/models/fake/infer",
            content=body,
            headers={**headers, "Content-Type": "application/octet-stream"},
        )
        text = await client.post(
            "/v2/models/fake/infer", content=body, headers={**headers, "Content-Type": "text/plain"}
        )
        elsewhere = await client.post("/predict", content=b'{"text": "a"}')
    assert bare.status_code == octets.status_code == 200
    assert bare.json()["outputs"][0]["data"] == fake_embedding("hello")
    assert text.status_code == elsewhere.status_code == 415


async def test_a_pinned_version_answers_and_an_unknown_one_is_404() -> None:
    async with serve(FakeTextModel()) as client:
        pinned = await client.post(
            "/v2/models/fake/versions/1/infer", json={"inputs": [text_input(["a"])]}
        )
        unknown = await client.post(
            "/v2/models/fake/versions/2/infer", json={"inputs": [text_input(["a"])]}
        )
        slashed = await client.post(
            "/v2/models/org/fake/infer", json={"inputs": [text_input(["a"])]}
        )
    assert pinned.status_code == 200
    assert pinned.json()["model_version"] == "1"
    assert unknown.status_code == 404
    assert slashed.status_code == 200, "one model answers to any name, a hub id's too"


async def test_a_triton_timeout_parameter_is_the_deadline() -> None:
    model = FakeTextModel()
    async with serve(model, max_batch_size=1) as client:
        model.predict_gate.clear()
        blocker = asyncio.create_task(client.post("/predict", json={"text": "blocker"}))
        await asyncio.to_thread(model.entered.wait, 30)
        await wait_until_admitted(client, 1)
        late = await client.post("/v2/models/fake/infer", json={
            "inputs": [text_input(["in a hurry"])], "parameters": {"timeout": 50_000},
        })  # fmt: skip
        model.predict_gate.set()
        await blocker
    assert late.status_code == 504, late.text
    assert "in a hurry" not in model.seen


async def test_several_models_and_versions_map_to_the_protocols_names() -> None:
    models = {
        **embedders(),
        "cls": FakeTextModel(name="cls", task="classify"),
    }
    body = {"inputs": [text_input(["a text"])]}
    async with serve_versions(models, route=route(emb={"v1": 0, "v2": 100})) as client:
        emb = (await client.get("/v2/models/emb")).json()
        v1 = await client.post("/v2/models/emb/versions/v1/infer", json=body)
        routed = await client.post("/v2/models/emb/infer", json=body)
        cls = await client.post("/v2/models/cls/infer", json=body)
        v1_ready = await client.get("/v2/models/emb/versions/v1/ready")
        unknown = await client.post("/v2/models/nope/infer", json=body)
        no_version = await client.get("/v2/models/emb/versions/v9")
    assert emb["versions"] == ["v1", "v2"]
    assert (v1.json()["model_version"], v1.json()["outputs"][0]["data"]) == ("v1", V1)
    assert (routed.json()["model_version"], routed.json()["outputs"][0]["data"]) == ("v2", V2)
    assert [o["name"] for o in cls.json()["outputs"]] == ["label", "score", "scores"]
    assert v1_ready.status_code == 200
    assert unknown.status_code == no_version.status_code == 404
    assert "emb@v1, emb@v2, cls" in unknown.json()["error"]
