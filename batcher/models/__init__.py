"""Model adapters: torch and transformers live here, behind `batcher.Model`.

Importing `batcher.models` is cheap: the names that need torch (the adapters, devices,
compiling) are imported when first used, so that what only describes a load (the
settings, `microbatch serve --help`) does not import torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from batcher.models.options import (
    DEFAULT_HUB_ID,
    DEFAULT_MIN_ACCURACY,
    TASKS,
    CollateAhead,
    CompileMode,
    DtypeOption,
    LoadOptions,
    Task,
    TaskOption,
    default_source,
    source_problem,
)

if TYPE_CHECKING:
    from batcher.models.chunking import Chunks, combine
    from batcher.models.compiling import (
        CompileState,
        graphs_compiled,
    )
    from batcher.models.description import (
        POOLING_MODES,
        Description,
        PoolingMode,
        UnsupportedModel,
    )
    from batcher.models.devices import (
        CpuBudget,
        cpu_budget,
        cuda_device_count,
        default_threads,
        device_problem,
        set_threads,
    )
    from batcher.models.encoder import (
        Encoder,
        EncoderSpec,
        TextEncoder,
        Token,
        TruncationDirection,
    )
    from batcher.models.errors import (
        ModelLoadError,
    )
    from batcher.models.images import BadImage, ImageLimits, prefix_problem
    from batcher.models.inputs import (
        DEFAULT_OPTIONS,
        Encoded,
        InvalidOption,
        Options,
    )
    from batcher.models.loading import (
        Loaded,
        disable_progress_bars,
        load,
    )
    from batcher.models.memory import (
        GpuMemoryCollector,
        cuda_devices,
        give_back_memory,
        memory_in_use,
    )
    from batcher.models.outputs import (
        Classification,
        Output,
        SparseVector,
        TokenVectors,
    )
    from batcher.models.pixels import ImageEncoder, Pixels
    from batcher.models.quantize import (
        EMBEDDING_TYPES,
        Calibration,
        EmbeddingType,
        finish,
        quantize_as,
    )
    from batcher.models.sizing import (
        Footprint,
        GiB,
        device_memory,
        footprint,
        free_memory,
    )
    from batcher.models.static_sparse import StaticSparse
    from batcher.models.text import (
        TextModel,
    )
    from batcher.models.vision import VisionModel, load_model

_LAZY = {
    "CompileState": "batcher.models.compiling",
    "graphs_compiled": "batcher.models.compiling",
    "Description": "batcher.models.description",
    "POOLING_MODES": "batcher.models.description",
    "PoolingMode": "batcher.models.description",
    "UnsupportedModel": "batcher.models.description",
    "cuda_device_count": "batcher.models.devices",
    "device_problem": "batcher.models.devices",
    "set_threads": "batcher.models.devices",
    "CpuBudget": "batcher.models.devices",
    "cpu_budget": "batcher.models.devices",
    "default_threads": "batcher.models.devices",
    "ModelLoadError": "batcher.models.errors",
    "GpuMemoryCollector": "batcher.models.memory",
    "Footprint": "batcher.models.sizing",
    "GiB": "batcher.models.sizing",
    "device_memory": "batcher.models.sizing",
    "footprint": "batcher.models.sizing",
    "free_memory": "batcher.models.sizing",
    "resolve_device": "batcher.models.sizing",
    "cuda_devices": "batcher.models.memory",
    "give_back_memory": "batcher.models.memory",
    "memory_in_use": "batcher.models.memory",
    "Loaded": "batcher.models.loading",
    "disable_progress_bars": "batcher.models.loading",
    "load": "batcher.models.loading",
    "Classification": "batcher.models.outputs",
    "DEFAULT_OPTIONS": "batcher.models.inputs",
    "Encoded": "batcher.models.inputs",
    "InvalidOption": "batcher.models.inputs",
    "Options": "batcher.models.inputs",
    "Output": "batcher.models.outputs",
    "TextModel": "batcher.models.text",
    "BadImage": "batcher.models.images",
    "ImageLimits": "batcher.models.images",
    "prefix_problem": "batcher.models.images",
    "ImageEncoder": "batcher.models.pixels",
    "Pixels": "batcher.models.pixels",
    "VisionModel": "batcher.models.vision",
    "load_model": "batcher.models.vision",
    "EMBEDDING_TYPES": "batcher.models.quantize",
    "Calibration": "batcher.models.quantize",
    "Chunks": "batcher.models.chunking",
    "StaticSparse": "batcher.models.static_sparse",
    "combine": "batcher.models.chunking",
    "finish": "batcher.models.quantize",
    "EmbeddingType": "batcher.models.quantize",
    "quantize_as": "batcher.models.quantize",
    "Encoder": "batcher.models.encoder",
    "EncoderSpec": "batcher.models.encoder",
    "TextEncoder": "batcher.models.encoder",
    "Token": "batcher.models.encoder",
    "TokenVectors": "batcher.models.outputs",
    "SparseVector": "batcher.models.outputs",
    "TruncationDirection": "batcher.models.encoder",
    "unpack_output": "batcher.models.wire",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "EMBEDDING_TYPES",
    "Calibration",
    "Chunks",
    "StaticSparse",
    "combine",
    "finish",
    "EmbeddingType",
    "quantize_as",
    "DEFAULT_HUB_ID",
    "DEFAULT_MIN_ACCURACY",
    "DEFAULT_OPTIONS",
    "POOLING_MODES",
    "TASKS",
    "Classification",
    "CollateAhead",
    "CompileMode",
    "CompileState",
    "CpuBudget",
    "Description",
    "DtypeOption",
    "Encoded",
    "Encoder",
    "EncoderSpec",
    "Footprint",
    "GiB",
    "GpuMemoryCollector",
    "give_back_memory",
    "memory_in_use",
    "InvalidOption",
    "LoadOptions",
    "Loaded",
    "ModelLoadError",
    "Options",
    "Output",
    "PoolingMode",
    "Task",
    "TaskOption",
    "TextEncoder",
    "TextModel",
    "BadImage",
    "ImageLimits",
    "prefix_problem",
    "ImageEncoder",
    "Pixels",
    "VisionModel",
    "load_model",
    "Token",
    "TokenVectors",
    "SparseVector",
    "TruncationDirection",
    "UnsupportedModel",
    "cpu_budget",
    "cuda_device_count",
    "cuda_devices",
    "default_source",
    "default_threads",
    "device_memory",
    "device_problem",
    "disable_progress_bars",
    "footprint",
    "free_memory",
    "resolve_device",
    "graphs_compiled",
    "load",
    "set_threads",
    "source_problem",
    "unpack_output",
]
