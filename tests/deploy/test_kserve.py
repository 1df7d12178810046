"""The KServe manifests of `deploy/kserve/` are valid against KServe's own CRD schemas
(`kserve_crds/`, extracted from a KServe commit: see its README), and agree with the
server: the runtime's arguments are `microbatch serve` settings, its ports are the ones
the InferenceServices use, its probes are routes of the app."""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml

from server import cli
from server.settings import Settings
from server.specs import MODEL_NAME
from tests.deploy.test_kubernetes import CONTAINER as DEPLOYED
from tests.deploy.test_kubernetes import ROOT, app_routes

KSERVE = ROOT / "deploy" / "kserve"
CRDS = Path(__file__).resolve().parent / "kserve_crds"
SCHEMAS = {
    "ServingRuntime": "servingruntimes.v1alpha1.json.gz",
    "InferenceService": "inferenceservices.v1beta1.json.gz",
}
API_VERSIONS = {
    "ServingRuntime": "serving.kserve.io/v1alpha1",
    "InferenceService": "serving.kserve.io/v1beta1",
}
"""The version of each kind whose schema the fixture holds."""
KSERVE_HTTP_PORT = 8080
"""The port KServe and Knative send a predictor's traffic to when it declares none."""
KNATIVE_PORT_NAMES = {"http1", "h2c"}
"""The port names Knative accepts; the name says the protocol (h2c: gRPC)."""
ISVC_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
"""KServe's rule for an InferenceService's name (its webhook's IsvcRegexp)."""
PRESERVE_UNKNOWN = "x-kubernetes-preserve-unknown-fields"
FieldPath = tuple[str | int, ...]
DELETE = object()
"""A change's value (in BROKEN) that deletes the field instead."""


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with unknown fields refused wherever it lists the known ones, as the API
    server does under kubectl's default field validation (Strict); a CRD's schema alone
    leaves them to pruning, which would let a misspelt field through unnoticed."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(PRESERVE_UNKNOWN):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(s) for s in schema[key]]
    return schema


def validator(kind: str) -> jsonschema_rs.Draft4Validator:
    schema = json.loads(gzip.decompress((CRDS / SCHEMAS[kind]).read_bytes()))
    return jsonschema_rs.Draft4Validator(strict(schema))


VALIDATORS = {kind: validator(kind) for kind in SCHEMAS}
RUNTIME = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())
[CONTAINER] = RUNTIME["spec"]["containers"]
SERVICES = {
    path.name: yaml.safe_load(path.read_text()) for path in sorted(KSERVE.glob("inference*.yaml"))
}
MANIFESTS = {"servingruntime.yaml": RUNTIME, **SERVICES}


def errors(doc: dict[str, Any]) -> list[tuple[FieldPath, str]]:
    """What the manifest's CRD schema finds wrong with it: (where, what) each."""
    found = VALIDATORS[doc["kind"]].iter_errors(doc)
    return [(tuple(e.instance_path), e.message) for e in found]


def model_of(service: dict[str, Any]) -> dict[str, Any]:
    model: dict[str, Any] = service["spec"]["predictor"]["model"]
    return model


