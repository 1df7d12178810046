"""The sweep against the real app in process (fake model), and its pure parts."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgi_lifespan import LifespanManager

from benchmarks.loadgen import Load, Request, StepResult
from benchmarks.sweep import Point, grid, pareto_front, recommend, sweep
from benchmarks.transport import asgi_transports
from server.app import create_app
from server.settings import Settings
from tests.server.fakes import FakeTextModel


def point(rps: float, p99: float, errors: int = 0, **setting: object) -> Point:
    result = StepResult(
        load="16 clients", kind="closed", value=16, duration_s=1.0, requests=100 + errors,
        ok=100, throughput_rps=rps, latency_ms={"p50": p99 / 2, "p90": p99, "p99": p99,
        "mean": p99 / 2, "max": p99}, statuses={"200": 100}, server={},
    )  # fmt: skip
    return Point(dict(setting), dict(setting), result)


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [point(10, 100), point(20, 200), point(15, 300), point(20, 150), point(5, 50)]
    assert pareto_front(points) == [0, 3, 4]


def test_recommendation_is_the_fastest_point_meeting_the_target() -> None:
    points = [point(10, 100), point(30, 400), point(25, 180), point(40, 150, errors=3)]
    assert recommend(points, 200) is points[2]
    assert recommend(points, 50) is None


def test_grid_covers_every_combination() -> None:
    settings = grid([8, 32], [5.0, 50.0], ["adaptive", "window"])
    assert len(settings) == 8
    assert {"max_batch_size": 32, "max_wait_ms": 5.0, "policy": "window"} in settings


@pytest.mark.asyncio
async def test_sweep_applies_every_setting_it_reports_and_restores_the_original() -> None:
    app = create_app(Settings(max_wait_ms=50, max_batch_size=32), model=FakeTextModel())  # type: ignore[arg-type]
    async with LifespanManager(app) as manager:
        clients = asgi_transports(manager.app)
        async with clients(1) as client:
            while (await client.get("/ready"))[0] != 200:  # noqa: ASYNC110 (server state)
                await asyncio.sleep(0.005)  # lets the warm-up thread's result reach the loop
        settings = grid([2, 8], [20.0], ["adaptive", "window"])
        points = await sweep(
            clients, settings, [Load("closed", 12)], texts=["a text", "another one"],
            request=Request(), duration_s=1.5, warmup_s=0.3,
        )  # fmt: skip
        async with clients(1) as client:
            restored = json.loads((await client.get("/admin/batching"))[1])
    assert [p.setting for p in points] == settings
    for p in points:
        assert {k: p.applied[k] for k in p.setting} == p.setting, "read back as asked"
        assert p.result.ok > 0
        assert p.result.server["mean_batch_size"] <= p.setting["max_batch_size"], (
            "the setting was live while it was measured"
        )
    assert restored["max_batch_size"] == 32
    assert restored["max_wait_ms"] == 50
    best = recommend(points, sorted(p.result.p99_ms for p in points)[len(points) // 2])
    assert best is not None
    assert best.result.p99_ms <= sorted(p.result.p99_ms for p in points)[len(points) // 2]
