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
from server.kserve.grpc_server import READY_SERVICES
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


def exposed_ports(dockerfile: str) -> set[int]:
    """Every port the Dockerfile's EXPOSE lines name."""
    lines = re.findall(r"^EXPOSE (.+)$", dockerfile, re.MULTILINE)
    return {int(port) for line in lines for port in line.split()}


def test_ports_agree_between_container_service_settings_and_dockerfile() -> None:
    http, grpc = CONTAINER["ports"]
    assert (http["name"], grpc["name"]) == ("http", "grpc")
    assert int(ENV["MICROBATCH_PORT"]) == http["containerPort"]
    assert int(ENV["MICROBATCH_GRPC_PORT"]) == grpc["containerPort"]
    assert ENV["MICROBATCH_HOST"] == "0.0.0.0"
    service_http, service_grpc = DOCS["Service"]["spec"]["ports"]
    assert service_http["targetPort"] == http["name"]
    assert service_grpc["targetPort"] == grpc["name"]
    assert service_grpc["appProtocol"] == "kubernetes.io/h2c", "gRPC is HTTP/2 without TLS"
    dockerfile = (ROOT / "Dockerfile.cuda").read_text()
    assert exposed_ports(dockerfile) == {http["containerPort"], grpc["containerPort"]}
    assert f"MICROBATCH_PORT={http['containerPort']}" in dockerfile
    assert f"MICROBATCH_GRPC_PORT={grpc['containerPort']}" in dockerfile


def test_the_compose_file_publishes_the_ports_the_image_serves() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    microbatch = compose["services"]["microbatch"]
    published = {int(p.split(":")[0]): int(p.split(":")[1]) for p in microbatch["ports"]}
    environment = microbatch["environment"]
    ports = {int(environment["MICROBATCH_PORT"]), int(environment["MICROBATCH_GRPC_PORT"])}
    assert published == {port: port for port in ports}
    assert ports == exposed_ports((ROOT / "Dockerfile.cuda").read_text())


def test_liveness_and_startup_use_the_apps_health_route() -> None:
    routes = app_routes()
    for probe in ("livenessProbe", "startupProbe"):
        assert CONTAINER[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert "/health" in routes
    startup = CONTAINER["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "compile + warm-up"
    assert "/health" in (ROOT / "Dockerfile.cuda").read_text()


def test_readiness_asks_the_grpc_health_service_what_ready_answers() -> None:
    """The gRPC health service's "" means what GET /ready does, and probing it also
    proves the gRPC listener (liveness proves the HTTP one). A gRPC probe's port is a
    number: Kubernetes has no named ports for it."""
    readiness = CONTAINER["readinessProbe"]
    [grpc] = [port for port in CONTAINER["ports"] if port["name"] == "grpc"]
    assert readiness["grpc"]["port"] == grpc["containerPort"]
    assert readiness["grpc"].get("service", "") in READY_SERVICES, "readiness, not liveness"
    assert "httpGet" not in readiness
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 2, "out of rotation fast"


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
    assert (settings.port, settings.grpc_port) == (8000, 8001)


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
