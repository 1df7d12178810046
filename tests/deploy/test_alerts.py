"""The alert rules in `deploy/prometheus/alerts.yml`: loaded by the Prometheus config (and
mounted by the compose file), each expression valid PromQL, and every metric they read
one the server exposes (the scrape the docs' metrics reference is made from, which runs
shadows, drift and the prediction log)."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.test_grafana import COMPOSE, DEPLOY, PROMETHEUS, metric_names

promql = pytest.importorskip("promql_parser")

ALERTS = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
RULES = [rule for group in ALERTS["groups"] for rule in group["rules"]]


def test_prometheus_loads_the_rules_the_compose_file_mounts() -> None:
    assert PROMETHEUS["rule_files"] == ["alerts.yml"]
    mounts = dict(v.split(":")[:2] for v in COMPOSE["services"]["prometheus"]["volumes"])
    assert mounts["./prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"


def test_drift_the_shadows_and_the_log_each_have_an_alert() -> None:
    names = {rule["alert"] for rule in RULES}
    assert {"MicrobatchLabelDrift", "MicrobatchEmbeddingDrift", "MicrobatchRerankScoreDrift",
            "MicrobatchShadowDisagrees", "MicrobatchPredictionLogDropping"} <= names  # fmt: skip
    assert all(rule["annotations"]["summary"] and rule["for"] for rule in RULES)


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule["alert"])
def test_every_rule_is_valid_promql_on_metrics_the_server_exposes(
    rule: dict[str, str], exposed: set[str]
) -> None:
    try:
        parsed = promql.parse(rule["expr"])
    except ValueError as exc:
        pytest.fail(f"{rule['alert']}: {exc}")
    wanted = metric_names(parsed)
    assert wanted, f"{rule['alert']} reads no metric"
    assert wanted <= exposed, f"{rule['alert']} reads {sorted(wanted - exposed)}, not exposed"


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    spec = importlib.util.spec_from_file_location(
        "docs_reference", Path(__file__).resolve().parents[2] / "docs/hooks/reference.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = asyncio.run(module._scrape_fake_server())
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}
