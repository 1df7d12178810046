"""What operators read and change: `GET /model`, `/admin/batching` and the dashboard's
data, as pydantic models (the request and reply shapes of the client routes are in
`server.schemas`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from batcher import BatchSizing, Policy, check_limit
from server.limits import limit_field
from server.timeline import Event, Sample


class ConfiguredLimits(BaseModel):
    max_batch_size: int
    max_wait_ms: float


class SloWindow(BaseModel):
    p99_ms: float = Field(description="p99 of queue plus device time over the window.")
    items: int
    queue_growth: int = Field(description="Queue depth at its end minus at its start.")
    queue_p99_ms: float = Field(description="p99 of the queue wait alone.")
    device_p99_ms: float = Field(description="p99 of a batch's device time.")


class SloChange(BaseModel):
    action: Literal["tighten", "loosen", "back_off"]
    reason: str


class SloInfo(BaseModel):
    target_p99_ms: float
    step: int = Field(description="0: the configured limits; steps - 1: batches of one.")
    steps: int
    last_window: SloWindow | None = Field(description="The last judged window.")
    last_change: SloChange | None
    changes: int = Field(description="Changes made since the target was set.")


class Batching(BaseModel):
    """The live batching settings."""

    max_batch_size: int = limit_field("max_batch_size")
    max_wait_ms: float = limit_field("max_wait_ms")
    max_batch_tokens: int | None = limit_field("max_batch_tokens")
    max_queue_size: int = limit_field("max_queue_size")
    policy: Policy = limit_field("policy")
    batch_sizing: BatchSizing = limit_field("batch_sizing")
    max_overtakes: int | None = limit_field("max_overtakes")
    min_batch_gain: float = limit_field("min_batch_gain")
    slo_p99_ms: float | None = limit_field("slo_p99_ms")
    configured: ConfiguredLimits | None = Field(
        None,
        description="With slo_p99_ms set: the limits as configured, within which the SLO "
        "controller chose max_batch_size and max_wait_ms above.",
    )
    slo: SloInfo | None = Field(None, description="The SLO controller; null when off.")


class BatchingPatch(BaseModel):
    """Fields to change; omitted ones keep their value. `null` lifts `max_batch_tokens`,
    `max_overtakes` and `slo_p99_ms`; no other limit takes it."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = limit_field("max_batch_size", patch=True)
    max_wait_ms: float | None = limit_field("max_wait_ms", patch=True)
    max_batch_tokens: int | None = limit_field("max_batch_tokens", patch=True)
    max_queue_size: int | None = limit_field("max_queue_size", patch=True)
    policy: Policy | None = limit_field("policy", patch=True)
    batch_sizing: BatchSizing | None = limit_field("batch_sizing", patch=True)
    max_overtakes: int | None = limit_field("max_overtakes", patch=True)
    min_batch_gain: float | None = limit_field("min_batch_gain", patch=True)
    slo_p99_ms: float | None = limit_field("slo_p99_ms", patch=True)

    @model_validator(mode="after")
    def _null_only_where_allowed(self) -> BatchingPatch:
        for name in self.model_fields_set:
            if getattr(self, name) is None:
                check_limit(name, None)  # ValueError: `name` must not be null
        return self

    def changes(self) -> dict[str, object]:
        """The limits to change, by name."""
        return self.model_dump(exclude_unset=True)


class LearnedCost(BaseModel):
    overhead_ms: float = Field(description="Fixed cost of one forward pass.")
    per_token_us: float = Field(description="Cost per padded token.")


class ReplicaInfo(BaseModel):
    index: int
    device: str
    alive: bool = Field(description="False once taken out of rotation.")


class ProbeInfo(BaseModel):
    candidate: str = Field(description="The lower precision probed (bfloat16).")
    inputs: int = Field(description="Probe inputs run in both precisions.")
    worst_cosine: float = Field(description="The lowest cosine of an output to float32's.")
    mean_cosine: float
    min_accuracy: float = Field(description="The bound (--min-accuracy).")
    kept: bool = Field(description="Whether the lower precision was kept.")


class PrecisionInfo(BaseModel):
    dtype: str
    reason: str = Field(description="Why this dtype: asked for, the hardware, the probe.")
    probe: ProbeInfo | None = Field(description="None when nothing was probed.")


class ThreadsInfo(BaseModel):
    torch: int = Field(description="torch intra-op threads.")
    cpus: str = Field(description="The CPUs this process may use (affinity, cgroup quota).")
    reason: str


