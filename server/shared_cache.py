"""The shared tier of the result cache: Redis (`--cache-url redis://…`), so that every
process and replica naming the same Redis computes an input once.

Entries are `namespace + sha256(input identity)` -> the output, an embedding as its
float32 bytes (what the model computed, exactly) or a classification as JSON; never a
pickle, so a shared Redis cannot make this process run code. Each entry lives the
cache's TTL (Redis expires it). Redis is a help, never a dependency: an error or a reply
slower than `timeout_s` counts in `microbatch_cache_shared_errors_total`, the request is
served without it, and Redis is left alone for `pause_s` before it is tried again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections.abc import Callable, Sequence

import numpy as np
import orjson
from prometheus_client import Counter

from batcher.models import Classification, Encoded, Output, Pixels, SparseVector, TokenVectors

logger = logging.getLogger("microbatch.server")


def shared_key(namespace: str, item: Encoded) -> bytes:
    """A stable key for `item` across processes: its tokens (an image: its pixels) and
    output options."""
    h = hashlib.sha256()
    if isinstance(item, Pixels):  # an image: its pixels' digest
        h.update(b"|image|" + item.digest)
    else:
        h.update(np.asarray(item.ids, dtype="<i8").tobytes())
    if item.type_ids is not None:
        h.update(b"|segments|" + np.asarray(item.type_ids, dtype="<i8").tobytes())
    options = (item.prompt_tokens, -1 if item.dimensions is None else item.dimensions)
    h.update(struct.pack("<qq??", *options, item.normalize, item.raw_scores))
    if item.tokens:
        h.update(b"|tokens")
    if item.top_k is not None:
        h.update(b"|top_k" + struct.pack("<q", item.top_k))
    return namespace.encode() + h.digest()


def encode_output(value: Output) -> bytes:
    if isinstance(value, Classification):
        return b"C" + orjson.dumps([value.label, value.score, value.scores])
    if isinstance(value, TokenVectors):
        return b"T" + struct.pack("<q", value.dimension) + value.data
    if isinstance(value, SparseVector):
        return b"S" + struct.pack("<q", len(value.indices)) + value.indices + value.values
    return b"E" + np.asarray(value, dtype="<f4").tobytes()


def decode_output(data: bytes) -> Output:
    """The output `encode_output` stored; ValueError for anything else."""
    if data[:1] == b"C":
        label, score, scores = orjson.loads(data[1:])
        return Classification(label, score, scores)
    if data[:1] == b"T" and len(data) >= 9:
        [dimension] = struct.unpack("<q", data[1:9])
        if dimension < 1 or (len(data) - 9) % (4 * dimension):
            raise ValueError("not a cached output")
        return TokenVectors(data[9:], dimension)
    if data[:1] == b"S" and len(data) >= 9:
        [size] = struct.unpack("<q", data[1:9])
        if size < 0 or size % 4 or len(data) != 9 + 2 * size:
            raise ValueError("not a cached output")
        return SparseVector(data[9 : 9 + size], data[9 + size :])
    if data[:1] == b"E":
        return np.frombuffer(data[1:], dtype="<f4").astype(float).tolist()  # type: ignore[no-any-return]
    raise ValueError("not a cached output")


def _raw(data: bytes | str) -> bytes:
    # The client answers bytes (no decode_responses); a str would be someone else's entry.
    if isinstance(data, str):
        raise ValueError("not a cached output")
    return data


class SharedCache:
    def __init__(
        self,
        url: str,
        namespace: str,
        ttl_s: float,
        hits: Counter,
        errors: Counter,
        *,
        timeout_s: float = 0.25,
        pause_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import redis.asyncio
        import redis.exceptions

        self._failures = (redis.exceptions.RedisError, OSError, TimeoutError, ValueError)
        """Redis down, slow or answering something else: served without it."""
        self._redis = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.url = url
        self.namespace = namespace
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._timeout_s = timeout_s
        self._pause_s = pause_s
        self._clock = clock
        self._paused_until = 0.0
        self._writes: set[asyncio.Task[None]] = set()
        self.hits = hits
        """Inputs answered from Redis (`microbatch_cache_shared_hits_total`)."""
        self.errors = errors
        """Lookups or stores that failed (`microbatch_cache_shared_errors_total`)."""

    @property
    def available(self) -> bool:
        """False for `pause_s` after an error."""
        return self._clock() >= self._paused_until

    async def get_many(self, items: Sequence[Encoded]) -> list[Output | None]:
        """Each item's cached output, or None (also for all of them while Redis fails)."""
        if not items or not self.available:
            return [None] * len(items)
        keys = [shared_key(self.namespace, item) for item in items]
        try:
            async with asyncio.timeout(self._timeout_s):
                found = await self._redis.mget(keys)
            return [None if data is None else decode_output(_raw(data)) for data in found]
        except self._failures as exc:
            self._failed(exc)
            return [None] * len(items)

    def put_many(self, entries: Sequence[tuple[Encoded, Output]]) -> None:
        """Store `entries` in the background: the answers do not wait for Redis."""
        if not entries or not self.available:
            return
        task = asyncio.get_running_loop().create_task(self._put(entries))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, entries: Sequence[tuple[Encoded, Output]]) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                pipe = self._redis.pipeline(transaction=False)
                for item, value in entries:
                    pipe.set(
                        shared_key(self.namespace, item), encode_output(value), px=self._ttl_ms
                    )
                await pipe.execute()
        except self._failures as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self.errors.inc()
        if self.available:
            logger.warning(
                "shared cache %s failed (%s: %s); serving without it for %g s",
                self.url, type(exc).__name__, exc, self._pause_s,
            )  # fmt: skip
        self._paused_until = self._clock() + self._pause_s

    async def aclose(self) -> None:
        for task in list(self._writes):
            task.cancel()
        await self._redis.aclose()
