"""The engine's frozen configuration, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

Policy = Literal["adaptive", "window"]
POLICIES: tuple[Policy, ...] = get_args(Policy)
BatchSizing = Literal["learned", "fill"]
BATCH_SIZINGS: tuple[BatchSizing, ...] = get_args(BatchSizing)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Batching limits. Replace it through `Engine.reconfigure`; never mutate it.

    - `max_batch_size`: most items in one forward pass.
    - `max_wait_ms`: longest the oldest queued item waits for its batch to be dispatched
      while the device can take work.
    - `max_batch_tokens`: optional cap on padded tokens (items x padded length) per batch.
    - `max_queue_size`: most items waiting; `submit` raises `QueueFull` beyond it.
    - `policy`: `adaptive` dispatches at once when the device is idle and gathers while it
      is busy; `window` always waits up to `max_wait_ms` for a full batch.
    - `batch_sizing`: `fill` takes as many items as the limits allow; `learned` sizes each
      batch for the most items per second under the device's learned cost (see
      `batcher.cost`), which on a CPU means tight batches of similar lengths.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 50.0
    max_batch_tokens: int | None = None
    max_queue_size: int = 1024
    policy: Policy = "adaptive"
    batch_sizing: BatchSizing = "learned"

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not self.max_wait_ms >= 0:  # also rejects NaN
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1 or None, got {self.max_batch_tokens}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.batch_sizing not in BATCH_SIZINGS:
            raise ValueError(
                f"batch_sizing must be one of {', '.join(BATCH_SIZINGS)}, got {self.batch_sizing!r}"
            )

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    def replace(self, **changes: object) -> EngineConfig:
        """A validated copy with `changes` applied."""
        return replace(self, **changes)  # type: ignore[arg-type]
