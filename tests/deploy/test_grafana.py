"""The Prometheus + Grafana stack agrees with the server: the compose file and the configs
parse and point at each other, every panel's query is valid PromQL, and every metric a
panel queries is in a live server's `/metrics`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from batcher.models.memory import GAUGES as GPU_GAUGES
from tests.conftest import ServerProcess

promql = pytest.importorskip("promql_parser")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
GPU_COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
DASHBOARD = json.loads((DEPLOY / "grafana" / "microbatch.json").read_text())
PROVISIONING = DEPLOY / "grafana" / "provisioning"
DATASOURCES = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
PROVIDERS = yaml.safe_load((PROVISIONING / "dashboards" / "microbatch.yml").read_text())

GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$instance": ".*"}
"""What Grafana substitutes before a query reaches Prometheus (values for parsing only)."""
CUDA_ONLY = {name for name, _, _ in GPU_GAUGES}
"""Series a server has only with a CUDA device (`batcher/models/memory.py`)."""


def queries() -> Iterator[tuple[str, str]]:
    """(panel title, PromQL as Prometheus receives it) for every panel target."""
    for panel in DASHBOARD["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            yield panel["title"], expr


def metric_names(node: Any) -> set[str]:
    """Every metric a parsed PromQL expression selects."""
    if type(node).__name__ == "VectorSelector":
        return {node.name}
    names: set[str] = set()
    for attribute in ("lhs", "rhs", "expr", "args", "param", "vector_selector"):
        child = getattr(node, attribute, None)
        for item in child if isinstance(child, list) else [child]:
            if item is not None and hasattr(item, "prettify"):
                names |= metric_names(item)
    return names


def test_the_compose_file_brings_up_microbatch_prometheus_and_grafana() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"microbatch", "prometheus", "grafana"}
    microbatch = services["microbatch"]
    assert microbatch["build"]["dockerfile"] == "Dockerfile.cuda"
    assert (DEPLOY / microbatch["build"]["context"] / "Dockerfile.cuda").is_file()
    assert microbatch["environment"]["MICROBATCH_HOST"] == "0.0.0.0"
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in deploy/"
    gpu = GPU_COMPOSE["services"]["microbatch"]["deploy"]["resources"]["reservations"]
    assert gpu["devices"][0]["capabilities"] == ["gpu"]


def test_prometheus_scrapes_the_microbatch_service_on_its_port() -> None:
    [job] = PROMETHEUS["scrape_configs"]
    [static] = job["static_configs"]
    port = COMPOSE["services"]["microbatch"]["environment"]["MICROBATCH_PORT"]
    assert static["targets"] == [f"microbatch:{port}"]
    assert job["metrics_path"] == "/metrics"


def test_grafana_is_provisioned_with_the_dashboard_and_its_datasource() -> None:
    [datasource] = DATASOURCES["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    used = {p["datasource"]["uid"] for p in DASHBOARD["panels"]}
    used |= {t["datasource"]["uid"] for p in DASHBOARD["panels"] for t in p["targets"]}
    assert used == {datasource["uid"]}
    [provider] = PROVIDERS["providers"]
    mounts = dict(v.split(":")[:2] for v in COMPOSE["services"]["grafana"]["volumes"])
    assert mounts["./grafana/microbatch.json"].startswith(provider["options"]["path"] + "/")


def test_the_dashboard_covers_what_an_operator_tunes_by() -> None:
    titles = {panel["title"] for panel in DASHBOARD["panels"]}
    assert {"Throughput", "Request latency", "Queue", "Batch size", "Why batches left",
            "Padding", "Device busy", "SLO controller", "GPU memory"} <= titles  # fmt: skip
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("title", "expr"), list(queries()))
def test_every_panel_query_is_valid_promql(title: str, expr: str) -> None:
    try:
        parsed = promql.parse(expr)
    except ValueError as exc:
        pytest.fail(f"panel {title!r}: {exc}: {expr}")
    assert metric_names(parsed), f"panel {title!r} selects no metric"


@pytest.mark.slow
def test_every_metric_a_panel_queries_is_in_a_live_servers_metrics(
    default_server: ServerProcess,
) -> None:
    url = default_server.url
    assert httpx.post(f"{url}/predict", json={"text": "one request"}).status_code == 200
    text = httpx.get(f"{url}/metrics").text
    exposed: set[str] = set()
    for family in text_string_to_metric_families(text):
        exposed |= {sample.name for sample in family.samples}
    wanted = {name for _, expr in queries() for name in metric_names(promql.parse(expr))}
    missing = sorted(wanted - exposed - CUDA_ONLY)
    assert missing == [], f"panels query metrics the server does not expose: {missing}"
    assert wanted & CUDA_ONLY == CUDA_ONLY, "the GPU panel shows all three memory gauges"
