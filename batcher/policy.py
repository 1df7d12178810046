"""Batch formation: a pure function of (queue, now, limits, device state).

No asyncio and no clock here: the engine passes `now` in, so tests drive it with plain
numbers. Invariants, for every batch `select_batch` returns:

1. the oldest item is in it (no starvation: every item eventually becomes the oldest);
2. it holds at most `max_batch_size` items;
3. with `max_batch_tokens` set, its padded tokens (items x bucketed longest length) stay
   within the budget; an item that is over the budget on its own never reaches the queue
   (the engine refuses it at submit);
4. among the other items, those whose lengths are close to each other go together, so a
   batch pays little padding; ties go to the older item;
5. with a learned device cost, the batch size is the one whose items each pay the least
   beyond their own tokens (their share of the batch overhead, plus the padding they
   cause); without one, batches are as full as the limits allow.

And `decide` dispatches only when a device can take a batch: at most one runs on each
device (replica) and one more waits ready behind them (`max_in_flight`). While the engine
drains, nothing waits for a window: every queued item goes as soon as a device can take
it. `batch_limits` merges the memory cap learned from out-of-memory errors into the token
budget of the next batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal, Protocol, get_args

from batcher.config import EngineConfig
from batcher.cost import LinearCost
from batcher.padding import bucket_length

MAX_IN_FLIGHT = 2
"""Batches handed to one device at once: one computing, one prepared behind it."""


def max_in_flight(devices: int) -> int:
    """Batches handed out at once: one computing per device, one prepared behind them."""
    return devices + MAX_IN_FLIGHT - 1


TIMER_SLACK_S = 0.001
"""Loop timers may fire up to their resolution early (uvloop rounds to milliseconds); an
item this close to its due time counts as due, so a wake-up for it never spins."""


class Queued(Protocol):
    """What the policy reads of a queued item."""

    @property
    def enqueued_at(self) -> float: ...

    @property
    def cost(self) -> int: ...


DispatchReason = Literal["idle", "full", "tokens", "window", "drain"]
"""Why a batch left: a device was `idle` (adaptive), the queue held a batch of
`max_batch_size` (`full`) or of `max_batch_tokens` (`tokens`), the oldest item reached
`max_wait_ms` (`window`), or the engine is shutting down (`drain`)."""

DISPATCH_REASONS: tuple[DispatchReason, ...] = get_args(DispatchReason)


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Form a batch now, for `reason`."""

    reason: DispatchReason


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to dispatch yet. Wake at `until` (engine clock), or on the next event
    (an arrival, a finished batch, a setting change) when `until` is None."""

    until: float | None


Decision = Dispatch | Wait

WAIT_FOR_EVENT = Wait(None)


def fullness(pending: Sequence[Queued], config: EngineConfig) -> DispatchReason | None:
    """`full` or `tokens` when the queue already holds a batch that no arrival could grow
    (by item count, or by padded tokens); None while it could still grow."""
    if len(pending) >= config.max_batch_size:
        return "full"
    if config.max_batch_tokens is None:
        return None
    longest = max(item.cost for item in pending)
    if len(pending) * bucket_length(longest) >= config.max_batch_tokens:
        return "tokens"
    return None


def decide(
    pending: Sequence[Queued],
    now: float,
    config: EngineConfig,
    in_flight: int,
    devices: int = 1,
    *,
    draining: bool = False,
) -> Decision:
    """Whether to form a batch from `pending` (oldest first) now, or how long to wait.

    `in_flight` counts batches handed to the devices and not yet finished; `devices` is
    how many replicas compute side by side; `draining`: the engine is shutting down and
    admits nothing more, so no window is worth waiting for.
    """
    if not pending or in_flight >= max_in_flight(devices):
        return WAIT_FOR_EVENT
    if draining:
        return Dispatch("drain")
    if (full := fullness(pending, config)) is not None:
        return Dispatch(full)
    due_at = pending[0].enqueued_at + config.max_wait_s
    if now >= due_at - TIMER_SLACK_S:
        return Dispatch("window")
    if config.policy == "adaptive" and in_flight < devices:  # a device is idle
        return Dispatch("idle")
    return Wait(due_at)


def batch_limits(config: EngineConfig, memory_cap: int | None) -> EngineConfig:
    """The limits the next batch must keep: the configured ones, with the token budget
    lowered to `memory_cap` (padded tokens that fit the device, learned from
    out-of-memory errors) when that is lower."""
    budget = config.max_batch_tokens
    if memory_cap is None or (budget is not None and budget <= memory_cap):
        return config
    return config.replace(max_batch_tokens=memory_cap)


def select_batch(
    pending: Sequence[Queued], config: EngineConfig, cost: LinearCost | None = None
) -> list[int]:
    """Indices into `pending` (oldest first) of the items of the next batch.

    Sort by length; for each size, take the run of consecutive items that contains the
    oldest and wastes the fewest padded tokens within the token budget. Without `cost`
    (or with `batch_sizing="fill"`) the largest size wins; with it, the size with the
    least overhead-plus-padding time per item. Real tokens cost the same in any batch, so
    that is the part the choice can save: on a GPU (overhead dominates) batches fill up,
    on a CPU (padding costs as much as work) a long oldest item is not padded onto short
    ones that would be cheaper in their own batch.
    """
    if not pending:
        return []
    order = sorted(range(len(pending)), key=lambda i: (pending[i].cost, i))
    costs = [pending[i].cost for i in order]
    anchor = order.index(0)
    cost_sum = list(accumulate(costs, initial=0))
    age_sum = list(accumulate(order, initial=0))  # lower is older

    learned = cost if config.batch_sizing == "learned" else None
    best: tuple[float, int, int] | None = None  # (waste seconds per item, -size, start)
    for size in range(min(config.max_batch_size, len(order)), 0, -1):
        best_start, best_key = -1, (0, 0)
        for start in range(max(0, anchor - size + 1), min(anchor, len(order) - size) + 1):
            end = start + size
            padded = size * bucket_length(costs[end - 1])
            if config.max_batch_tokens is not None and padded > config.max_batch_tokens:
                continue
            key = (padded - (cost_sum[end] - cost_sum[start]), age_sum[end] - age_sum[start])
            if best_start < 0 or key < best_key:
                best_start, best_key = start, key
        if best_start < 0:
            continue
        if learned is None:
            return sorted(order[best_start : best_start + size])
        waste_tokens = best_key[0]
        per_item = (learned.overhead_s + learned.per_token_s * waste_tokens) / size
        if best is None or (per_item, -size) < best[:2]:
            best = (per_item, -size, best_start)
    if best is None:
        # Only reachable when the oldest item alone breaks the budget, which submit refuses.
        raise RuntimeError("the oldest item does not fit max_batch_tokens; this is a bug")
    _, negative_size, start = best
    return sorted(order[start : start + -negative_size])
