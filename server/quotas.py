"""Each tenant's limits, kept, and what each tenant is seen doing.

`Ledger` holds, per tenant, in this process: a token bucket of requests a second and one
of input tokens a second, the inputs queued or computing, and the inputs of this UTC
day. A request over any of them gets 429 with `Retry-After` and the limit's name
(`TenantLimited`). `TenantEngine` is the engine as one tenant's request sees it: its
items are admitted by the ledger, carry the tenant's owner for the fair share
(`batcher.fairness`), and are counted in `TenantMetrics` (by tenant, bounded:
`max_labels` tenants by name, in the tenants file's order first, the rest as `other`).
Touched only on the event-loop thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from batcher import (
    SECONDS_BUCKETS,
    DeadlineUnreachable,
    EngineClosed,
    ItemTooLarge,
    Lane,
    Owner,
    QueueFull,
    Result,
)
from batcher.models import Encoded, Output
from server.client import EngineHandle
from server.errors import Refusal, Refused, TenantLimited
from server.in_front import EngineInFront
from server.tenants import Principal

DAY_S = 86_400
MIN_TOKEN_BURST = 512
LIMITS = ("requests_per_s", "tokens_per_s", "max_concurrent", "daily_items")
OTHER = "other"
REFUSED_AT_ONCE = (QueueFull, DeadlineUnreachable, ItemTooLarge, EngineClosed)
"""What the engine refuses before computing anything: the tenant gets its quota back."""


@dataclass
class Bucket:
    """A token bucket: `level` tokens at loop time `at`; refilled at a rate, up to a burst,
    as it is taken from."""

    level: float
    at: float

    def take(self, n: float, rate: float, burst: float, now: float) -> float:
        """Take `n` if there are; 0.0, else the seconds until there would be."""
        self.level = min(burst, self.level + (now - self.at) * rate)
        self.at = now
        if self.level >= n:
            self.level -= n
            return 0.0
        return (n - self.level) / rate


@dataclass
class _Account:
    requests: Bucket | None = None
    tokens: Bucket | None = None
    in_flight: int = 0
    day: int = -1
    today: int = 0


def _never(message: str) -> Refused:
    """A request that no wait would let through: 422, not a 429 to retry forever."""
    return Refused(Refusal(422, "too_many_inputs", message))


class Ledger:
    """Per-tenant counts in this process, for at most `max_tenants` tenants (the least
    recently seen forgotten first, unless inputs of theirs are in flight)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        max_tenants: int = 10_000,
    ) -> None:
        self._clock, self._wall, self.max_tenants = clock, wall, max_tenants
        self._accounts: OrderedDict[str, _Account] = OrderedDict()

    def _account(self, tenant: str) -> _Account:
        account = self._accounts.pop(tenant, None) or _Account()
        self._accounts[tenant] = account
        if len(self._accounts) > self.max_tenants:
            oldest, first = next(iter(self._accounts.items()))
            if first.in_flight == 0:
                del self._accounts[oldest]
        return account

    def request(self, who: Principal) -> None:
        """Count one request. Raises TenantLimited over `requests_per_s`."""
        limits = who.limits
        if limits.requests_per_s is None:
            return
        rate = limits.requests_per_s
        burst = limits.burst or max(1, round(rate))
        account = self._account(who.tenant)
        now = self._clock()
        if account.requests is None:
            account.requests = Bucket(burst, now)
        wait_s = account.requests.take(1, rate, burst, now)
        if wait_s > 0:
            raise TenantLimited(
                "requests_per_s", f"tenant {who.tenant!r} is over its {rate:g} requests/s", wait_s
            )

    def admit(self, who: Principal, items: int, tokens: int) -> None:
        """Take `items` inputs of `tokens` tokens in all, or raise TenantLimited naming
        the first limit they would break (and take nothing)."""
        limits, account = who.limits, self._account(who.tenant)
        cap = limits.max_concurrent
        if cap is not None and items > cap:
            raise _never(f"the request has {items} inputs; tenant {who.tenant!r} may have {cap} "
                         "in flight (max_concurrent): send fewer at a time")  # fmt: skip
        if cap is not None and account.in_flight + items > cap:
            message = (f"tenant {who.tenant!r} has {account.in_flight} inputs in flight; "
                       f"its limit is {cap} (max_concurrent)")  # fmt: skip
            raise TenantLimited("max_concurrent", message, 1.0)
        wall = self._wall()
        day = int(wall // DAY_S)
        if account.day != day:
            account.day, account.today = day, 0
        quota = limits.daily_items
        if quota is not None and account.today + items > quota:
            message = (f"tenant {who.tenant!r} has used {account.today} of its {quota} "
                       f"inputs today (daily_items; the day is UTC's)")  # fmt: skip
            raise TenantLimited("daily_items", message, (day + 1) * DAY_S - wall)
        if limits.tokens_per_s is not None:
            rate = limits.tokens_per_s
            burst = max(limits.token_burst or round(rate), MIN_TOKEN_BURST)
            now = self._clock()
            if account.tokens is None:
                account.tokens = Bucket(burst, now)
            if tokens > burst:
                raise _never(f"the request has {tokens} tokens; tenant {who.tenant!r} may send "
                             f"{burst} at once (token_burst): send fewer at a time")  # fmt: skip
            wait_s = account.tokens.take(tokens, rate, burst, now)
            if wait_s > 0:
                message = f"tenant {who.tenant!r} is over its {rate:g} tokens/s"
                raise TenantLimited("tokens_per_s", message, wait_s)
        account.in_flight += items
        account.today += items

    def refund(self, who: Principal, items: int, tokens: int) -> None:
        """Give back what `admit` took for inputs the engine then refused (its queue
        full, the deadline out of reach): a refused request costs its tenant nothing."""
        account = self._accounts.get(who.tenant)
        if account is None:
            return
        account.today = max(0, account.today - items)
        limits = who.limits
        if account.tokens is not None and limits.tokens_per_s is not None:
            burst = max(limits.token_burst or round(limits.tokens_per_s), MIN_TOKEN_BURST)
            account.tokens.level = min(burst, account.tokens.level + tokens)

    def done(self, who: Principal, items: int) -> None:
        """`items` of the tenant's inputs are answered, failed or abandoned."""
        account = self._accounts.get(who.tenant)
        if account is not None:
            account.in_flight = max(0, account.in_flight - items)

    def in_flight(self, tenant: str) -> int:
        account = self._accounts.get(tenant)
        return 0 if account is None else account.in_flight


@dataclass
class TenantTotals:
    """One tenant's counts since the start, in this process (the dashboard's)."""

    requests: int = 0
    items: int = 0
    tokens: int = 0
    rejected: int = 0
    device_s: float = 0.0


class TenantMetrics:
    """Per-tenant series in /metrics, at most `max_labels` tenants by name and `other`:
    the tenants file's tenants first, then others as they come; a tenant named once
    keeps its series."""

    def __init__(self, registry: CollectorRegistry, max_labels: int) -> None:
        self.max_labels = max_labels
        self._labels: dict[str, str] = {}
        self.totals: dict[str, TenantTotals] = {}
        """By label."""
        labels = ["tenant"]
        self.requests = Counter("microbatch_tenant_requests", "Requests, by tenant.",
                                labels, registry=registry)  # fmt: skip
        self.items = Counter("microbatch_tenant_items", "Inputs admitted, by tenant.",
                             labels, registry=registry)  # fmt: skip
        self.tokens = Counter("microbatch_tenant_tokens", "Input tokens admitted, by tenant.",
                              labels, registry=registry)  # fmt: skip
        self.rejected = Counter(
            "microbatch_tenant_rejected",
            "Requests refused for a tenant's limit (429) or a missing scope (403), by "
            "tenant and limit.",
            ["tenant", "limit"],
            registry=registry,
        )
        self.queue = Histogram(
            "microbatch_tenant_queue_seconds",
            "Seconds an input waited in the queue, by tenant.",
            labels,
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.device = Counter(
            "microbatch_tenant_device_seconds",
            "Device seconds its inputs took (each input's share of its batch), by tenant.",
            labels,
            registry=registry,
        )

    def name(self, tenant: str) -> None:
        """Give `tenant` its own series if there is room (the tenants file's, at start)."""
        if tenant not in self._labels and len(self._labels) < self.max_labels:
            self._labels[tenant] = tenant

    def label(self, tenant: str) -> str:
        found = self._labels.get(tenant)
        if found is None:
            self.name(tenant)
            found = self._labels.get(tenant, OTHER)
        return found

    def _totals(self, label: str) -> TenantTotals:
        totals = self.totals.get(label)
        if totals is None:
            totals = self.totals[label] = TenantTotals()
        return totals

    def request(self, tenant: str) -> None:
        label = self.label(tenant)
        self.requests.labels(label).inc()
        self._totals(label).requests += 1

    def refused(self, tenant: str, limit: str) -> None:
        label = self.label(tenant)
        self.rejected.labels(label, limit).inc()
        self._totals(label).rejected += 1

    def admitted(self, tenant: str, items: int, tokens: int) -> None:
        label = self.label(tenant)
        self.items.labels(label).inc(items)
        self.tokens.labels(label).inc(tokens)
        totals = self._totals(label)
        totals.items += items
        totals.tokens += tokens

    def computed(self, tenant: str, results: Sequence[Result[Output]]) -> None:
        label = self.label(tenant)
        queue = self.queue.labels(label)
        for result in results:
            if not result.cached:
                queue.observe(result.queue_time_s)
        device_s = sum(r.device_s for r in results)
        self.device.labels(label).inc(device_s)
        self._totals(label).device_s += device_s


class TenantEngine(EngineInFront):
    """The engine as one tenant's request sees it (`server.client.EngineHandle`)."""

    def __init__(
        self, engine: EngineHandle, who: Principal, ledger: Ledger, metrics: TenantMetrics
    ) -> None:
        super().__init__(engine)
        self._who, self._ledger, self._metrics = who, ledger, metrics
        self._owner = who.owner

    def check_room(self, n: int = 1, owner: Owner | None = None) -> None:
        self._engine.check_room(n, self._owner)

    async def submit(
        self, payload: Encoded, *, deadline: float | None = None, lane: Lane = "interactive",
        owner: Owner | None = None,
    ) -> Result[Output]:  # fmt: skip
        [result] = await self.submit_many([payload], deadline=deadline, lane=lane)
        return result

    async def submit_many(
        self, payloads: Sequence[Encoded], *, deadline: float | None = None,
        lane: Lane = "interactive", owner: Owner | None = None,
    ) -> list[Result[Output]]:  # fmt: skip
        who, metrics = self._who, self._metrics
        tokens = sum(p.n_tokens for p in payloads)
        try:
            self._ledger.admit(who, len(payloads), tokens)
        except TenantLimited as exc:
            metrics.refused(who.tenant, exc.limit)
            raise
        metrics.admitted(who.tenant, len(payloads), tokens)
        try:
            results = await self._engine.submit_many(
                payloads, deadline=deadline, lane=lane, owner=self._owner
            )
        except REFUSED_AT_ONCE:
            self._ledger.refund(who, len(payloads), tokens)
            raise
        finally:
            self._ledger.done(who, len(payloads))
        metrics.computed(who.tenant, results)
        return results
