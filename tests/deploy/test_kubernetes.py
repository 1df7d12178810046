"""The deployment files agree with the app: ports, probe paths, settings, metric names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from asgi_lifespan import LifespanManager

from server.app import create_app
from server.settings import Settings
from tests.server.fakes import FakeTextModel

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"


def documents() -> dict[str, dict[str, Any]]:
    """Every manifest by kind (the adapter's rule file by its file name)."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc.get("kind", path.stem)] = doc
    return docs


DOCS = documents()
DEPLOYMENT = DOCS["Deployment"]
POD = DEPLOYMENT["spec"]["template"]["spec"]
[CONTAINER] = POD["containers"]
ENV = {e["name"]: e.get("value") for e in CONTAINER["env"]}


def app_routes() -> set[str]:
    app = create_app(Settings(), model=FakeTextModel())  # type: ignore[arg-type]
    return set(app.openapi()["paths"])


async def served_metrics() -> str:
    app = create_app(Settings(), model=FakeTextModel())  # type: ignore[arg-type]
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return (await client.get("/metrics")).text


def test_ports_agree_between_container_service_settings_and_dockerfile() -> None:
    [port] = CONTAINER["ports"]
    assert port["name"] == "http"
    assert int(ENV["MICROBATCH_PORT"]) == port["containerPort"]
    assert ENV["MICROBATCH_HOST"] == "0.0.0.0"
    [service_port] = DOCS["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    dockerfile = (ROOT / "Dockerfile.cuda").read_text()
    assert f"EXPOSE {port['containerPort']}" in dockerfile
    assert f"MICROBATCH_PORT={port['containerPort']}" in dockerfile


def test_probes_use_the_apps_liveness_and_readiness_routes() -> None:
    routes = app_routes()
    assert CONTAINER["livenessProbe"]["httpGet"]["path"] == "/health"
    assert CONTAINER["startupProbe"]["httpGet"]["path"] == "/health"
    assert CONTAINER["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("livenessProbe", "startupProbe", "readinessProbe"):
        assert CONTAINER[probe]["httpGet"]["path"] in routes
        assert CONTAINER[probe]["httpGet"]["port"] == "http"
    startup = CONTAINER["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "compile + warm-up"
    assert "/health" in (ROOT / "Dockerfile.cuda").read_text()


def test_grace_period_covers_pre_stop_and_the_drain() -> None:
    pre_stop = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(ENV["MICROBATCH_DRAIN_TIMEOUT_S"])
    assert POD["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain + 5


def test_every_environment_variable_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    for name in ENV:
        assert name.startswith("MICROBATCH_")
        assert name.removeprefix("MICROBATCH_").lower() in fields, name
    settings = Settings(**{k.removeprefix("MICROBATCH_").lower(): v for k, v in ENV.items() if v})
    assert settings.port == 8000


def test_one_gpu_per_pod_and_the_images_user() -> None:
    assert CONTAINER["resources"]["limits"]["nvidia.com/gpu"] == 1
    user = re.search(r"^USER (\d+)$", (ROOT / "Dockerfile.cuda").read_text(), re.MULTILINE)
    assert user is not None
    assert POD["securityContext"]["runAsUser"] == int(user.group(1))


@pytest.mark.asyncio
async def test_the_autoscaler_reads_a_metric_the_server_exports() -> None:
    hpa = DOCS["HorizontalPodAutoscaler"]
    [metric] = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == DEPLOYMENT["metadata"]["name"]
    [rule] = DOCS["prometheus-adapter-rules"]["rules"]
    assert rule["name"]["as"] == name
    assert rule["seriesQuery"].startswith(name + "{")
    exported = await served_metrics()
    assert re.search(rf"^# TYPE {name} gauge$", exported, re.MULTILINE), name
    monitor = DOCS["PodMonitor"]["spec"]["podMetricsEndpoints"][0]
    assert monitor["path"] == "/metrics"
    assert "/metrics" in app_routes()
    assert monitor["port"] == "http"
