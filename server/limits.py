"""pydantic fields made from the engine's one definition of each batching limit
(`batcher.LIMITS`): the settings, the live `Batching` reply and the `BatchingPatch` body
all take their bounds, defaults and descriptions from it, so that they cannot drift."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from batcher import LIMITS, EngineConfig

DEFAULTS = EngineConfig.defaults()


def limit_field(name: str, *, patch: bool = False) -> Any:
    """The field of limit `name`: its default (None in a patch, where omitted means
    unchanged), its minimum, and its description."""
    limit = LIMITS[name]
    return Field(
        None if patch else DEFAULTS[name],
        ge=limit.minimum,
        le=limit.maximum,
        description=limit.description,
    )
