"""microbatch's engine: dynamic micro-batching for any asyncio program.

Importing it loads neither an HTTP framework nor torch; the torch model adapters live in
`batcher.models` and are imported on their own.
"""

from batcher.config import (
    BATCH_SIZINGS,
    LIMITS,
    POLICIES,
    BatchSizing,
    EngineConfig,
    Limit,
    Policy,
    check_limit,
)
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
from batcher.fairness import Owner
from batcher.items import LANES, Lane, Result
from batcher.metrics import OUTCOMES, SECONDS_BUCKETS, EngineMetrics, Totals
from batcher.policy import DISPATCH_REASONS, DispatchReason
from batcher.remote import EngineServer, RemoteEngine, socket_dir
from batcher.runner import Model, Runner, ThreadRunner
from batcher.sharing import DeviceScheduler, DeviceShare
from batcher.slo import SloConfig, SloController
from batcher.stats import EngineStats, ReplicaStats, State

__all__ = [
    "BATCH_SIZINGS",
    "DISPATCH_REASONS",
    "LANES",
    "LIMITS",
    "OUTCOMES",
    "POLICIES",
    "SECONDS_BUCKETS",
    "BatchSizing",
    "DeadlineExceeded",
    "DeadlineUnreachable",
    "DeviceOutOfMemory",
    "DeviceScheduler",
    "DeviceShare",
    "DispatchReason",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineError",
    "EngineMetrics",
    "EngineServer",
    "EngineStats",
    "InferenceFailed",
    "Lane",
    "Limit",
    "ItemTooLarge",
    "Model",
    "Owner",
    "Policy",
    "QueueFull",
    "RemoteEngine",
    "ReplicaStats",
    "SloConfig",
    "SloController",
    "Result",
    "Runner",
    "State",
    "ThreadRunner",
    "Totals",
    "check_limit",
    "socket_dir",
]
