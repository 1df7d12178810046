"""Fake runners for engine tests: outputs derive from inputs, and the test decides when
each forward pass finishes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from batcher.padding import bucket_length


class Poison(Exception):
    """Raised by the fake model for inputs it cannot handle."""


@dataclass
class Call:
    """One forward pass the fake received, and its start on the loop's clock."""

    payloads: list[str]
    started_at: float


@dataclass
class GatedRunner:
    """Runs on the event loop. While `gate` is clear every pass blocks until the test sets
    it; the output of input `x` is `x.upper()`, so a misrouted result is caught."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    calls: list[Call] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    poison: str = "boom"
    running: int = 0
    max_running: int = 0

    def cost(self, payload: str) -> int:
        return len(payload)

    async def run(self, payloads: Sequence[str]) -> list[str]:
        loop = asyncio.get_running_loop()
        self.calls.append(Call(list(payloads), loop.time()))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.started.set()
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        if any(self.poison in p for p in payloads):
            raise Poison(f"cannot handle a batch holding {self.poison!r}")
        return [p.upper() for p in payloads]

    @property
    def computed(self) -> list[str]:
        """Every payload that reached a successful or failed forward pass."""
        return [p for call in self.calls for p in call.payloads]

    async def wait_for_calls(self, n: int) -> None:
        while len(self.calls) < n:
            self.started.clear()
            await self.started.wait()


def open_runner() -> GatedRunner:
    runner = GatedRunner()
    runner.gate.set()
    return runner


@dataclass
class StagingRunner(GatedRunner):
    """A `GatedRunner` that, like the CUDA runner, prepares a batch while the one before
    computes, so the engine hands one batch out ahead of the device (staged)."""

    prepared: list[list[str]] = field(default_factory=list)

    @property
    def collates_ahead(self) -> bool:
        return True

    async def prepare(self, payloads: Sequence[str]) -> object | None:
        self.prepared.append(list(payloads))
        return None

    async def run(self, payloads: Sequence[str], prepared: object | None = None) -> list[str]:
        return await super().run(payloads)


@dataclass
class PaddedCostRunner(GatedRunner):
    """A CPU-like device on virtual time: each pass takes `overhead_s` plus `per_token_s`
    per padded token (items x the longest input's bucketed length)."""

    overhead_s: float = 0.0
    per_token_s: float = 0.0

    async def run(self, payloads: Sequence[str]) -> list[str]:
        padded = len(payloads) * bucket_length(max(len(p) for p in payloads))
        await asyncio.sleep(self.overhead_s + self.per_token_s * padded)
        return await super().run(payloads)
