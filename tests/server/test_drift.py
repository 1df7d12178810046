"""Drift: the statistics on their own (PSI, shares), and in the app: a classifier whose
inputs turn long moves its PSI past the alarm, an embedder's recent centroid cosine is
shown beside its reference's, and a saved reference is put back."""

from __future__ import annotations

import math

import pytest

from server.drift import VersionDrift, psi, shares
from tests.server.fakes import FakeTextModel
from tests.server.live import metric
from tests.server.test_versions import serve

SHORT = "tiny"
LONG = "a text long enough to be long"


def test_psi_is_zero_for_the_same_shares_and_grows_with_the_shift() -> None:
    same = psi({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5})
    small = psi({"a": 0.5, "b": 0.5}, {"a": 0.55, "b": 0.45})
    large = psi({"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1})
    assert same == 0
    assert 0 < small < 0.1 < 0.2 < large
    # (0.9 - 0.5) ln(0.9 / 0.5) + (0.1 - 0.5) ln(0.1 / 0.5), by hand
    assert math.isclose(large, 0.4 * math.log(1.8) + 0.4 * math.log(5))
    assert psi({"a": 1.0}, {"b": 1.0}) > 10, "a label unseen on one side counts, finitely"
    assert shares(["a", "b", "a", "a"]) == {"a": 0.75, "b": 0.25}


def test_the_reference_is_the_first_answers_and_the_window_slides() -> None:
    from batcher.models import Classification

    def label(name: str) -> Classification:
        return Classification(name, 0.9, [0.9, 0.1])

    drift = VersionDrift("cls", "1", "classify", window=4)
    drift.observe([label("a")] * 3)
    assert drift.reference is None
    drift.observe([label("a"), label("b")])
    assert drift.reference is not None
    assert drift.reference.label_shares == {"a": 1.0}
    assert drift.recent()["label_shares"] == {"b": 1.0}
    drift.observe([label("a")] * 4)
    assert drift.recent()["label_shares"] == {"a": 1.0}, "the window holds the last 4"
    assert drift.recent()["psi"] == 0


def test_embeddings_cut_to_fewer_dimensions_are_left_out_of_an_embedders_windows() -> None:
    # Requests may ask for fewer `dimensions` (Matryoshka): a centroid is of one width.
    drift = VersionDrift("emb", "1", "embed", window=3, dimension=4)
    drift.observe([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0]])
    assert drift.reference is None, "two full-width answers so far"
    drift.observe([[0.0, 0.0, 1.0, 0.0], [0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    assert drift.reference is not None
    assert len(drift.reference.centroid or []) == 4
    assert drift.recent()["answers"] == 1


@pytest.mark.asyncio
async def test_drift_that_fails_costs_no_request_its_answer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: VersionDrift, values: object) -> None:
        raise RuntimeError("a bug in drift")

    monkeypatch.setattr(VersionDrift, "observe", broken)
    async with serve({"emb@1": FakeTextModel(name="emb")}) as client:
        replies = [await client.post("/predict", json={"text": f"t{i}"}) for i in range(3)]
        metrics = await client.get("/metrics")
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert metrics.status_code == 200
    assert caplog.text.count("drift of emb@1 failed; it is off for this version") == 1


@pytest.mark.asyncio
async def test_a_classifier_whose_inputs_turn_long_shows_its_drift() -> None:
    models = {"cls@1": FakeTextModel(name="cls", task="classify")}
    async with serve(models, drift_window=20) as client:
        for i in range(20):
            await client.post("/predict", json={"text": f"{SHORT}{i}"})
        calm = (await client.get("/metrics")).text
        for i in range(20):
            await client.post("/predict", json={"text": f"{LONG}{i}"})
        shifted = (await client.get("/metrics")).text
        drift = (await client.get("/admin/drift")).json()["cls@1"]
        shown = (await client.get("/dashboard/data")).json()["drift"]["1"]
    assert "microbatch_drift_psi{" not in calm, "no recent window yet"
    assert metric(shifted, 'microbatch_drift_label_share{window="reference",label="short"}') == 1
    assert metric(shifted, 'microbatch_drift_label_share{window="recent",label="long"}') == 1
    assert metric(shifted, 'microbatch_drift_psi{model="cls",version="1"}') > 0.2
    assert drift["reference"]["label_shares"] == {"short": 1.0}
    assert drift["recent"]["psi"] > 0.2
    assert shown["recent"]["psi"] == drift["recent"]["psi"]


@pytest.mark.asyncio
async def test_a_saved_reference_is_put_back_and_compared_with() -> None:
    models = {"emb@1": FakeTextModel(name="emb")}
    async with serve(models, drift_window=5) as client:
        for i in range(10):
            await client.post("/predict", json={"text": f"{SHORT}{i}"})
        saved = (await client.get("/admin/drift")).json()["emb@1"]["reference"]
        before = (await client.get("/metrics")).text
    assert saved["task"] == "embed"
    assert len(saved["centroid"]) == 2
    assert metric(before, 'microbatch_drift_centroid_cosine{window="reference"}') > 0.99
    models = {"emb@1": FakeTextModel(name="emb")}
    async with serve(models, drift_window=5) as client:
        await client.post("/predict", json={"text": SHORT})
        put = await client.put("/admin/drift/emb@1", json=saved)
        assert put.status_code == 200, put.text
        await client.post("/predict", json={"text": LONG})
        after = (await client.get("/metrics")).text
        wrong = await client.put("/admin/drift/emb@1", json={**saved, "task": "classify"})
        assert wrong.status_code == 422
        assert "classify model, not embed" in wrong.text
        junk = await client.put("/admin/drift/emb@1", json={"what": 1})
        assert junk.status_code == 422
    assert metric(after, 'microbatch_drift_centroid_cosine{window="reference"}') == pytest.approx(
        saved["centroid_cosine"]
    )
    assert not math.isnan(metric(after, 'microbatch_drift_centroid_cosine{window="recent"}'))
