"""Who may call what, and how often: API keys and JWTs on the client routes, naming a
tenant and its scopes (`server.tenants`, `server.tokens`); an admin key or the `admin`
scope on `/admin/*`; each tenant's request rate (`server.quotas`); and a token-bucket
rate limit per credential (per client IP without one).

Pure ASGI and before the body is read, so a refused request costs a header lookup.
Keys are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import Refusal, TenantLimited
from server.quotas import Bucket, Ledger, TenantMetrics
from server.settings import Settings
from server.tenants import ADMIN, PREDICT, Principal, Tenants, TenantsFile, per_process_problem
from server.tokens import TokenRefused, Verifier, jwks_problem, looks_like_jwt

logger = logging.getLogger("microbatch.server")

KSERVE_MODELS = "/v2/models/"
KSERVE_INFER = "/infer"

INFERENCE_PATHS = (
    "/predict", "/rerank", "/embed", "/similarity", "/tokenize", "/decode", "/v1/",
    "/v2/rerank", "/v2/embed", KSERVE_MODELS,
)  # fmt: skip
"""Routes that serve clients (ours, OpenAI's, TEI's, Cohere's, the Open Inference
Protocol's models): API keys and rate limits apply; and TEI's root route, `/`
(`is_client_route`). The Open Inference Protocol's `/v2` and `/v2/health/*` stay open,
as `/health` and `/ready` do: they are probes."""
QUEUED_PATHS = (
    "/predict", "/rerank", "/embed", "/similarity", "/v1/embeddings", "/v1/rerank",
    "/v2/rerank", "/v2/embed",
)  # fmt: skip
"""Routes whose items go through the engine's queue: the early 429 applies too; and `/`
(`is_queued_route`)."""
ROOT = "/"
"""TEI's root route (`POST /`): a prefix of every path, so matched whole."""


def is_client_route(path: str, method: str = "POST") -> bool:
    """Keys and rate limits apply (`/` only to POST: a GET there is a load balancer's
    probe, which TEI leaves open)."""
    return (path == ROOT and method == "POST") or path.startswith(INFERENCE_PATHS)


def is_queued_route(path: str, method: str = "POST") -> bool:
    """The early 429 applies: the routes of QUEUED_PATHS, `POST /` and the Open
    Inference Protocol's `.../infer`."""
    if path.startswith(KSERVE_MODELS):
        return method == "POST" and path.endswith(KSERVE_INFER)
    return (path == ROOT and method == "POST") or path.startswith(QUEUED_PATHS)


ADMIN_PREFIX = "/admin/"
REFUSAL_REASONS = ("unauthorized", "forbidden", "rate_limited", "queue_full")


class TokenBuckets:
    """One token bucket per client: `rate` tokens a second, at most `burst` saved up.

    Holds at most `max_clients` buckets (least recently seen dropped first), so a flood
    of new client addresses cannot grow memory without bound.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        self.rate, self.burst, self.clock, self.max_clients = rate, burst, clock, max_clients
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def take(self, client: str) -> float:
        """Take one token for `client`: 0.0 if allowed, else seconds until one is free."""
        now = self.clock()
        bucket = self._buckets.pop(client, None) or Bucket(float(self.burst), now)
        self._buckets[client] = bucket
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return bucket.take(1.0, self.rate, self.burst, now)


@dataclass
class Tenancy:
    """Who may call: the tenants and their keys (`server.tenants`), the JWT verifier
    (`server.tokens`, None without JWTs), each tenant's limits kept (`server.quotas`)
    and its series in /metrics."""

    tenants: Tenants
    verifier: Verifier | None
    ledger: Ledger
    metrics: TenantMetrics

    async def start(self) -> None:
        """Read the JWKS. Raises ValueError for a file that cannot be used; a URL that
        cannot be fetched now is logged, and fetched again when a token comes."""
        jwks = None if self.verifier is None else self.verifier.jwks
        if jwks is None:
            return
        try:
            await jwks.load()
        except ValueError as exc:
            if not jwks.remote:
                raise
            logger.error("%s; tokens are refused until it can be fetched", exc)

    def watch(self) -> Callable[[], None]:
        """Read the tenants file again on SIGHUP (where signals can be handled); returns
        what stops it."""
        loop = asyncio.get_running_loop()
        if self.tenants.path is None or not hasattr(signal, "SIGHUP"):
            return lambda: None
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: self.tenants.reload())
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            return lambda: None

        def unwatch() -> None:
            loop.remove_signal_handler(signal.SIGHUP)

        return unwatch

    @property
    def required(self) -> bool:
        """Whether the client routes need a key or a token."""
        return self.verifier is not None or self.tenants.keys_required

    @property
    def configured(self) -> bool:
        """Whether credentials with scopes exist (a tenants file, or JWTs)."""
        return self.verifier is not None or self.tenants.path is not None

    async def identify(self, scope: Scope) -> Principal | Refusal | None:
        """The principal of the request's bearer credential; a 401 for a missing or
        invalid one where one is required; None on an open server."""
        token = _bearer(scope)
        self.tenants.refresh()
        if token is not None and self.verifier is not None and looks_like_jwt(token):
            try:
                return await self.verifier.principal(token)
            except TokenRefused as exc:
                return _unauthorized(f"invalid token: {exc}", "invalid_token", str(exc))
        if token is not None:
            who = self.tenants.by_key(token)
            if who is not None:
                return who
            if self.required:
                return _unauthorized("invalid API key", "invalid_token", "unknown key")
        if self.required:
            what = "API key or token" if self.verifier is not None else "API key"
            return _unauthorized(f"missing {what}: send 'Authorization: Bearer KEY'")
        return None

    def forbidden(self, who: Principal, needed: str) -> Refusal:
        """403 for a credential that lacks scope `needed`."""
        self.metrics.refused(who.tenant, "scope")
        detail = f"this credential (tenant {who.tenant!r}) lacks the {needed!r} scope"
        challenge = f'Bearer realm="microbatch", error="insufficient_scope", scope="{needed}"'
        return Refusal(403, "forbidden", detail, {"WWW-Authenticate": challenge})

    def limited(self, who: Principal, exc: TenantLimited) -> Refusal:
        self.metrics.refused(who.tenant, exc.limit)
        headers = {"Retry-After": exc.retry_after, "X-Limit": exc.limit}
        return Refusal(429, "rate_limited", str(exc), headers)


def tenancy_for(settings: Settings, registry: CollectorRegistry) -> Tenancy:
    """The tenancy `settings` describe. Raises ValueError for a tenants file that cannot
    be read or used."""

    def check(parsed: TenantsFile) -> str | None:
        return per_process_problem(parsed, settings.workers)

    tenants = Tenants(settings.tenants_file, settings.api_key_list(), check=check)
    jwt = settings.jwt_config()
    if jwt is not None and jwt.jwks is not None and (problem := jwks_problem(jwt.jwks)):
        raise ValueError(problem)
    metrics = TenantMetrics(registry, settings.tenant_labels)
    for name in tenants.file.tenants:
        metrics.name(name)
    verifier = None if jwt is None else Verifier(jwt, tenants)
    return Tenancy(tenants, verifier, Ledger(), metrics)


def _unauthorized(detail: str, error: str | None = None, reason: str | None = None) -> Refusal:
    challenge = 'Bearer realm="microbatch"'
    if error is not None:
        # The reason may quote what the client sent (a key id): printable ASCII (a header
        # is Latin-1 on the wire), unquoted, short.
        plain = "".join(c for c in reason or "" if " " <= c <= "~" and c not in '"\\')[:200]
        challenge += f', error="{error}", error_description="{plain}"'
    return Refusal(401, "unauthorized", detail, {"WWW-Authenticate": challenge})


class AccessMiddleware:
    """401 without a valid key or token on the client routes (INFERENCE_PATHS), 403
    without the `predict` scope there (a model's own, `predict:MODEL`, is checked once
    the body names the model: `server.routes.parsing.serving`), 403 on /admin/* without
    the admin key or the `admin` scope (or always, when no credential is configured and
    the server listens beyond loopback), 429 over the tenant's request rate, over the
    rate limit or, through `admission`, while the queue is full."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tenancy: Tenancy,
        admin_key: str | None,
        admin_open: bool,
        buckets: TokenBuckets | None,
        admission: Callable[[Scope], Refusal | None],
        registry: CollectorRegistry,
    ) -> None:
        self.app = app
        self.tenancy = tenancy
        self.admin_key = admin_key.encode() if admin_key else None
        self.admin_open = admin_open
        self.buckets = buckets
        self.admission = admission
        """The engine's early queue check (`server.admission.queue_gate`), after the key
        and the rate limit, so that every refusal before the body is counted here."""
        self.refused = Counter(
            "microbatch_requests_refused",
            "Requests refused before reading their body, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in REFUSAL_REASONS:  # each series exists from the start, at 0
            self.refused.labels(reason)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if is_client_route(path, method):
            refusal = await self._client_refusal(scope)
            if refusal is None and is_queued_route(path, method):
                refusal = self.admission(scope)
            if refusal is None:  # only a request let in takes from its tenant's rate
                refusal = self._tenant_rate(scope)
        elif path.startswith(ADMIN_PREFIX):
            refusal = await self._admin_refusal(scope)
        else:
            refusal = None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        self.refused.labels(refusal.kind).inc()
        request_id = scope.get("state", {}).get("request_id")
        await refusal.response(request_id, scope["path"])(scope, receive, send)

    async def _client_refusal(self, scope: Scope) -> Refusal | None:
        tenancy = self.tenancy
        who = await tenancy.identify(scope)
        if isinstance(who, Refusal):
            return who
        client = None
        if who is not None:
            if not who.may_predict():
                return tenancy.forbidden(who, PREDICT)
            state = scope.setdefault("state", {})
            state["principal"] = who
            state["route_key"] = client = who.credential  # its id, never the key
        if self.buckets is not None:
            if client is None:
                peer = scope.get("client")
                client = "ip:" + (peer[0] if peer else "unknown")
            wait_s = self.buckets.take(client)
            if wait_s > 0:
                retry = str(max(1, math.ceil(wait_s)))
                detail = f"rate limit of {self.buckets.rate:g} requests/s exceeded"
                return Refusal(429, "rate_limited", detail, {"Retry-After": retry})
        return None

    def _tenant_rate(self, scope: Scope) -> Refusal | None:
        who: Principal | None = scope.get("state", {}).get("principal")
        if who is None:
            return None
        try:
            self.tenancy.ledger.request(who)
        except TenantLimited as exc:
            return self.tenancy.limited(who, exc)
        self.tenancy.metrics.request(who.tenant)
        return None

    async def _admin_refusal(self, scope: Scope) -> Refusal | None:
        token = _bearer(scope)
        if self.admin_key is not None and _matching(token, [self.admin_key]) is not None:
            return None
        if token is not None and self.tenancy.configured:
            who = await self.tenancy.identify(scope)
            if isinstance(who, Principal):
                return None if who.may_admin() else self.tenancy.forbidden(who, ADMIN)
        if self.admin_key is None and not self.tenancy.configured:
            if self.admin_open:
                return None
            detail = "the admin API is off: set MICROBATCH_ADMIN_KEY to use it on this host"
            return Refusal(403, "forbidden", detail)
        detail = "admin key required: send 'Authorization: Bearer KEY'"
        if self.tenancy.configured:
            detail = "admin key or a credential with the 'admin' scope required"
        return Refusal(403, "forbidden", detail)


def _bearer(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return bytes(token.strip())
            return None
    return None


def _matching(token: bytes | None, keys: list[bytes]) -> bytes | None:
    """The key equal to `token`, compared in constant time against every key."""
    if token is None:
        return None
    found = None
    for key in keys:
        if secrets.compare_digest(token, key):
            found = key
    return found
