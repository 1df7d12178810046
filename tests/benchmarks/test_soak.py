"""The soak tool against a real uvicorn server on a fake model: every kind of request is
sent, classified, and nothing is lost."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.soak import HangUp, parse, render, soak
from tests.server.fakes import FakeTextModel
from tests.server.live import live_server

pytestmark = pytest.mark.asyncio


async def test_a_short_soak_classifies_every_answer_and_loses_nothing() -> None:
    args = parse(
        "--duration-s 4 --overload-s 2 --capacity-rps 40 --malformed 0.5 --disconnects 0.2 "
        "--deadline-s 30 --url unused".split()
    )
    model = FakeTextModel()
    model.predict_gate.clear()  # held until a client has hung up on a waiting request

    async def a_batch_is_held() -> None:
        await asyncio.to_thread(model.entered.wait, 30)

    async with live_server(model) as url:
        report = await soak(args, url, HangUp(when=a_batch_is_held, then=model.predict_gate.set))
    assert report.lost == 0, report.lost_examples
    assert report.sent > 100
    assert report.answered_ok > 50
    statuses = {reason.split()[0] for reason in report.rejected}
    assert {"400", "413", "415", "422"} <= statuses, report.rejected
    assert report.abandoned_by_client + report.server_counts["client_disconnects"] > 0
    assert report.memory_mb["before"] > 0
    assert report.overload["valid_sent"] > 0
    assert "**lost** (no HTTP answer) | **0**" in render(report)
