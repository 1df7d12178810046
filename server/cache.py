"""The result cache: outputs of inputs computed recently, by the inputs' identity.

In-process (each front-end of `--workers N` holds its own), bounded in entries and in
approximate bytes, each entry living `ttl_s`; least recently used entries go first. A
hit is answered without the queue: no batch, no device, no engine process. The key is
`Encoded.identity()`: the tokens and every output option (prompt, dimensions,
normalization, raw scores); the server runs one model, so the model is implied. A
request with `Cache-Control: no-cache` is computed afresh (and its result stored).
Behind it, optionally, a tier shared through Redis (`server.shared_cache`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from batcher import Lane, Owner, Result
from batcher.models import Classification, Encoded, Output, SparseVector, TokenVectors
from server.client import EngineHandle
from server.in_front import EngineInFront
from server.shared_cache import SharedCache


def footprint(item: Encoded, value: Output) -> int:
    """Approximate bytes an entry holds in CPython: the key's tuple of ids (most ids are
    ints above the interpreter's cached small ones) and the value's floats."""
    ids = item.n_tokens * (2 if item.type_ids is not None else 1)
    key = 120 + 36 * ids
    if isinstance(value, Classification):
        return key + 200 + 32 * len(value.scores) + len(value.label)
    if isinstance(value, TokenVectors):
        return key + 100 + len(value.data)
    if isinstance(value, SparseVector):
        return key + 150 + len(value.indices) + len(value.values)
    return key + 56 + 32 * len(value)


@dataclass
class _Entry:
    value: Output
    size: int
    expires_at: float


class ResultCache:
    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        ttl_s: float,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.bytes = 0
        self.hits = Counter(
            "microbatch_cache_hits", "Inputs answered from the result cache.", registry=registry
        )
        self.misses = Counter(
            "microbatch_cache_misses",
            "Inputs looked up in the result cache and not found (then computed).",
            registry=registry,
        )
        self.evictions = Counter(
            "microbatch_cache_evictions",
            "Entries dropped to keep the cache within its entries and bytes (expired ones "
            "not included).",
            registry=registry,
        )
        self.shared_hits = Counter(
            "microbatch_cache_shared_hits",
            "Inputs answered from the shared cache (--cache-url), having missed this process's.",
            registry=registry,
        )
        self.shared_errors = Counter(
            "microbatch_cache_shared_errors",
            "Lookups or stores in the shared cache (--cache-url) that failed or timed out; "
            "the requests were served without it.",
            registry=registry,
        )
        Gauge("microbatch_cache_entries", "Entries in the result cache.",
              registry=registry).set_function(lambda: len(self._entries))  # fmt: skip
        Gauge("microbatch_cache_bytes", "Approximate bytes the result cache holds.",
              registry=registry).set_function(lambda: self.bytes)  # fmt: skip

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Output | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at <= self._clock():
            self._drop(key)
            entry = None
        if entry is None:
            self.misses.inc()
            return None
        self._entries.move_to_end(key)
        self.hits.inc()
        return entry.value

    def put(self, key: Hashable, item: Encoded, value: Output) -> None:
        size = footprint(item, value)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(value, size, self._clock() + self.ttl_s)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.evictions.inc()

    def _drop(self, key: Hashable) -> None:
        self.bytes -= self._entries.pop(key).size


class CachedEngine(EngineInFront):
    """An `EngineHandle` that answers what `cache` holds, then what `shared` (Redis)
    holds, and sends the rest to `engine`, storing their results in both. `read=False`
    (a request's `Cache-Control: no-cache`) skips the lookups."""

    def __init__(
        self,
        engine: EngineHandle,
        cache: ResultCache,
        shared: SharedCache | None = None,
        *,
        read: bool = True,
        model: str = "",
    ) -> None:
        super().__init__(engine)
        self._cache = cache
        self._shared = shared
        self._read = read
        self._model = model
        """Part of every key: one cache serves several models."""

    async def submit(
        self, payload: Encoded, *, deadline: float | None = None, lane: Lane = "interactive",
        owner: Owner | None = None,
    ) -> Result[Output]:  # fmt: skip
        [result] = await self.submit_many([payload], deadline=deadline, lane=lane, owner=owner)
        return result

    async def submit_many(
        self, payloads: Sequence[Encoded], *, deadline: float | None = None,
        lane: Lane = "interactive", owner: Owner | None = None,
    ) -> list[Result[Output]]:  # fmt: skip
        keys = [(self._model, payload.identity()) for payload in payloads]
        results: list[Result[Output] | None] = [None] * len(payloads)
        if self._read:
            for i, key in enumerate(keys):
                value = self._cache.get(key)
                if value is not None:
                    results[i] = Result(value, 0.0, 0.0, 0, cached=True)
        missing = [i for i, result in enumerate(results) if result is None]
        if missing and self._read and self._shared is not None:
            found = await self._shared.get_many([payloads[i] for i in missing])
            for i, value in zip(missing, found, strict=True):
                if value is not None:
                    self._cache.put(keys[i], payloads[i], value)
                    results[i] = Result(value, 0.0, 0.0, 0, cached=True)
            self._shared.hits.inc(sum(value is not None for value in found))
            missing = [i for i in missing if results[i] is None]
        if missing:
            computed = await self._engine.submit_many(
                [payloads[i] for i in missing], deadline=deadline, lane=lane, owner=owner
            )
            for i, result in zip(missing, computed, strict=True):
                self._cache.put(keys[i], payloads[i], result.value)
                results[i] = result
            if self._shared is not None:
                self._shared.put_many([(payloads[i], computed[k].value)
                                       for k, i in enumerate(missing)])  # fmt: skip
        return [result for result in results if result is not None]