class ModelSummary(BaseModel):
    """One served version of a model, in `GET /model`'s `models`, `GET /v1/models` and
    `GET /admin/models`."""

    name: str = Field(description="What pins this version: NAME@VERSION (NAME alone for "
                      "a model served without versions).")  # fmt: skip
    model: str = Field(description="The model's name: a request naming it is routed.")
    version: str
    task: str | None = Field(description="embed, classify or rerank; None while loading.")
    pooling: list[str] | None = Field(
        None, description="embed: the pooling modes (mean, cls, lasttoken, ...)."
    )
    status: str = Field(description="loading, warming, ready, draining or failed.")
    default: bool = Field(description="Whether it answers requests that name no model.")
    traffic: float = Field(description="Its share of the model's requests by the route "
                           "(0 to 1), among the versions ready now.")  # fmt: skip
    shadow: float = Field(0.0, description="The share of the model's requests mirrored to it.")
    error: str | None = Field(None, description="Why its live load failed.")


class ModelLoad(BaseModel):
    """`POST /admin/models`: a version to load while the server runs."""

    name: str = Field(description="The model's name (letters, digits and . _ : -).")
    version: str = Field(description="Its version (letters, digits and . _ -).")
    path: str = Field(description="Its directory, or a Hugging Face hub id.")


class Unloaded(BaseModel):
    """`DELETE /admin/models/NAME@VERSION`: what unloading gave back."""

    name: str
    freed_bytes: int = Field(description="Memory freed, by `measure`.")
    measure: str = Field(description="cuda allocated (the CUDA allocator's figure) or "
                         "resident set (the process's, on a CPU).")  # fmt: skip


class ShadowAgreement(BaseModel):
    """A shadow version against the version it shadows: means over what was compared."""

    model: str
    primary: str
    shadow: str
    items: int
    cosine: float | None = Field(description="Embeddings: mean cosine.")
    label_agreement: float | None = Field(description="Classifiers: share of same top labels.")
    score_difference: float | None = Field(description="Mean |score difference|.")
    rank_correlation: float | None = Field(description="Rerankers: mean Spearman correlation.")


class TenantSummary(BaseModel):
    """One tenant's counts since this process started (the tenants of `/metrics`, with
    the same bound: the rest as `other`)."""

    tenant: str
    requests: int
    items: int = Field(description="Inputs admitted.")
    tokens: int = Field(description="Input tokens admitted.")
    rejected: int = Field(description="Requests refused for a limit (429) or a scope (403).")
    device_s: float = Field(description="Device seconds its inputs took.")
    device_share: float = Field(description="Its share of every tenant's device seconds.")


class DriftInfo(BaseModel):
    """`GET /admin/drift`: one version's reference and its recent window (`server.drift`)."""

    model: str
    version: str
    task: str
    reference: dict[str, Any] | None = Field(
        description="None until its first --drift-window answers are in."
    )
    recent: dict[str, Any]


class RouteInfo(BaseModel):
    """One model's route: weights by version and the shadow shares."""

    weights: dict[str, int]
    shadow: dict[str, float]
    served: dict[str, float] = Field(description="Each ready version's share of the "
                                     "requests the route sends now (0 to 1).")  # fmt: skip


class ModelInfo(BaseModel):
    """`GET /model`: what the model is and computes (its task, device, dtype, token
    limit, labels, compile state, pooling or head: more fields, by task), and the
    engine's live state; `models` lists every model the server serves."""

    model_config = ConfigDict(extra="allow")

    name: str | None = None
    task: str | None = None
    device: str | None = None
    status: str
    batching: Batching
    learned_cost: LearnedCost | None = Field(description="None until enough batches ran.")
    memory_cap_tokens: int | None = Field(
        description="Padded tokens per batch learned from out-of-memory errors."
    )
    replicas: list[ReplicaInfo]
    limits: dict[str, Any] = Field(description="The request limits in force.")
    precision: PrecisionInfo | None = Field(None, description="The dtype, and why.")
    threads: ThreadsInfo | None = Field(None, description="torch's threads, and why.")
    models: list[ModelSummary] = Field(
        default_factory=list, description="Every model this server serves, the default first."
    )


class DashboardData(BaseModel):
    """What `GET /dashboard` draws: the samples after `since`, the limit changes, and the
    live settings."""

    status: str
    model: str
    models: list[str] = Field(description="Every served model; `model` is the one shown.")
    device: str
    dtype: str
    interval_s: float
    history_s: float
    batching: Batching
    samples: list[Sample]
    events: list[Event]
    versions: list[ModelSummary] = Field(
        default_factory=list, description="The shown model's versions: state and traffic."
    )
    shadows: list[ShadowAgreement] = Field(
        default_factory=list, description="How each shadow of the shown model agrees."
    )
    drift: dict[str, DriftInfo] = Field(
        default_factory=dict, description="The shown model's versions' drift, by version."
    )
    tenants: list[TenantSummary] = Field(
        default_factory=list, description="Each tenant's use, most device time first."
    )
