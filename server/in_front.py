"""An engine handle in front of another (the result cache, a tenant's limits): what it
does not change is the engine's own."""

from __future__ import annotations

from batcher import EngineConfig, EngineStats, Owner, State
from server.client import EngineHandle


class EngineInFront:
    """An `EngineHandle` in front of `engine` (a cache, a tenant's limits): what it does
    not change is the engine's own."""

    def __init__(self, engine: EngineHandle) -> None:
        self._engine = engine

    @property
    def state(self) -> State:
        return self._engine.state

    @property
    def config(self) -> EngineConfig:
        return self._engine.config

    def clock(self) -> float:
        return self._engine.clock()

    def stats(self) -> EngineStats:
        return self._engine.stats()

    def check_room(self, n: int = 1, owner: Owner | None = None) -> None:
        self._engine.check_room(n, owner)
