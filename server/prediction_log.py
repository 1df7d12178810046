"""The prediction log: one row per answered input (`--log-url`), in SQLite (a file, the
embedded default) or PostgreSQL (a fleet's shared database).

Off the request path: a reply only appends its call to a bounded buffer (counted in
rows; a full buffer drops the new rows, counted in `microbatch_log_rows_dropped_total`
and logged at most once a minute); a writer task takes batches of rows from it and
writes each batch in one transaction on a thread of its own, building the rows there
(hashes, norms, top labels). A slow or dead database costs no request: while it is
down, rows wait in the buffer and the writer retries with a growing pause, reconnecting;
once the buffer is full, new rows are dropped, never old ones re-ordered. Shutdown
(SIGTERM) flushes the buffer, within `--drain-timeout-s`.

The rows' columns, where they go and how the schema is created and migrated are in
`server.log_sinks`; a database whose schema is newer than this server knows is refused
at start. The log is read with `microbatch log FILE|URL` (`server.log_report`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from batcher import Result
from batcher.models import Classification, Encoded, Output, Pixels, SparseVector, TokenVectors
from server.calls import Call, Input
from server.log_sinks import SchemaTooNew, Sink
from server.served import Served

logger = logging.getLogger("microbatch.server")

TOP_K = 5
"""Labels kept, with their scores, in a classifier's row (`top_k`)."""
FLUSH_ROWS = 512
"""The writer wakes once this many rows wait, else every `FLUSH_S`."""
FLUSH_S = 0.5
MAX_WRITE_ROWS = 5000
"""Rows written in one transaction, at most."""
RETRY_S = (0.5, 1.0, 2.0, 5.0, 10.0)
"""The writer's pauses after failed writes, in turn (the last repeats)."""
DROP_LOG_S = 60.0


@dataclass(slots=True)
class Entry:
    """One call's rows, as the reply left them: built into rows on the writer's thread."""

    at: float
    request_id: str
    route: str
    model: str
    version: str
    inputs: Sequence[Input]
    pairs: Sequence[str] | None
    items: Sequence[Encoded]
    results: Sequence[Result[Output]] | None
    """None for a call that failed (`status`)."""
    labels: Sequence[str]
    latency_ms: float | None
    status: str = "ok"
    shadow: bool = False
    against: str | None = None
    """A shadow's row: the version it was compared with."""
    agreement: Sequence[float | None] | None = None
    tenant: str | None = None
    """Whose request it was (None without tenants)."""

    @property
    def rows(self) -> int:
        return len(self.items)


