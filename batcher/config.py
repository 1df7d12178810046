"""The engine's frozen configuration, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal, get_args

from batcher.padding import PAD_MULTIPLE

Policy = Literal["adaptive", "window"]
POLICIES: tuple[Policy, ...] = get_args(Policy)
BatchSizing = Literal["learned", "fill"]
BATCH_SIZINGS: tuple[BatchSizing, ...] = get_args(BatchSizing)


@dataclass(frozen=True, slots=True)
class Limit:
    """One batching limit: what it means and the values it may take. `LIMITS` is the one
    definition from which `EngineConfig`'s checks, the server's settings and the admin
    API's schemas are made."""

    description: str
    minimum: float | None = None
    maximum: float | None = None
    nullable: bool = False
    choices: tuple[str, ...] = ()


LIMITS: dict[str, Limit] = {
    "max_batch_size": Limit("Most items in one forward pass.", minimum=1),
    "max_wait_ms": Limit("Longest a batch waits to leave while a device can take it.", minimum=0),
    "max_batch_tokens": Limit(
        "Cap on padded tokens (items x length) in one batch; null: no cap.",
        minimum=PAD_MULTIPLE,  # no padded item is shorter
        nullable=True,
    ),
    "max_queue_size": Limit("Waiting items before 429s.", minimum=1),
    "policy": Limit(
        "adaptive: dispatch at once when the device is idle, gather while busy; window: "
        "always wait up to max-wait-ms for a full batch.",
        choices=POLICIES,
    ),
    "batch_sizing": Limit(
        "learned: size each batch for the most items/s under the device cost learned from "
        "past batches (tight batches on a CPU, full ones on a GPU); fill: as many items as "
        "the limits allow.",
        choices=BATCH_SIZINGS,
    ),
    "max_overtakes": Limit(
        "A hard bound on how many batches may leave with a younger item while a queued "
        "one waits; after that nothing younger leaves before it (0: first in, first "
        "out). null (the default): no count, the response ratio alone orders the queue.",
        minimum=0,
        nullable=True,
    ),
    "min_batch_gain": Limit(
        "learned sizing, while short work waits behind long inputs: a bigger batch is "
        "chosen over a smaller one only if it saves at least this fraction of each "
        "item's device time (as the learned cost predicts it); where it buys less, the "
        "smaller batch goes and the short work behind it sooner. 0: the most items/s.",
        minimum=0,
        maximum=1,
    ),
    "slo_p99_ms": Limit(
        "Latency target: the engine moves max_batch_size and max_wait_ms between their "
        "configured values and batches of one with no wait, to keep the p99 of queue plus "
        "device time under it while serving the most; null: off.",
        minimum=0.1,
        nullable=True,
    ),
}


def check_limit(name: str, value: object) -> None:
    """Raise ValueError, showing the bad value, unless `value` suits limit `name`."""
    limit = LIMITS[name]
    if value is None:
        if not limit.nullable:
            raise ValueError(f"{name} must not be null")
        return
    if limit.choices and value not in limit.choices:
        raise ValueError(f"{name} must be one of {', '.join(limit.choices)}, got {value!r}")
    if limit.minimum is not None and not (
        isinstance(value, int | float) and value >= limit.minimum
    ):
        # `not >=` also rejects NaN.
        nullable = " or null" if limit.nullable else ""
        raise ValueError(f"{name} must be >= {limit.minimum:g}{nullable}, got {value}")
    if limit.maximum is not None and not (
        isinstance(value, int | float) and value <= limit.maximum
    ):
        raise ValueError(f"{name} must be <= {limit.maximum:g}, got {value}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Batching limits. Replace it through `Engine.reconfigure`; never mutate it.

    - `max_batch_size`: most items in one forward pass.
    - `max_wait_ms`: longest a batch waits to be dispatched while a device can take it
      (which items it holds is `batcher.policy.select_batch`'s choice).
    - `max_batch_tokens`: optional cap on padded tokens (items x padded length) per batch.
    - `max_queue_size`: most items waiting; `submit` raises `QueueFull` beyond it.
    - `policy`: `adaptive` dispatches at once when the device is idle and gathers while it
      is busy; `window` always waits up to `max_wait_ms` for a full batch.
    - `batch_sizing`: `fill` takes as many items as the limits allow; `learned` sizes each
      batch for the most items per second under the device's learned cost (see
      `batcher.cost`), which on a CPU means tight batches of similar lengths.
    - `max_overtakes`: how many batches may leave with younger items before a queued
      one; then it and every older item go first (None: no count; batches form around
      the item with the highest response ratio, see `batcher.policy.select_batch`).
    - `min_batch_gain`: with `learned` sizing, while short work flows behind long inputs,
      the fraction of per-item device time a bigger batch must save to be chosen over a
      smaller one.
    - `slo_p99_ms`: a p99 latency target held by `batcher.slo` within `max_batch_size` and
      `max_wait_ms`; None: off.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 50.0
    max_batch_tokens: int | None = None
    max_queue_size: int = 1024
    policy: Policy = "adaptive"
    batch_sizing: BatchSizing = "learned"
    max_overtakes: int | None = None
    min_batch_gain: float = 0.05
    slo_p99_ms: float | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            check_limit(field.name, getattr(self, field.name))

    @classmethod
    def defaults(cls) -> dict[str, object]:
        """Each limit's default, by name."""
        return {f.name: f.default for f in fields(cls)}

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    def replace(self, **changes: object) -> EngineConfig:
        """A validated copy with `changes` applied."""
        return replace(self, **changes)  # type: ignore[arg-type]
