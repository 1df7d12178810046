"""Model adapters: torch and transformers live here, behind `batcher.Model`."""

from batcher.models.compiling import CompileState, graphs_compiled
from batcher.models.loading import (
    DEFAULT_HUB_ID,
    TASKS,
    DtypeOption,
    Loaded,
    LoadOptions,
    ModelLoadError,
    Task,
    TaskOption,
    default_source,
    load,
)
from batcher.models.text import Classification, Encoded, Output, TextModel

__all__ = [
    "DEFAULT_HUB_ID",
    "TASKS",
    "Classification",
    "CompileState",
    "DtypeOption",
    "Encoded",
    "LoadOptions",
    "Loaded",
    "ModelLoadError",
    "Output",
    "Task",
    "TaskOption",
    "TextModel",
    "default_source",
    "graphs_compiled",
    "load",
]
