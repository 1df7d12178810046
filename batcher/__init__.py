"""microbatch's engine: dynamic micro-batching for any asyncio program.

Importing it loads neither an HTTP framework nor torch; the torch model adapters live in
`batcher.models` and are imported on their own.
"""

from batcher.config import POLICIES, EngineConfig, Policy
from batcher.engine import Engine
from batcher.errors import (
    DeadlineExceeded,
    DeadlineUnreachable,
    DeviceOutOfMemory,
    EngineClosed,
    EngineError,
    InferenceFailed,
    ItemTooLarge,
    QueueFull,
)
from batcher.items import Result
from batcher.metrics import EngineMetrics
from batcher.runner import Model, Runner, ThreadRunner

__all__ = [
    "POLICIES",
    "DeadlineExceeded",
    "DeadlineUnreachable",
    "DeviceOutOfMemory",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineError",
    "EngineMetrics",
    "InferenceFailed",
    "ItemTooLarge",
    "Model",
    "Policy",
    "QueueFull",
    "Result",
    "Runner",
    "ThreadRunner",
]
