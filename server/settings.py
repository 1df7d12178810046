"""Every setting of `microbatch serve`: a flag (`--max-wait-ms 20`) and an environment
variable (`MICROBATCH_MAX_WAIT_MS=20`) each. Flags win over the environment."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from batcher import BatchSizing, EngineConfig, Policy
from batcher.models import (
    DEFAULT_MIN_ACCURACY,
    CollateAhead,
    CompileMode,
    DtypeOption,
    LoadOptions,
    TaskOption,
)
from server.limits import limit_field
from server.routing import RoutePatch, parse_routes
from server.specs import ModelSpec
from server.tokens import JwtConfig


class Settings(BaseSettings):
    """microbatch serve: a dynamic micro-batching inference server."""

    model_config = SettingsConfigDict(
        env_prefix="MICROBATCH_",
        cli_prog_name="microbatch serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_use_class_docs_for_groups=False,
        cli_show_env_vars=True,
        cli_hide_none_type=True,
        frozen=True,
        extra="ignore",
    )

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Also serve the Open Inference Protocol (KServe v2, Triton's clients) "
        "over gRPC on this port, on --host, in the same processes as HTTP (8001 is "
        "Triton's). Default: off.",
    )
    model: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Local model directory or Hugging Face hub id; default: the built-in "
        "all-MiniLM-L6-v2. NAME=PATH serves it as NAME, NAME@VERSION=PATH as one version "
        "of NAME; repeat the flag (or separate with commas) to serve several models or "
        "versions, which then share the devices fairly.",
    )
    route: str | None = Field(
        None,
        description="How requests naming a model split over its versions, as JSON: "
        '{"NAME": {"v1": 95, "v2": 5, "shadow": {"v3": 0.2}}} (weights; shadow: the '
        "share of its traffic mirrored to a version, answered to no one). Default: each "
        "model's first version takes all; PATCH /admin/routes changes it live.",
    )
    default_model: str | None = Field(
        None,
        description="With several models: the one that answers requests naming none; "
        "default: the first.",
    )
    task: TaskOption = Field("auto", description="embed or classify; auto follows the model.")
    device: str = Field("auto", description="auto (CUDA, then MPS, then CPU), cpu, cuda:0, ...")
    devices: str | None = Field(
        None,
        description="Several devices, one model replica each, all fed from one queue: "
        "cuda:0,cuda:1 or all (every CUDA device); replaces --device.",
    )
    dtype: DtypeOption = Field(
        "auto",
        description="auto: float16 on CUDA; on a CPU with native bfloat16 (AVX512-BF16, "
        "AMX, Arm BF16) bfloat16 if a start-up probe agrees with float32 within "
        "--min-accuracy; else float32.",
    )
    min_accuracy: float = Field(
        DEFAULT_MIN_ACCURACY,
        gt=0,
        le=1,
        description="--dtype auto: the lowest cosine to float32 that bfloat16 must keep on "
        "every probe input to be chosen (--dtype float32 skips the probe).",
    )
    compile: bool = Field(True, description="torch.compile the forward pass (else eager).")
    compile_mode: CompileMode = Field(
        "default",
        description="torch.compile's mode: reduce-overhead records CUDA graphs of the warmed "
        "shapes (CUDA only; elsewhere it compiles as default does).",
    )
    collate_ahead: CollateAhead = Field(
        "auto",
        description="Pad the next batch into pinned host memory on a second thread while "
        "the device runs the current one: auto does so on CUDA only.",
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model.")
    max_tokens: int | None = Field(
        None, ge=1, description="Truncate inputs to this many tokens; default: model's limit."
    )
    calibration_file: Path | None = Field(
        None,
        description="Texts, one per line (the first 1024 are kept), whose embeddings fix the "
        "ranges of int8 and uint8 outputs; default: 32 built-in texts of many kinds.",
    )
    max_batch_size: int = limit_field("max_batch_size")
    max_wait_ms: float = limit_field("max_wait_ms")
    max_batch_tokens: int | None = limit_field("max_batch_tokens")
    policy: Policy = limit_field("policy")
    batch_sizing: BatchSizing = limit_field("batch_sizing")
    max_overtakes: int | None = limit_field("max_overtakes")
    min_batch_gain: float = limit_field("min_batch_gain")
    max_queue_size: int = limit_field("max_queue_size")
    slo_p99_ms: float | None = limit_field("slo_p99_ms")
    coalesce: bool = Field(
        True,
        description="Compute an input only once while an identical one (same tokens and "
        "output options) is queued or computing: the later caller joins it, and still gets "
        "its own answer, deadline and cancellation.",
    )
    cache_size: int = Field(
        10_000,
        ge=0,
        description="Results the cache keeps (per process), answered without the queue "
        "when the same input (tokens and output options) comes again; 0: no cache. A "
        "request with Cache-Control: no-cache is computed afresh.",
    )
    cache_mb: float = Field(
        64.0, gt=0, description="Approximate memory the result cache may hold (per process)."
    )
    cache_ttl_s: float = Field(600.0, gt=0, description="How long a cached result is served.")
    cache_url: str | None = Field(
        None,
        pattern=r"^(redis|rediss|unix)://",
        description="A Redis (redis://host:port/db) shared by every process and server that "
        "names it, behind each process's own cache: an input is computed once for all of "
        "them. If it fails or is slow, requests are served without it (counted in "
        "microbatch_cache_shared_errors_total).",
    )
    bulk_inputs: int = Field(
        32,
        ge=0,
        description="A call with at least this many inputs to embed or classify goes to the "
        "bulk lane (after interactive work, with a share of the device kept for it) unless "
        "its X-Priority header says interactive; rerank calls are interactive whatever "
        "their size; 0: only X-Priority: bulk sends work there.",
    )
    saturated_at: float = Field(
        0.8,
        gt=0,
        le=1,
        description="/ready says saturated (503, liveness unaffected) while the queue is at "
        "least this fraction of max-queue-size.",
    )
    max_text_chars: int = Field(4096, ge=1, description="Longest accepted text, in characters.")
    truncate: bool = Field(True, description="Cut texts over the token limit (else they get 422).")
    chunking: Literal["none", "mean"] = Field(
        "none",
        description="mean: embed a text over the token limit as windows of it, each batched "
        "on its own, combined by their token-weighted mean (unless the request says "
        "truncate: true); none: cut it (--truncate) or refuse it.",
    )
    max_client_batch: int = Field(
        2048,
        ge=1,
        description="Most inputs in one call of /predict/batch, /embed, /v1/embeddings or a "
        "rerank route (each input is queued and batched on its own; a call larger than "
        "half the queue goes in waves).",
    )
    max_body_bytes: int = Field(
        2_097_152, ge=1024, description="Largest request body (413); TEI's default, 2 MiB."
    )
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest image file "
                                 "(an image model's server takes bodies a third larger, in "
                                 "base64, whatever --max-body-bytes says).")  # fmt: skip
    max_image_pixels: int = Field(50_000_000, ge=1, description="Most pixels in an image, "
                                  "read from its header before decoding.")  # fmt: skip
    image_url_allow: str | None = Field(None, description="Comma-separated URL prefixes "
                                        "(https://images.example.com/public/) whose images a "
                                        "request may name; default: none.")  # fmt: skip
    image_threads: int = Field(
        0, ge=0, description="Threads that decode and preprocess images; 0: up to 4, one a core."
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="Default deadline of a request in the server; 504 after it."
    )
    max_request_timeout_s: float = Field(
        300.0, gt=0, description="Longest deadline a client may ask for in X-Request-Timeout-Ms."
    )
    watchdog_s: float = Field(
        60.0,
        gt=0,
        description="/health fails (503) while one forward pass has run longer than this, so "
        "that an orchestrator restarts a stuck device worker.",
    )
    keep_alive_s: int = Field(
        75,
        ge=1,
        description="How long an idle client connection stays open. Keep it above the idle "
        "timeout of the clients and load balancers in front, or they may reuse a connection "
        "the server is closing and see a reset.",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On shutdown, how long to finish admitted requests."
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated keys; when set, the client routes (ours, /v1/*, "
        "TEI's) need 'Authorization: Bearer KEY'.",
    )
    admin_key: SecretStr | None = Field(
        None,
        description="Key for /admin/*. Unset: /admin/* is open on a loopback host and "
        "refused on any other.",
    )
    tenants_file: Path | None = Field(
        None,
        description="TOML file of tenants: their API keys (with scopes), limits and weights "
        "(docs/tenants.md). Read again when it changes, or on SIGHUP.",
    )
    jwt_secret: SecretStr | None = Field(
        None, description="Accept JWT bearer tokens signed with this HS256 secret."
    )
    jwt_jwks: str | None = Field(
        None,
        description="Accept RS256/ES256 JWT bearer tokens signed by the keys of this JWKS "
        "(a file, or an http(s) URL, cached and fetched again every 5 minutes).",
    )
    jwt_issuer: str | None = Field(None, description="A token's required `iss`.")
    jwt_audience: str | None = Field(None, description="A token's required `aud`.")
    jwt_tenant_claim: str = Field("sub", description="The claim that names a token's tenant.")
    jwt_leeway_s: float = Field(
        30.0, ge=0, le=600, description="Clock skew allowed on `exp` and `nbf`."
    )
    tenant_labels: int = Field(
        50,
        ge=0,
        le=10_000,
        description="Tenants with series of their own in /metrics (the tenants file's first); "
        "the rest count as 'other'.",
    )
    rate_limit_rps: float | None = Field(
        None,
        gt=0,
        description="Requests per second per credential (per client IP without one) on "
        "the client routes; 429 above it. Default: no limit. Per tenant: --tenants-file.",
    )
    rate_limit_burst: int | None = Field(
        None, ge=1, description="Requests a client may send at once; default: rate-limit-rps."
    )
    cors_origins: str | None = Field(
        None, description="Comma-separated origins allowed by CORS ('*' for any); default: off."
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads; default: one per CPU this process may use "
        "(its affinity mask, capped by a cgroup CPU quota).",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Front-end processes (HTTP, validation, tokenizing) feeding one engine "
        "process that owns the devices; 1: everything in one process.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per line, with the request id."
    )
    access_log: bool = Field(False, description="Log every request (costs throughput).")
    drift_window: int = Field(
        1000,
        ge=0,
        description="Answers in each version's drift windows: the reference (its first "
        "answers after loading) and the recent one; 0 turns drift off.",
    )
    log_url: str | None = Field(
        None,
        description="The prediction log, one row per answered input: sqlite:///FILE (or a "
        "file path) or postgresql://USER@HOST/DB (pip install 'microbatch[postgres]'); "
        "read it with microbatch log. Default: off.",
    )
    log_inputs: bool = Field(
        False, description="Keep each input's text in the prediction log (else its hash)."
    )
    log_vectors: bool = Field(
        False, description="Keep each embedding in the prediction log (else its norm)."
    )
    log_buffer: int = Field(
        50_000,
        ge=1,
        description="Rows the prediction log holds while its database is slow or down; "
        "beyond it new rows are dropped (counted), never a request.",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        """`--model a=x --model b=y` arrives joined by commas, as the environment's does."""
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("grpc_port", mode="before")
    @classmethod
    def _grpc_off(cls, value: object) -> object:
        """`null` (MICROBATCH_GRPC_PORT=null) turns off what an image's environment
        turned on."""
        return None if isinstance(value, str) and value.strip().lower() == "null" else value

    @model_validator(mode="after")
    def _engine_limits_are_valid(self) -> Settings:
        self.engine_config()  # raises ValueError with the bad value
        self.model_specs()  # raises ValueError for a malformed or repeated name
        self.routes()  # raises ValueError for a malformed route or an unknown version
        if prefixes := self.image_url_prefixes():
            from batcher.models import prefix_problem  # Pillow, only when asked

            for problem in filter(None, map(prefix_problem, prefixes)):
                raise ValueError(f"--image-url-allow: {problem}")
        return self

    def routes(self) -> dict[str, RoutePatch]:
        """`--route`, parsed and checked against the served models and versions (where
        the models are named; a lone unnamed one is known by no name yet). Raises
        ValueError."""
        if self.route is None:
            return {}
        routes = parse_routes(self.route)
        specs = self.model_specs()
        if any(spec.name is None for spec in specs):
            return routes
        versions: dict[str, set[str]] = {}
        for spec in specs:
            versions.setdefault(spec.name or "", set()).add(spec.served_version)
        for name, patch in routes.items():
            if name not in versions:
                raise ValueError(f"--route: {name!r} is not a served model; served: "
                                 f"{', '.join(versions)}")  # fmt: skip
            named = {v for v, _ in patch.weights or ()} | {v for v, _ in patch.shadow or ()}
            unknown = sorted(named - versions[name])
            if unknown:
                raise ValueError(f"--route: {name} has no version {unknown[0]!r}; versions: "
                                 f"{', '.join(sorted(versions[name]))}")  # fmt: skip
        return routes

    def model_specs(self) -> list[ModelSpec]:
        """The models to serve, in order (the built-in one when none is named). Raises
        ValueError when several are given without names, a name repeats, or
        `default_model` names none of them."""
        if not self.model:
            specs = [ModelSpec(None, None)]
        else:
            specs = [ModelSpec.parse(entry) for entry in self.model]
        if len(specs) > 1:
            unnamed = [s.source for s in specs if s.name is None]
            if unnamed:
                raise ValueError(
                    f"--model: with several models each needs a name (NAME=PATH); "
                    f"unnamed: {', '.join(map(str, unnamed))}"
                )
            served = [(s.name, s.served_version) for s in specs]
            repeated = sorted({n for n in served if served.count(n) > 1}, key=str)
            if repeated:
                name, version = repeated[0]
                if any(s.version for s in specs if s.name == name):
                    raise ValueError(f"--model: '{name}@{version}' is given twice")
                raise ValueError(f"--model: the name {name!r} is given twice")
        if self.default_model is not None:
            names = [s.name for s in specs]
            if self.default_model not in names:
                known = ", ".join(n for n in names if n) or "none (name them NAME=PATH)"
                raise ValueError(
                    f"--default-model {self.default_model!r} is not a served model; served: {known}"
                )
            specs.sort(key=lambda s: s.name != self.default_model)
        return specs

    def image_url_prefixes(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in (self.image_url_allow or "").split(",") if p.strip())

    def image_body_bytes(self) -> int:
        """The body limit of a server that serves an image model: an image of
        `max_image_bytes` in base64, and the rest of its request."""
        return max(self.max_body_bytes, self.max_image_bytes * 4 // 3 + 65536)

    def engine_config(self) -> EngineConfig:
        """The batching limits, by name: every EngineConfig field is a setting here."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)})

    def api_key_list(self) -> frozenset[str]:
        keys = self.api_keys.get_secret_value() if self.api_keys else ""
        return frozenset(k.strip() for k in keys.split(",") if k.strip())

    def jwt_config(self) -> JwtConfig | None:
        """JWT checking as set; None when no JWT is accepted."""
        if self.jwt_secret is None and self.jwt_jwks is None:
            return None
        secret = self.jwt_secret.get_secret_value() if self.jwt_secret else None
        return JwtConfig(secret, self.jwt_jwks, self.jwt_issuer, self.jwt_audience,
                         self.jwt_tenant_claim, self.jwt_leeway_s)  # fmt: skip

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in (self.cors_origins or "").split(",") if o.strip()]

    @property
    def loopback(self) -> bool:
        """True when only this machine can reach the server."""
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    def device_list(self) -> list[str]:
        """One device per replica. Raises ValueError for `all` without CUDA."""
        if self.devices is None:
            return [self.device]
        if self.devices.strip() == "all":
            from batcher.models import cuda_device_count

            count = cuda_device_count()
            if count == 0:
                raise ValueError("--devices all: no CUDA device; list devices, e.g. cpu,cpu")
            return [f"cuda:{i}" for i in range(count)]
        return [d.strip() for d in self.devices.split(",") if d.strip()]

    def load_options(self, device: str | None = None, spec: ModelSpec | None = None) -> LoadOptions:
        """How to load `spec` (default: the first model) on `device`."""
        spec = spec if spec is not None else self.model_specs()[0]
        return LoadOptions(
            name=spec.name,
            source=spec.source,
            task=self.task,
            device=device if device is not None else self.device,
            dtype=self.dtype,
            min_accuracy=self.min_accuracy,
            compile=self.compile,
            compile_mode=self.compile_mode,
            collate_ahead=self.collate_ahead,
            max_tokens=self.max_tokens,
            trust_remote_code=self.trust_remote_code,
            calibration_file=None if self.calibration_file is None else str(self.calibration_file),
        )
