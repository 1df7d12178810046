"""Who may call what, and how often: API keys on the predict routes, an admin key on
`/admin/*`, and a token-bucket rate limit per key (per client IP without keys).

Pure ASGI and before the body is read, so a refused request costs a header lookup.
Keys are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import Refusal

INFERENCE_PATHS = (
    "/predict", "/rerank", "/embed", "/similarity", "/tokenize", "/decode", "/v1/",
    "/v2/rerank",
)  # fmt: skip
"""Routes that serve clients (ours, OpenAI's, TEI's, Cohere's): API keys and rate limits
apply; and TEI's root route, `/` (`is_client_route`)."""
QUEUED_PATHS = (
    "/predict", "/rerank", "/embed", "/similarity", "/v1/embeddings", "/v1/rerank",
    "/v2/rerank",
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
    return (path == ROOT and method == "POST") or path.startswith(QUEUED_PATHS)


ADMIN_PREFIX = "/admin/"
REFUSAL_REASONS = ("unauthorized", "forbidden", "rate_limited", "queue_full")


@dataclass
class _Bucket:
    tokens: float
    updated: float


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
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, client: str) -> float:
        """Take one token for `client`: 0.0 if allowed, else seconds until one is free."""
        now = self.clock()
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
        else:
            elapsed = now - bucket.updated
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
            bucket.updated = now
        self._buckets[client] = bucket
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


class AccessMiddleware:
    """401 without a valid API key on the client routes (INFERENCE_PATHS), 403 on /admin/*
    without the admin key
    (or always, when no admin key is set and the server listens beyond loopback),
    429 over the rate limit or, through `admission`, while the queue is full."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: Iterable[str],
        admin_key: str | None,
        admin_open: bool,
        buckets: TokenBuckets | None,
        admission: Callable[[Scope], Refusal | None],
        registry: CollectorRegistry,
    ) -> None:
        self.app = app
        self.api_keys = [k.encode() for k in api_keys]
        # Rate-limit buckets are named by a digest, so no key is held in the limiter.
        self._key_ids = {k: "key:" + hashlib.sha256(k).hexdigest()[:16] for k in self.api_keys}
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
            refusal = self._predict_refusal(scope)
            if refusal is None and is_queued_route(path, method):
                refusal = self.admission(scope)
        elif path.startswith(ADMIN_PREFIX):
            refusal = self._admin_refusal(scope)
        else:
            refusal = None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        self.refused.labels(refusal.kind).inc()
        request_id = scope.get("state", {}).get("request_id")
        await refusal.response(request_id, scope["path"])(scope, receive, send)

    def _predict_refusal(self, scope: Scope) -> Refusal | None:
        client = None
        if self.api_keys:
            token = _bearer(scope)
            key = _matching(token, self.api_keys)
            if key is None:
                detail = "missing API key" if token is None else "invalid API key"
                headers = {"WWW-Authenticate": 'Bearer realm="microbatch"'}
                message = f"{detail}: send 'Authorization: Bearer KEY'"
                return Refusal(401, "unauthorized", message, headers)
            client = self._key_ids[key]
            scope.setdefault("state", {})["route_key"] = client  # its id, never the key
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

    def _admin_refusal(self, scope: Scope) -> Refusal | None:
        if self.admin_key is None:
            if self.admin_open:
                return None
            detail = "the admin API is off: set MICROBATCH_ADMIN_KEY to use it on this host"
            return Refusal(403, "forbidden", detail)
        token = _bearer(scope)
        if _matching(token, [self.admin_key]) is None:
            detail = "admin key required: send 'Authorization: Bearer KEY'"
            return Refusal(403, "forbidden", detail)
        return None


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
