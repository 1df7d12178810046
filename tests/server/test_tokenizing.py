"""The tokenizer stage: off the loop, gathering the requests that arrive while it is busy
into one batch call per kind, every caller getting its own encodings."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from batcher.models import DEFAULT_OPTIONS, Encoded, InvalidOption, Options, TruncationDirection
from benchmarks.lab.null_model import NullEncoder
from server.tokenizing import INLINE_CHARS, Tokenizer

pytestmark = pytest.mark.asyncio


@dataclass
class GatedTokenizerModel(NullEncoder):
    """`encode_many` records each call and blocks until `release` is set."""

    max_tokens: int = 64

    release: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    calls: list[tuple[list[str], list[str] | None, Options, str]] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)

    def encode_many(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        options: Options = DEFAULT_OPTIONS,
        truncation_direction: TruncationDirection = "right",
    ) -> list[Encoded]:
        self.threads.add(threading.current_thread().name)
        self.calls.append(
            (list(texts), None if pairs is None else list(pairs), options, truncation_direction)
        )
        self.started.set()
        assert self.release.wait(10), "the test never released the tokenizer"
        joined = texts if pairs is None else [t + p for t, p in zip(texts, pairs, strict=True)]
        return [self.encode(t, None, options) for t in joined]


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


FIRST = "f" * (INLINE_CHARS + 1)
"""Long enough to go to the thread with the thread idle: the request that keeps it busy."""


async def test_a_short_request_finding_the_thread_idle_is_tokenized_at_once() -> None:
    model = GatedTokenizerModel()
    model.release.set()
    tokenizer = Tokenizer(model)
    async with asyncio.timeout(10):
        assert [item.ids for item in await tokenizer.encode(["short"])] == [ids("short")]
        assert (tokenizer.inline, tokenizer.calls) == (1, 0)
        assert model.threads == {"MainThread"}
        await tokenizer.encode(["x" * (INLINE_CHARS + 1)])
        assert (tokenizer.inline, tokenizer.calls) == (1, 1)
        assert "microbatch-tokenizer_0" in model.threads
    await tokenizer.aclose()


async def test_without_gathering_short_requests_are_tokenized_at_once_while_it_is_busy() -> None:
    model = GatedTokenizerModel()
    tokenizer = Tokenizer(model, inline_chars=2 * len(FIRST), gather_short=False)
    long = "y" * (2 * len(FIRST) + 1)
    async with asyncio.timeout(10):
        first = asyncio.create_task(tokenizer.encode([long]))
        await asyncio.to_thread(model.started.wait)  # the thread is busy with `first`
        model.release.set()  # (the loop's own calls must not block)
        for text in ("short", FIRST):  # both within inline_chars
            assert [item.ids for item in await tokenizer.encode([text])] == [ids(text[:64])]
        assert "MainThread" in model.threads
        assert [item.ids for item in await tokenizer.encode([long])] == [ids(long[:64])]
        await first
    assert (tokenizer.inline, tokenizer.calls) == (2, 2)  # the long ones on the thread
    await tokenizer.aclose()


async def test_requests_arriving_while_it_is_busy_share_one_call_per_kind() -> None:
    model = GatedTokenizerModel()
    tokenizer = Tokenizer(model)
    async with asyncio.timeout(10):
        first = asyncio.create_task(tokenizer.encode([FIRST]))
        await asyncio.to_thread(model.started.wait)  # the thread is busy with `first`
        plain = [asyncio.create_task(tokenizer.encode([f"a{i}", f"b{i}"])) for i in range(3)]
        pairs = asyncio.create_task(tokenizer.encode(["q", "q"], ["d1", "d2"]))
        left = asyncio.create_task(tokenizer.encode(["l"], None, DEFAULT_OPTIONS, "left"))
        await asyncio.sleep(0)  # every task has queued its call
        model.release.set()
        assert [item.ids for item in await first] == [
            ids(FIRST[:64])
        ]  # the fake keeps 64 characters
        for i, task in enumerate(plain):
            assert [item.ids for item in await task] == [ids(f"a{i}"), ids(f"b{i}")]
        assert [item.ids for item in await pairs] == [ids("qd1"), ids("qd2")]
        assert [item.ids for item in await left] == [ids("l")]
    assert model.calls[0][0] == [FIRST]
    # One call for the three plain requests, in arrival order; one for the pairs; one
    # for the left-truncated: three kinds, three calls, after the first.
    assert sorted(call[0] for call in model.calls[1:]) == [
        ["a0", "b0", "a1", "b1", "a2", "b2"],
        ["l"],
        ["q", "q"],
    ]
    assert tokenizer.calls == 4
    assert model.threads == {"microbatch-tokenizer_0"}  # busy: never on the loop's thread
    await tokenizer.aclose()


async def test_an_invalid_option_fails_only_the_requests_that_asked_for_it() -> None:
    model = GatedTokenizerModel()
    tokenizer = Tokenizer(model)
    async with asyncio.timeout(10):
        first = asyncio.create_task(tokenizer.encode([FIRST]))
        await asyncio.to_thread(model.started.wait)
        bad = asyncio.create_task(tokenizer.encode(["x"], None, Options(prompt_name="nope")))
        good = asyncio.create_task(tokenizer.encode(["y"]))
        await asyncio.sleep(0)
        model.release.set()
        with pytest.raises(InvalidOption, match="no prompts"):
            await bad
        assert [item.ids for item in await good] == [ids("y")]
        await first
    await tokenizer.aclose()


async def test_a_caller_that_goes_away_does_not_disturb_the_others() -> None:
    model = GatedTokenizerModel()
    tokenizer = Tokenizer(model)
    async with asyncio.timeout(10):
        first = asyncio.create_task(tokenizer.encode([FIRST]))
        await asyncio.to_thread(model.started.wait)
        gone = asyncio.create_task(tokenizer.encode(["gone"]))
        kept = asyncio.create_task(tokenizer.encode(["kept"]))
        await asyncio.sleep(0)
        gone.cancel()
        model.release.set()
        assert [item.ids for item in await kept] == [ids("kept")]
        assert [item.ids for item in await first] == [
            ids(FIRST[:64])
        ]  # the fake keeps 64 characters
        with pytest.raises(asyncio.CancelledError):
            await gone
    await tokenizer.aclose()
