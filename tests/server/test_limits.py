"""The batching limits are defined once (`batcher.LIMITS`); the settings, the live
`Batching` reply and the `BatchingPatch` body are made from that definition."""

from __future__ import annotations

from dataclasses import fields

from batcher import LIMITS, EngineConfig
from server.operator_schemas import Batching, BatchingPatch
from server.settings import Settings


def test_every_batching_limit_has_one_definition() -> None:
    names = [f.name for f in fields(EngineConfig)]
    assert sorted(names) == sorted(LIMITS)
    for model in (Settings, Batching, BatchingPatch):
        schema = model.model_json_schema()["properties"]
        for name in names:
            limit = LIMITS[name]
            assert schema[name].get("description") == limit.description, (model, name)
            found = [schema[name].get("minimum")] + [
                option.get("minimum") for option in schema[name].get("anyOf", [])
            ]
            if limit.minimum is not None:
                assert limit.minimum in found, (model, name, schema[name])
    assert Settings().engine_config() == EngineConfig()