class PredictionLog:
    """The buffer and its writer. `record*` run on the loop; the writer task is started by
    `start` and stopped (after a flush) by `aclose`."""

    def __init__(
        self,
        sink: Sink,
        registry: CollectorRegistry,
        *,
        capacity: int,
        inputs: bool = False,
        vectors: bool = False,
        flush_timeout_s: float = 30.0,
    ) -> None:
        self.sink = sink
        self.capacity = capacity
        self.inputs = inputs
        self.vectors = vectors
        self.flush_timeout_s = flush_timeout_s
        self._pending: deque[Entry] = deque()
        self._pending_rows = 0
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._dropped_since_log = 0
        self._last_drop_log = float("-inf")
        self.written = Counter(
            "microbatch_log_rows_written", "Prediction log rows written.", registry=registry
        )
        self.dropped = Counter(
            "microbatch_log_rows_dropped",
            "Prediction log rows dropped: the buffer was full (a slow or dead database).",
            registry=registry,
        )
        self.errors = Counter(
            "microbatch_log_write_errors", "Failed writes to the prediction log.",
            registry=registry,
        )  # fmt: skip
        self.buffered = Gauge(
            "microbatch_log_rows_buffered", "Rows waiting for the prediction log's writer.",
            registry=registry,
        )  # fmt: skip
        self.buffered.set_function(lambda: self._pending_rows)
        self.write_seconds = Histogram(
            "microbatch_log_write_seconds", "Time to build and write one batch of rows.",
            registry=registry,
        )  # fmt: skip

    @property
    def buffered_rows(self) -> int:
        """Rows waiting for the writer."""
        return self._pending_rows

    # -- the loop's side -----------------------------------------------------------------

    def record(
        self,
        call: Call,
        results: Sequence[Result[Output]] | None,
        latency_ms: float | None,
        status: str = "ok",
    ) -> None:
        """The rows of an answered call (or, with `status`, of a failed one)."""
        served = call.served
        self._add(Entry(
            time.time(), call.request_id, call.route, served.name, served.version,
            call.inputs, call.pairs, call.items, results, _labels(served), latency_ms, status,
            tenant=call.tenant,
        ))  # fmt: skip

    def record_shadow(
        self,
        call: Call,
        shadow: Served,
        items: Sequence[Encoded],
        results: Sequence[Result[Output]],
        agreement: Sequence[float | None],
    ) -> None:
        """A shadow's rows: its answers, and how each agreed with the primary's."""
        self._add(Entry(
            time.time(), call.request_id, call.route, shadow.name, shadow.version,
            call.inputs, call.pairs, items, results, _labels(shadow), None, "ok", True,
            call.served.version, agreement, call.tenant,
        ))  # fmt: skip

    def _add(self, entry: Entry) -> None:
        if self._closing or self._pending_rows + entry.rows > self.capacity:
            self.dropped.inc(entry.rows)
            self._dropped_since_log += entry.rows
            now = time.monotonic()
            if now - self._last_drop_log >= DROP_LOG_S:
                logger.warning(
                    "prediction log: %d rows dropped (the buffer of %d rows is full: the "
                    "database is slow or down)", self._dropped_since_log, self.capacity,
                )  # fmt: skip
                self._last_drop_log, self._dropped_since_log = now, 0
            return
        self._pending.append(entry)
        self._pending_rows += entry.rows
        if self._pending_rows >= FLUSH_ROWS:
            self._wake.set()

    # -- the writer ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect once (a schema newer than this server's fails the start; a database
        that is down only delays the writes) and start the writer."""
        try:
            await asyncio.to_thread(self.sink.connect)
        except SchemaTooNew:
            raise
        except Exception as exc:
            logger.warning("prediction log: cannot connect yet (%s: %s); rows wait in the "
                           "buffer and the writer retries", type(exc).__name__, exc)  # fmt: skip
        self._writer = asyncio.create_task(self._run(), name="microbatch-prediction-log")

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), FLUSH_S)
                continue
            batch = self._take()
            started = time.perf_counter()
            try:
                rows = await asyncio.to_thread(self._write, batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors.inc()
                self._pending.extendleft(reversed(batch))
                self._pending_rows += sum(e.rows for e in batch)
                pause = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    logger.warning("prediction log: write failed (%s: %s); retrying in %.1fs",
                                   type(exc).__name__, exc, pause)  # fmt: skip
                if self._closing:  # flushing: keep trying until aclose's timeout
                    await asyncio.sleep(pause)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping(), pause)
                continue
            failures = 0
            self.written.inc(rows)
            self.write_seconds.observe(time.perf_counter() - started)

    async def _stopping(self) -> None:
        while not self._closing:
            self._wake.clear()
            await self._wake.wait()

    def _take(self) -> list[Entry]:
        batch: list[Entry] = []
        rows = 0
        while self._pending and (not batch or rows + self._pending[0].rows <= MAX_WRITE_ROWS):
            entry = self._pending.popleft()
            batch.append(entry)
            rows += entry.rows
        self._pending_rows -= rows
        return batch

    def _write(self, batch: list[Entry]) -> int:
        """On the writer's thread: build the rows and write them in one transaction."""
        rows = [row for entry in batch for row in self._rows(entry)]
        self.sink.write(rows)
        return len(rows)

    def _rows(self, entry: Entry) -> list[tuple[object, ...]]:
        found: list[tuple[object, ...]] = []
        for i, item in enumerate(entry.items):
            text = entry.inputs[i] if i < len(entry.inputs) else None
            pair = entry.pairs[i] if entry.pairs is not None and i < len(entry.pairs) else None
            result = entry.results[i] if entry.results is not None else None
            label = score = top_k = norm = vector = None
            if result is not None:
                label, score, top_k, norm, vector = self._summary(result.value, entry.labels)
            agreement = entry.agreement[i] if entry.agreement is not None else None
            found.append((
                entry.at, entry.request_id, entry.route, entry.model, entry.version,
                entry.shadow, entry.against, i, _hash(text, pair), item.n_tokens,
                text if self.inputs and isinstance(text, str) and not _image(item) else None,
                pair if self.inputs else None,
                label, score, top_k, norm, vector, agreement,
                result.queue_time_s * 1e3 if result is not None else None,
                result.inference_time_s * 1e3 if result is not None else None,
                entry.latency_ms,
                result.batch_size if result is not None else None,
                result.batch if result is not None else None,
                result.cached if result is not None else None,
                entry.status, entry.tenant,
            ))  # fmt: skip
        return found

    def _summary(
        self, value: Output, labels: Sequence[str]
    ) -> tuple[str | None, float | None, str | None, float | None, bytes | None]:
        if isinstance(value, Classification):
            top_k = None
            if len(value.scores) > 1 and labels:
                order = sorted(range(len(value.scores)), key=lambda j: -value.scores[j])
                top_k = json.dumps([[labels[j], value.scores[j]] for j in order[:TOP_K]])
            return value.label, value.score, top_k, None, None
        if isinstance(value, TokenVectors | SparseVector):
            return None, None, None, None, None
        array = np.asarray(value, dtype=np.float32)
        vector = array.tobytes() if self.vectors else None
        return None, None, None, float(np.linalg.norm(array)), vector

    async def aclose(self) -> None:
        """Flush what waits (within `flush_timeout_s`), then stop the writer and close."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), self.flush_timeout_s)
            except TimeoutError:
                logger.warning("prediction log: %d rows not written at shutdown (the "
                               "database is slow or down)", self._pending_rows)  # fmt: skip
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
        if self._pending_rows:
            self.dropped.inc(self._pending_rows)
        await asyncio.to_thread(self.sink.close)


def _labels(served: Served) -> Sequence[str]:
    try:
        return served.encoder.labels
    except Exception:  # not loaded (any more)
        return ()


def _image(item: object) -> bool:
    """An image's input is its file, not text the log keeps (only its hash)."""
    return isinstance(item, Pixels)


def _hash(text: Input | None, pair: str | None) -> str | None:
    """The input as a hash (BLAKE2b, 128 bits): equal inputs have equal hashes, and the
    text cannot be read back."""
    if text is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(text, str):
        digest.update(text.encode())
    elif isinstance(text, bytes):  # an uploaded image's file
        digest.update(text)
    else:
        digest.update(np.asarray(text, dtype=np.int64).tobytes())
    if pair is not None:
        digest.update(b"\0" + pair.encode())
    return digest.hexdigest()
