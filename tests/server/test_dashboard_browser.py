"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright),
against the real server under load: the charts fill, the form changes the live batching
settings, and the charts follow. CI installs the browser; elsewhere, without one, the
test skips and says why."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

SCREENSHOT_ENV = "MICROBATCH_DASHBOARD_SCREENSHOT"
"""Where to copy the test's screenshot as well (docs/dashboard.png is made this way)."""


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium for the dashboard test (.ci/run)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return path


class Load:
    """Clients posting /predict back to back on threads, until stopped."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.ok = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, client: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            n = 0
            while not self._stop.is_set():
                text = f"client {client} sends sentence {n}. " * (1 + n % 4)
                if http.post("/predict", json={"text": text}).status_code == 200:
                    self.ok += 1
                n += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


@pytest.fixture
def restored(default_server: ServerProcess) -> Iterator[ServerProcess]:
    """The shared default server, its batching settings put back afterwards."""
    before = httpx.get(f"{default_server.url}/admin/batching").json()
    yield default_server
    keep = ("max_batch_size", "max_wait_ms", "max_queue_size", "policy", "slo_p99_ms")
    httpx.patch(f"{default_server.url}/admin/batching", json={k: before[k] for k in keep})


def test_the_dashboard_shows_live_load_and_changes_the_batching_window(
    restored: ServerProcess, tmp_path: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    url = restored.url
    requested: list[str] = []
    problems: list[str] = []
    with Load(url) as load, sync_api.sync_playwright() as playwright:
        # As root (CI containers) Chromium runs only without its sandbox.
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.on("request", lambda r: requested.append(r.url))
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        page.goto(f"{url}/dashboard")

        # Under load the charts fill: samples with items served arrive every second.
        page.wait_for_function(
            "dashboard.samples.filter(s => s.items_per_s > 0).length >= 3", timeout=60_000
        )
        assert page.inner_text("#status") == "ready"
        assert float(page.inner_text("#kpi-items")) > 0
        points_before = page.evaluate("dashboard.charts['chart-throughput'].data[0].length")
        assert page.input_value("input[name=max_wait_ms]") == "50"

        page.fill("input[name=max_wait_ms]", "13")
        page.click("button[type=submit]")
        page.wait_for_function(
            "document.getElementById('form-status').textContent.startsWith('applied')",
            timeout=10_000,
        )
        assert httpx.get(f"{url}/admin/batching").json()["max_wait_ms"] == 13

        # The charts follow: the live max_wait_ms series reaches 13, the change is listed.
        page.wait_for_function(
            "dashboard.charts['chart-batch'].data[3].at(-1) === 13", timeout=10_000
        )
        page.wait_for_function(
            "document.getElementById('events').textContent.includes('max_wait_ms 13')",
            timeout=10_000,
        )
        points_after = page.evaluate("dashboard.charts['chart-throughput'].data[0].length")
        reasons = page.evaluate(
            "dashboard.samples.reduce((n, s) => n + Object.values(s.batches)"
            ".reduce((a, b) => a + b, 0), 0)"
        )
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert points_after > points_before, "the throughput chart moved on"
    assert reasons > 0, "batches were counted by why they left"
    assert load.ok > 0
    assert shot.stat().st_size > 30_000, "a screenshot of drawn charts, not a blank page"
    if target := os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, target)
    assert problems == []
    foreign = [r for r in requested if not r.startswith((url, "data:"))]
    assert foreign == [], "the page must work offline: no CDN"
