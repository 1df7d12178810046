"""Model adapters: torch and transformers live here, behind `batcher.Model`."""

from batcher.models.compiling import CompileState, graphs_compiled
from batcher.models.description import (
    POOLING_MODES,
    Description,
    PoolingMode,
    UnsupportedModel,
)
from batcher.models.devices import DtypeOption, cuda_device_count, set_threads
from batcher.models.errors import ModelLoadError
from batcher.models.loading import (
    DEFAULT_HUB_ID,
    TASKS,
    Loaded,
    LoadOptions,
    Task,
    TaskOption,
    default_source,
    disable_progress_bars,
    load,
)
from batcher.models.text import (
    DEFAULT_OPTIONS,
    Classification,
    Encoded,
    InvalidOption,
    Options,
    Output,
    TextModel,
    Token,
    TruncationDirection,
)

__all__ = [
    "DEFAULT_HUB_ID",
    "DEFAULT_OPTIONS",
    "POOLING_MODES",
    "TASKS",
    "Classification",
    "Description",
    "CompileState",
    "DtypeOption",
    "Encoded",
    "InvalidOption",
    "LoadOptions",
    "Loaded",
    "ModelLoadError",
    "Options",
    "Output",
    "PoolingMode",
    "Task",
    "TaskOption",
    "TextModel",
    "Token",
    "TruncationDirection",
    "UnsupportedModel",
    "cuda_device_count",
    "default_source",
    "disable_progress_bars",
    "graphs_compiled",
    "load",
    "set_threads",
]
