"""The prediction log in a real PostgreSQL (Debian's package, started here in a temporary
directory on a free port): every answered input a row, the database killed mid-run and
brought back without a failed request or a lost row, and `microbatch log` reading it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from benchmarks.lab.postgres import PostgresServer, available
from server import log_report
from tests.server.fakes import FakeTextModel
from tests.server.live import metric
from tests.server.test_versions import serve, until_metric

pytestmark = [
    pytest.mark.skipif(not available(), reason="needs PostgreSQL (Debian's postgresql)"),
]


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.asyncio
async def test_rows_reach_postgres_and_a_crash_mid_run_loses_none(
    postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    models = {
        "cls@1": FakeTextModel(name="cls", task="classify"),
        "cls@2": FakeTextModel(name="cls", task="classify"),
    }
    route = json.dumps({"cls": {"1": 1, "shadow": {"2": 1.0}}})
    async with serve(models, route=route, log_url=postgres.url) as client:
        before = [await client.post("/predict", json={"text": f"first {i}"}) for i in range(10)]
        postgres.kill()
        during = [await client.post("/predict", json={"text": f"second {i}"}) for i in range(10)]
        # Shadows still running at shutdown are cancelled (they answer no one): let the
        # last ones finish first.
        await until_metric(client, 'microbatch_shadow_requests_total{outcome="compared"}', 20)
        held = (await client.get("/metrics")).text
        postgres.start()
    # The app has stopped: its writer reconnected and flushed what waited.
    assert all(r.status_code == 200 for r in before + during)
    assert metric(held, "microbatch_log_rows_dropped_total") == 0
    assert postgres.rows("NOT shadow") == 20, "every answered input, none lost"
    assert postgres.rows("shadow") == 20, "and its shadow's answer"
    assert postgres.rows("version = '1' AND status = 'ok' AND label IS NOT NULL") == 20
    assert log_report.main([postgres.url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    [hour] = report["versions"]
    assert (hour["model"], hour["version"]) == ("cls", "1")
    assert (hour["requests"], hour["inputs"]) == (20, 20)
    [shadow] = report["shadows"]
    assert shadow["agreement"] == 1.0, "two copies of one fake agree on every label"
