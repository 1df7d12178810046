"""The prediction log in SQLite (the embedded default), in process: one row per answered
input with what an operator asks of it, failed calls with their status, shadows with
their agreement; a dead database costs no request; the schema is created, migrated
once, and a newer one refused; `microbatch log` reads it back."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server import log_report, log_sinks
from server.app import create_app
from server.settings import Settings
from tests.server.fakes import FakeTextModel, fake_embedding
from tests.server.live import metric
from tests.server.test_versions import serve


def rows(path: Path, where: str = "1 = 1") -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [
            dict(r) for r in conn.execute(f"SELECT * FROM predictions WHERE {where} ORDER BY id")
        ]
    finally:
        conn.close()


def blake(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@pytest.mark.asyncio
async def test_every_answered_input_is_a_row_written_by_shutdown(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    texts = ["tiny", "a text long enough to be long", "mid-size text"]
    models = {"cls@7": FakeTextModel(name="cls", task="classify")}
    async with serve(models, log_url=f"sqlite:///{db}") as client:
        reply = await client.post("/predict/batch", json={"texts": texts},
                                  headers={"X-Request-ID": "req-1"})  # fmt: skip
        assert reply.status_code == 200
        answers = reply.json()["results"]
    found = rows(db)  # the app has stopped: its buffer was flushed
    assert [r["position"] for r in found] == [0, 1, 2]
    for row, text, answer in zip(found, texts, answers, strict=True):
        assert (row["request_id"], row["route"], row["model"], row["version"]) == (
            "req-1",
            "/predict/batch",
            "cls",
            "7",
        )
        assert row["status"] == "ok"
        assert row["shadow"] == 0
        assert row["input_hash"] == blake(text)
        assert row["input"] is None, "the text only with --log-inputs"
        assert row["tokens"] == len(text)
        assert (row["label"], row["score"]) == (answer["label"], answer["score"])
        top = json.loads(row["top_k"])
        assert top[0] == [answer["label"], answer["score"]]
        assert len(top) == 2
        assert row["queue_ms"] >= 0
        assert row["compute_ms"] >= 0
        assert row["latency_ms"] > 0
        assert row["batch"] >= 1
        assert row["batch_size"] >= 1


@pytest.mark.asyncio
async def test_inputs_and_vectors_are_kept_only_when_asked_and_failures_have_a_status(
    tmp_path: Path,
) -> None:
    db = tmp_path / "log.db"
    models = {"emb@1": FakeTextModel(name="emb")}
    async with serve(models, log_url=str(db), log_inputs=True, log_vectors=True) as client:
        ok = await client.post("/predict", json={"text": "hello"})
        failed = await client.post("/predict", json={"text": "boom"})  # the fake's poison
        assert (ok.status_code, failed.status_code) == (200, 500)
    good, bad = rows(db)
    assert good["input"] == "hello"
    vector = np.frombuffer(good["vector"], dtype=np.float32)
    assert vector.tolist() == pytest.approx(fake_embedding("hello"))
    assert good["norm"] == pytest.approx(float(np.linalg.norm(fake_embedding("hello"))))
    assert bad["status"] == "inference_failed"
    assert bad["label"] is None
    assert bad["norm"] is None


@pytest.mark.asyncio
async def test_shadow_rows_carry_their_agreement_and_microbatch_log_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "log.db"
    models = {
        "emb@v1": FakeTextModel(name="emb", embedding=[1.0, 0.0]),
        "emb@v2": FakeTextModel(name="emb", embedding=[1.0, 1.0]),
    }
    route = json.dumps({"emb": {"v1": 1, "shadow": {"v2": 1.0}}})
    async with serve(models, route=route, log_url=str(db)) as client:
        for i in range(4):
            await client.post("/predict", json={"text": f"t{i}"})
        await until_rows(db, "shadow = 1", 4)
    shadowed = rows(db, "shadow = 1")
    assert {(r["version"], r["against"]) for r in shadowed} == {("v2", "v1")}
    assert all(r["agreement"] == pytest.approx(2**-0.5) for r in shadowed)
    assert log_report.main([str(db)]) == 0
    out = capsys.readouterr().out
    assert "emb@v1" in out
    assert "0.7071" in out
    assert log_report.main([str(db), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    [hour] = report["versions"]
    assert (hour["model"], hour["version"], hour["requests"], hour["errors"]) == ("emb", "v1", 4, 0)
    [shadow] = report["shadows"]
    assert (shadow["primary"], shadow["shadow"], shadow["inputs"]) == ("v1", "v2", 4)


async def until_rows(db: Path, where: str, n: int) -> None:
    """Wait for the writer (the database's state, written off the request path)."""
    import asyncio

    async with asyncio.timeout(30):
        while not db.exists() or len(rows(db, where)) < n:  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_a_dead_database_fails_no_request_and_the_dropped_rows_are_counted(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    models = {"emb@1": FakeTextModel(name="emb")}
    # The flush at shutdown tries for --drain-timeout-s, then counts what it could not write.
    dead = {"log_url": str(blocker / "log.db"), "log_buffer": 3, "drain_timeout_s": 1.0}
    async with serve(models, **dead) as client:
        replies = [await client.post("/predict", json={"text": f"x{i}"}) for i in range(10)]
        metrics = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in replies)
    # The buffer holds 3 rows; the writer may hold 3 more it failed to write, for a
    # moment, before it puts them back: of the 10 rows, 4 to 7 were dropped.
    dropped = metric(metrics, "microbatch_log_rows_dropped_total")
    assert 4 <= dropped <= 7
    assert dropped + metric(metrics, "microbatch_log_rows_buffered") <= 10


def _schema_versions(db: Path) -> list[int]:
    conn = sqlite3.connect(db)
    try:
        return [
            v for (v,) in conn.execute("SELECT version FROM predictions_schema ORDER BY version")
        ]
    finally:
        conn.close()


@pytest.mark.asyncio
async def test_the_schema_is_migrated_step_by_step_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log made by a server of schema 1 (before tenants) gains the tenant column; a
    later step is applied once, however often the server starts."""
    db = tmp_path / "log.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE predictions_schema (version INTEGER NOT NULL)")
    for statement in log_sinks.MIGRATIONS[0]:
        conn.execute(statement.format(**log_sinks.TYPES["sqlite"]))
    conn.execute("INSERT INTO predictions_schema VALUES (1)")
    conn.execute(
        "INSERT INTO predictions (at, request_id, route, model, version, shadow, position, "
        "input_hash, status) VALUES (1.0, 'old', '/predict', 'emb', '1', 0, 0, 'h', 'ok')"
    )
    conn.commit()
    conn.close()
    models = {"emb@1": FakeTextModel(name="emb")}
    async with serve(models, log_url=str(db)) as client:
        await client.post("/predict", json={"text": "before"})
    assert _schema_versions(db) == [1, 2]
    step = ("ALTER TABLE predictions ADD COLUMN note TEXT",)
    monkeypatch.setattr(log_sinks, "MIGRATIONS", (*log_sinks.MIGRATIONS, step))
    for _ in range(2):  # a second start finds it done: the ALTER would fail if run again
        async with serve({"emb@1": FakeTextModel(name="emb")}, log_url=str(db)) as client:
            await client.post("/predict", json={"text": "after"})
    assert _schema_versions(db) == [1, 2, 3]
    hashes = [r["input_hash"] for r in rows(db)]
    assert hashes == ["h", blake("before"), blake("after"), blake("after")]
    assert all("note" in r and r["tenant"] is None for r in rows(db))


@pytest.mark.asyncio
async def test_a_log_whose_schema_is_newer_than_the_server_stops_the_start(tmp_path: Path) -> None:
    from asgi_lifespan import LifespanManager

    db = tmp_path / "log.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE predictions_schema (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO predictions_schema VALUES (99)")
    conn.commit()
    conn.close()
    app = create_app(Settings(log_url=str(db)), model=FakeTextModel())
    with pytest.raises(log_sinks.SchemaTooNew, match="version 99, newer than this server's 2"):
        async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
            pass


def test_the_report_reads_per_hour_latency_errors_and_label_shares() -> None:
    hour = 1_800_000_000.0  # 2027-01-15 08:00 UTC
    rows_ = [
        (hour + 1, "cls", "1", False, None, "a", "ok", 10.0, "pos", None, "acme"),
        (hour + 2, "cls", "1", False, None, "a", "ok", 10.0, "neg", None, "acme"),  # same request
        (hour + 3, "cls", "1", False, None, "b", "ok", 30.0, "pos", None, "beta"),
        (hour + 4, "cls", "1", False, None, "c", "queue_full", None, None, None, "acme"),
        (hour + 3600, "cls", "2", False, None, "d", "ok", 5.0, "pos", None, None),
    ]
    report = log_report.summarize(rows_)
    first, second = report.versions
    assert (first.requests, first.inputs, first.errors) == (3, 4, 1)
    assert first.p50_ms == 20.0
    assert first.p99_ms == pytest.approx(29.8)
    assert first.labels == {"pos": 2 / 3, "neg": 1 / 3}
    assert (second.hour, second.version) == ("2027-01-15 09:00", "2")
    acme, beta = report.tenants  # the row without a tenant counts for no one
    assert (acme.tenant, acme.requests, acme.inputs, acme.errors) == ("acme", 2, 3, 1)
    assert (acme.p50_ms, beta.requests, beta.p99_ms) == (10.0, 1, 30.0)
    assert "requests per tenant and hour" in log_report.render(report)
