"""Tokenization off the event loop, in batches.

The loop only parses, admits and replies. Requests hand their texts to `Tokenizer`,
which runs them on its own thread: while that thread is busy, the texts of every request
that arrives are gathered, and run as one batch call of the Rust tokenizer per kind of
request (the same options, pairs or not, the same truncation side) the moment it frees
up, as the engine's adaptive policy does with forward passes. The batch call releases
the GIL, so tokenizing overlaps with the forward pass on the device thread and with the
loop itself. A short request that finds the thread idle is tokenized at once on the loop
(`INLINE_CHARS`): there is nothing to gather it with, and the hand-off costs more.

A front-end of `microbatch serve --workers N` tokenizes every request of up to
`FRONT_END_INLINE_CHARS` on its loop, busy thread or not (`gather_short=False`): its
parallelism is the N processes, a core each, and on one core a batch call saves nothing
per text (65 us one by one, 63 us in a batch of 64, for the default model's tokenizer
and 171-character texts) while each hand-off to the thread and back costs wake-ups and
GIL switches of both sides. Longer texts still go to the thread, so the loop never
stalls for a milliseconds-long text.

Futures are touched only on the loop; the thread only computes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from batcher.models import DEFAULT_OPTIONS, Encoded, Encoder, Options, Token, TruncationDirection

logger = logging.getLogger("microbatch.server")

INLINE_CHARS = 256
"""A request of at most this many characters that finds the tokenizer thread idle is
tokenized on the loop at once (tens of microseconds): the hand-off to the thread and
back costs more than that, and nothing else is waiting for the thread to batch with.
Measured with the null model of benchmarks/lab/overhead.py, always handing off cost 16 % of
req/s at one client and 8 % at 64; under load the thread is busy, so requests gather."""

FRONT_END_INLINE_CHARS = 1024
"""A front-end's limit for tokenizing on the loop: about 0.3 ms for the default model's
tokenizer on the 2-core machine of benchmarks/results/, against 0.1 ms at 256
characters. A quarter of the built-in benchmark corpus is over 256 characters; with the
hand-off for those, the tokenizer thread took 16 % of a front-end's CPU at 64 clients
(py-spy, benchmarks/lab/overhead.py's null model)."""

Kind = tuple[Options, bool, TruncationDirection]
"""What requests must share to be tokenized in one call: options, paired, side."""


@dataclass(slots=True)
class _Call:
    """One request's texts (and pairs) and the future its route awaits."""

    kind: Kind
    texts: Sequence[str]
    pairs: Sequence[str] | None
    future: asyncio.Future[list[Encoded]]


@dataclass(slots=True)
class _Outcome:
    encoded: list[Encoded] | None = None
    error: Exception | None = None
    calls: list[_Call] = field(default_factory=list)


def _encode_kinds(encoder: Encoder, calls: list[_Call]) -> list[_Outcome]:
    """On the tokenizer thread: one `encode_many` per kind of call, in arrival order."""
    groups: dict[Kind, list[_Call]] = {}
    for call in calls:
        groups.setdefault(call.kind, []).append(call)
    outcomes = []
    for (options, paired, direction), group in groups.items():
        texts = [t for call in group for t in call.texts]
        pairs = [p for call in group for p in call.pairs or ()] if paired else None
        outcome = _Outcome(calls=group)
        try:
            outcome.encoded = encoder.encode_many(texts, pairs, options, direction)
        except Exception as exc:  # InvalidOption (the same for the whole group), or a bug
            outcome.error = exc
        outcomes.append(outcome)
    return outcomes


class Tokenizer:
    """Tokenizes requests' texts on one thread, gathering those that arrive while it is
    busy into one batch call. Short requests (at most `inline_chars` in all) are
    tokenized on the loop when the thread is idle, or always with `gather_short=False`.
    `close` stops the thread."""

    def __init__(
        self, encoder: Encoder, *, inline_chars: int = INLINE_CHARS, gather_short: bool = True
    ) -> None:
        self._encoder = encoder
        self._inline_chars = inline_chars
        self._gather_short = gather_short
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="microbatch-tokenizer")
        self._waiting: list[_Call] = []
        self._running: asyncio.Task[None] | None = None
        self.calls = 0
        """Batch calls made so far on the thread (each serves every request gathered)."""
        self.inline = 0
        """Requests tokenized on the loop (short, with the thread idle or not gathering)."""

    async def encode(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        options: Options = DEFAULT_OPTIONS,
        truncation_direction: TruncationDirection = "right",
    ) -> list[Encoded]:
        """`encoder.encode_many(texts, pairs, options, truncation_direction)`, batched with
        the calls of other requests. Raises what it raises (InvalidOption)."""
        chars = sum(map(len, texts)) + sum(map(len, pairs or ()))
        if chars <= self._inline_chars and (self._running is None or not self._gather_short):
            self.inline += 1
            return self._encoder.encode_many(texts, pairs, options, truncation_direction)
        loop = asyncio.get_running_loop()
        kind = (options, pairs is not None, truncation_direction)
        call = _Call(kind, texts, pairs, loop.create_future())
        self._waiting.append(call)
        if self._running is None:
            self._running = asyncio.create_task(self._run(), name="microbatch-tokenize")
        return await call.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                calls, self._waiting = self._waiting, []
                try:
                    outcomes = await loop.run_in_executor(
                        self._thread, _encode_kinds, self._encoder, calls
                    )
                except BaseException as exc:
                    for call in calls:
                        _settle(call.future, None, exc)
                    raise
                self.calls += len(outcomes)
                for outcome in outcomes:
                    _deliver(outcome)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                logger.exception("tokenizer failed; this is a bug")
            for call in self._waiting:
                _settle(call.future, None, RuntimeError("the tokenizer stopped"))
            self._waiting = []
            raise
        finally:
            self._running = None

    async def tokenize(
        self, texts: Sequence[str], add_special_tokens: bool, prompt_name: str | None
    ) -> list[list[Token]]:
        """`encoder.tokenize` on the tokenizer thread (TEI's /tokenize)."""
        loop = asyncio.get_running_loop()
        tokenize = self._encoder.tokenize
        return await loop.run_in_executor(
            self._thread, tokenize, texts, add_special_tokens, prompt_name
        )

    async def decode(self, ids: Sequence[Sequence[int]], skip_special_tokens: bool) -> list[str]:
        """`encoder.decode` on the tokenizer thread (TEI's /decode)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._thread, self._encoder.decode, ids, skip_special_tokens
        )

    async def aclose(self) -> None:
        """Finish what is gathered, then stop the thread."""
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)
        await asyncio.to_thread(self._thread.shutdown, True)


def _deliver(outcome: _Outcome) -> None:
    if outcome.error is not None:
        for call in outcome.calls:
            _settle(call.future, None, outcome.error)
        return
    encoded = outcome.encoded
    assert encoded is not None
    start = 0
    for call in outcome.calls:
        stop = start + len(call.texts)
        _settle(call.future, encoded[start:stop], None)
        start = stop
    if start != len(encoded):
        raise RuntimeError(f"{len(encoded)} encodings for {start} texts; this is a bug")


def _settle(
    future: asyncio.Future[list[Encoded]], value: list[Encoded] | None, error: BaseException | None
) -> None:
    if future.done():  # its request went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert value is not None
        future.set_result(value)