def serve_settings(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings `microbatch serve` would run with in the service's predictor: the
    runtime's arguments and the service's own after them (as KServe concatenates them),
    `{{.Name}}` filled in, the service's environment set."""
    name = service["metadata"]["name"]
    model = model_of(service)
    argv = [arg.replace("{{.Name}}", name) for arg in [*CONTAINER["args"], *model.get("args", [])]]
    for env in model.get("env", []):
        assert env["name"].removeprefix("MICROBATCH_").lower() in Settings.model_fields, env
        monkeypatch.setenv(env["name"], env["value"])
    return cli.parse_serve_args(argv)  # raises for an unknown flag or a bad value


@pytest.fixture(autouse=True)
def _no_outside_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from this process's environment would blur what the manifests say."""
    for name in [n for n in os.environ if n.startswith("MICROBATCH_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_is_valid_against_kserves_crd_schema(name: str) -> None:
    doc = MANIFESTS[name]
    assert doc["apiVersion"] == API_VERSIONS[doc["kind"]]
    assert errors(doc) == []


BROKEN: dict[str, tuple[str, FieldPath, object]] = {
    "a format's priority below 1": (
        "servingruntime.yaml", ("spec", "supportedModelFormats", 0, "priority"), 0),
    "protocolVersions not a list": ("servingruntime.yaml", ("spec", "protocolVersions"), "v2"),
    "a container without a name": (
        "servingruntime.yaml", ("spec", "containers", 0, "name"), DELETE),
    "a probe's port a list": (
        "servingruntime.yaml", ("spec", "containers", 0, "readinessProbe", "httpGet", "port"),
        [8080]),
    "a misspelt container field": (
        "servingruntime.yaml", ("spec", "containers", 0, "arguments"), ["--port=8080"]),
    "an unknown scale metric": (
        "inferenceservice.yaml", ("spec", "predictor", "scaleMetric"), "queue_depth"),
    "minReplicas a string": ("inferenceservice.yaml", ("spec", "predictor", "minReplicas"), "1"),
    "a model format without a name": (
        "inferenceservice.yaml", ("spec", "predictor", "model", "modelFormat", "name"), DELETE),
    "a malformed GPU quantity": (
        "inferenceservice.yaml",
        ("spec", "predictor", "model", "resources", "limits", "nvidia.com/gpu"), "one"),
    "a misspelt storageUri": (
        "inferenceservice.yaml", ("spec", "predictor", "model", "storageURI"), "hf://a/b"),
}  # fmt: skip
"""Changes the CRD schemas must refuse: (manifest, the field, its new value)."""


def broken(doc: dict[str, Any], path: FieldPath, value: object) -> dict[str, Any]:
    """A deep copy of `doc` with the field at `path` set to `value` (or deleted)."""
    doc = copy.deepcopy(doc)
    node: Any = doc
    for part in path[:-1]:
        node = node[part]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@pytest.mark.parametrize(("name", "path", "value"), BROKEN.values(), ids=list(BROKEN))
def test_the_schemas_refuse_a_broken_manifest(name: str, path: FieldPath, value: object) -> None:
    found = errors(broken(MANIFESTS[name], path, value))
    assert found, f"{'.'.join(map(str, path))} = {value!r} passed the schema"
    # Reported at the field, or at its parent (a missing or an unknown field): not elsewhere.
    assert all(path[: len(where)] == where and len(where) >= len(path) - 1
               for where, _ in found), found  # fmt: skip


@pytest.mark.parametrize("name", SERVICES)
def test_the_runtime_arguments_are_serve_settings_for_each_service(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = SERVICES[name]
    settings = serve_settings(service, monkeypatch)
    [spec] = settings.model_specs()
    assert spec.name == service["metadata"]["name"]
    assert spec.source == "/mnt/models", "where KServe's storage initializer puts the model"
    assert settings.host == "0.0.0.0"
    assert settings.port == KSERVE_HTTP_PORT
    assert settings.grpc_port is not None
    assert settings.grpc_port != settings.port
    for env in model_of(service).get("env", []):
        value = getattr(settings, env["name"].removeprefix("MICROBATCH_").lower())
        assert value == type(value)(env["value"]), env


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_reaches_the_port_of_its_protocol(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = SERVICES[name]
    settings = serve_settings(service, monkeypatch)
    model = model_of(service)
    assert model["protocolVersion"] in RUNTIME["spec"]["protocolVersions"]
    ports = model.get("ports", [])
    if model["protocolVersion"] == "grpc-v2":
        # Knative: one port per predictor, named for its protocol.
        assert ports == [{"name": "h2c", "containerPort": settings.grpc_port, "protocol": "TCP"}]
    else:
        assert model["protocolVersion"] == "v2"
        assert ports == [], "none declared: KServe's default, 8080 over HTTP/1"
    assert {p["name"] for p in ports} <= KNATIVE_PORT_NAMES


def test_the_runtime_serves_the_open_inference_protocol_on_both_transports() -> None:
    assert set(RUNTIME["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    assert "ports" not in CONTAINER, "an InferenceService picks the one Knative exposes"
    assert CONTAINER["name"] == "kserve-container", "the name KServe merges a predictor into"
    assert "{{.Name}}" in " ".join(CONTAINER["args"])


def test_the_probes_and_the_metrics_are_on_the_http_port_and_are_app_routes() -> None:
    routes = app_routes()
    probes = {"startupProbe": "/v2/health/live", "livenessProbe": "/v2/health/live",
              "readinessProbe": "/v2/health/ready"}  # fmt: skip
    for probe, path in probes.items():
        action = CONTAINER[probe]["httpGet"]
        assert action == {"path": path, "port": KSERVE_HTTP_PORT}, probe
        assert path in routes
    startup = CONTAINER["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "compile + warm-up"
    annotations = RUNTIME["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == KSERVE_HTTP_PORT
    assert annotations["prometheus.kserve.io/path"] in routes


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_names_the_runtime_and_a_format_it_supports(name: str) -> None:
    service = SERVICES[name]
    model = model_of(service)
    assert model["runtime"] == RUNTIME["metadata"]["name"]
    formats = {f["name"]: f for f in RUNTIME["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    chosen = formats[model["modelFormat"]["name"]]
    assert chosen.get("autoSelect"), "the service would find the runtime without naming it"
    assert ISVC_NAME.fullmatch(service["metadata"]["name"])
    assert MODEL_NAME.fullmatch(service["metadata"]["name"]), "it is the served model's name"
    assert model["storageUri"].split("://")[0] in {"hf", "s3", "gs", "pvc"}


def test_huggingface_is_served_only_where_a_service_names_the_runtime() -> None:
    """KServe's own Hugging Face server auto-selects for `huggingface`: microbatch must
    not take those InferenceServices (text generation among them) from it."""
    formats = {f["name"]: f for f in RUNTIME["spec"]["supportedModelFormats"]}
    assert formats["huggingface"].get("autoSelect") is False
    assert formats["sentence-transformers"]["autoSelect"] is True


@pytest.mark.parametrize("name", SERVICES)
def test_autoscaling_keeps_a_warm_pod_and_batches_full(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = SERVICES[name]
    predictor = service["spec"]["predictor"]
    assert predictor["minReplicas"] >= 1, "a cold start compiles and warms up"
    assert predictor["maxReplicas"] >= predictor["minReplicas"]
    assert "canaryTrafficPercent" not in predictor, "a rollout sets it, not the first apply"
    if predictor["scaleMetric"] in ("concurrency", "rps"):  # Knative's autoscaler only
        mode = service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
        assert mode == "Knative"
    settings = serve_settings(service, monkeypatch)
    assert predictor["scaleTarget"] >= 2 * settings.max_batch_size


def test_the_runtime_runs_the_image_of_the_other_manifests_as_its_user() -> None:
    assert CONTAINER["image"] == DEPLOYED["image"]
    user = re.search(r"^USER (\d+)$", (ROOT / "Dockerfile.cuda").read_text(), re.MULTILINE)
    assert user is not None
    assert CONTAINER["securityContext"]["runAsUser"] == int(user.group(1))
    for name in SERVICES:
        gpus = model_of(SERVICES[name])["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) == DEPLOYED["resources"]["limits"]["nvidia.com/gpu"], "one per pod"
