"""Batch formation: a pure function of (queue, now, limits, device state).

No asyncio and no clock here: the engine passes `now` in, so tests drive it with plain
numbers. Invariants, for every batch `select_batch` returns:

1. it holds the item with the highest response ratio, (wait + own device time) / own
   device time under the learned cost, or the oldest while none is learned (no
   starvation: a waiting item's ratio grows without limit, a newcomer's starts at 1);
   with `max_overtakes` set, the items overtaken that often go first;
2. it holds at most `max_batch_size` items;
3. with `max_batch_tokens` set, its padded tokens (items x bucketed longest length) stay
   within the budget; an item that is over the budget on its own never reaches the queue
   (the engine refuses it at submit);
4. among the other items, those whose lengths are close to each other go together, so a
   batch pays little padding; ties go to the older item;
5. with a learned device cost, the batch size is the cheapest: the one whose items pay
   the least beyond their own tokens (their share of the batch overhead plus the padding
   they cause); while short work flows behind it, the smallest whose items each pay at
   most `min_batch_gain` of their device time more and whose own work outweighs the
   overhead of the extra batch it leaves behind; without a learned cost, batches are as
   full as the limits allow.

And `decide` dispatches only when a device can take a batch: at most one runs on each
device (replica), and one more waits ready behind them where it is prepared meanwhile
(`max_in_flight`); elsewhere the next batch is chosen when a device frees. While the engine
drains, nothing waits for a window: every queued item goes as soon as a device can take
it. `batch_limits` merges the memory cap learned from out-of-memory errors into the token
budget of the next batch.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal, Protocol, get_args

from batcher.config import EngineConfig
from batcher.cost import LinearCost
from batcher.padding import bucket_length


def max_in_flight(devices: int, ahead: bool = True) -> int:
    """Batches handed out at once: one computing per device and, where batches are
    prepared ahead (`ahead`: padded on the host while the device computes), one more
    behind them. Elsewhere a batch handed out early gains nothing and is chosen before
    the items that arrive while the device is busy could be weighed."""
    return devices + 1 if ahead else devices


TIMER_SLACK_S = 0.001
"""Loop timers may fire up to their resolution early (uvloop rounds to milliseconds); an
item this close to its due time counts as due, so a wake-up for it never spins."""


class Queued(Protocol):
    """What the policy reads of a queued item."""

    @property
    def enqueued_at(self) -> float: ...

    @property
    def cost(self) -> int: ...

    @property
    def overtaken(self) -> int:
        """Batches that left with a younger item while this one stayed queued."""
        ...


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
    ahead: bool = True,
    draining: bool = False,
) -> Decision:
    """Whether to form a batch from `pending` (oldest first) now, or how long to wait.

    `in_flight` counts batches handed to the devices and not yet finished; `devices` is
    how many replicas compute side by side; `ahead`: batches that wait for a device are
    prepared meanwhile (see `max_in_flight`); `draining`: the engine is shutting down and
    admits nothing more, so no window is worth waiting for.
    """
    if not pending or in_flight >= max_in_flight(devices, ahead):
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
    pending: Sequence[Queued],
    config: EngineConfig,
    cost: LinearCost | None = None,
    now: float | None = None,
    recent_short: int | None = None,
) -> list[int]:
    """Indices into `pending` (oldest first) of the items of the next batch.

    The batch forms around one item, the anchor: with a learned `cost` (and `now`), the
    item with the highest response ratio, (its wait + its own device time) / its own
    device time, ties to the older; else the oldest. A query that costs a tenth of a chunk
    so goes before a chunk that has waited less than ten times as long, and no item
    starves: its ratio grows with its wait, a newcomer's starts at 1.

    With `max_overtakes` set, items overtaken that many times (see `Queued.overtaken`)
    are due; they are always a prefix of `pending`, since a batch that overtakes an item
    overtakes every older one it leaves. While some are due, a batch is either a prefix
    of the due items (oldest first, nothing younger) or all of them plus others, and no
    item is overtaken more than `max_overtakes` times.

    The others are chosen by length: sorted, for each size, the run of consecutive lengths
    next to the anchor's (or the due items' longest) that wastes the fewest padded tokens
    within the token budget (ties to the older items). Without `cost` (or with
    `batch_sizing="fill"`) the largest size wins. With it, each size costs each item its
    share of the batch overhead plus the padding it causes (real tokens cost the same in
    any batch): the cheapest size wins, or the smallest whose items each pay at most
    `min_batch_gain` of their device time more and whose own work outweighs the overhead
    of the extra batch it leaves behind, while short work flows: an item queued outside
    the batch, or the length a tenth of the recent admissions are at most
    (`recent_short`, in cost units; see `PendingQueue.recent_short`), would take, alone,
    under `SHORT_WORK` of each batch item's device time. Where all inputs are alike, a
    smaller batch would only reorder them and pay one more overhead. So on a GPU
    (overhead dominates) batches fill up; on a CPU (padding costs as much as work) a long
    item is not padded onto short ones, and long items, for which a batch buys little
    there, go a few at a time.
    """
    if not pending:
        return []
    due = 0
    while due < len(pending) and _due(pending[due], config):
        due += 1
    fill = config.batch_sizing == "fill" or cost is None
    if due == 0:
        anchor = 0 if cost is None or now is None else _highest_ratio(pending, cost, now)
        candidates = _grouped(pending, [anchor], config, largest_only=fill)
    else:
        fit = 0  # the longest prefix that fits; fitting only gets harder as it grows
        longest = 0
        while fit < due:
            longest = max(longest, pending[fit].cost)
            if not _fits(config, fit + 1, longest):
                break
            fit += 1
        # The oldest item alone always fits: submit refuses one over the budget.
        fit = max(fit, 1)
        # Prefixes overtake no one; others may join only when every due item goes.
        sizes = [fit] if fill else range(1, fit + 1)
        candidates = [_candidate(pending, list(range(size))) for size in sizes]
        if fit == due:
            head = list(range(due))
            candidates.extend(_grouped(pending, head, config, largest_only=fill)[1:])
    if fill or cost is None:
        return max(candidates, key=lambda c: (c.size, -c.waste, -c.age)).indices
    best = _cheapest(candidates, cost)
    if config.min_batch_gain > 0 and _short_work_waits(best, pending, cost, recent_short):
        best = _smaller(candidates, best, cost, config.min_batch_gain)
    return best.indices


def _highest_ratio(pending: Sequence[Queued], cost: LinearCost, now: float) -> int:
    """The item whose wait is longest for its own device time (alone in a batch); the
    oldest while nothing is learned to weigh waits by."""
    best, best_ratio = 0, 0.0
    for i, item in enumerate(pending):
        own = cost.seconds(bucket_length(item.cost))
        if own <= 0:
            return 0
        ratio = (now - item.enqueued_at + own) / own
        if ratio > best_ratio:
            best, best_ratio = i, ratio
    return best


@dataclass(frozen=True, slots=True)
class _Candidate:
    indices: list[int]
    waste: int
    """Padded tokens beyond the items' own."""
    real: int
    """The items' own tokens."""
    age: int
    """Sum of the indices: lower is older."""

    @property
    def size(self) -> int:
        return len(self.indices)


def _due(item: Queued, config: EngineConfig) -> bool:
    return config.max_overtakes is not None and item.overtaken >= config.max_overtakes


def _fits(config: EngineConfig, size: int, longest: int) -> bool:
    budget = config.max_batch_tokens
    if size > config.max_batch_size:
        return False
    return budget is None or size * bucket_length(longest) <= budget


def _grouped(
    pending: Sequence[Queued], head: list[int], config: EngineConfig, *, largest_only: bool
) -> list[_Candidate]:
    """The `head` items (which must go, and fit together) alone, then for each size (or
    only the largest that fits) the best batch of them plus others of close length: the
    run of consecutive lengths (sorted) that wastes the fewest padded tokens, ties to the
    older items."""
    head_costs = [pending[i].cost for i in head]
    bucket_required = bucket_length(max(head_costs))
    real_required = sum(head_costs)
    age_required = sum(head)
    taken = set(head)
    # Among equal lengths the older item sits later, where windows reach first.
    order = sorted(
        (i for i in range(len(pending)) if i not in taken), key=lambda i: (pending[i].cost, -i)
    )
    costs = [pending[i].cost for i in order]
    pads = [max(bucket_required, bucket_length(c)) for c in costs]
    cost_sum = list(accumulate(costs, initial=0))
    age_sum = list(accumulate(order, initial=0))
    budget = config.max_batch_tokens
    # Positions below `edge` pad no further than the required items already do.
    edge = bisect_right(costs, bucket_required)
    found = [_candidate(pending, sorted(head))]
    required = len(head)
    extras = range(1, min(config.max_batch_size - required, len(order)) + 1)
    for extra in reversed(extras) if largest_only else extras:
        size = required + extra
        best: tuple[int, int, int] | None = None  # (waste, age, end)
        # Windows order[end - extra : end]. The one ending at the edge beats every window
        # below it (same padding, more real tokens, or the same and older); far above
        # it, every window pads the required items more than one nearer them.
        for end in range(max(extra, edge), min(len(order), edge + extra) + 1):
            padded = size * pads[end - 1]
            if budget is not None and padded > budget:
                break  # longer windows only pad more
            real = real_required + cost_sum[end] - cost_sum[end - extra]
            key = (padded - real, age_required + age_sum[end] - age_sum[end - extra], end)
            if best is None or key < best:
                best = key
        if best is not None:
            waste, age, end = best
            indices = sorted([*head, *order[end - extra : end]])
            found.append(_Candidate(indices, waste, size * pads[end - 1] - waste, age))
            if largest_only:
                break
    return found


def _candidate(pending: Sequence[Queued], indices: list[int]) -> _Candidate:
    costs = [pending[i].cost for i in indices]
    real = sum(costs)
    padded = len(indices) * bucket_length(max(costs))
    return _Candidate(indices, padded - real, real, sum(indices))


SHORT_WORK = 0.5
"""Short work waits behind a batch when an input would take, alone, less than this share
of the device time each item of the batch costs."""


def _avoidable(c: _Candidate, cost: LinearCost) -> float:
    """What each item of `c` pays beyond its own tokens: its share of the overhead and of
    the padding."""
    return (cost.overhead_s + cost.per_token_s * c.waste) / c.size


def _per_item(c: _Candidate, cost: LinearCost) -> float:
    return cost.seconds(c.waste + c.real) / c.size


def _cheapest(candidates: list[_Candidate], cost: LinearCost) -> _Candidate:
    """The candidate whose items each pay the least overhead and padding."""
    return min(candidates, key=lambda c: (_avoidable(c, cost), -c.size, c.age))


def _short_work_waits(
    best: _Candidate, pending: Sequence[Queued], cost: LinearCost, recent_short: int | None
) -> bool:
    limit = SHORT_WORK * _per_item(best, cost)
    if recent_short is not None and cost.seconds(bucket_length(recent_short)) < limit:
        return True
    inside = set(best.indices)
    return any(
        cost.seconds(bucket_length(item.cost)) < limit
        for i, item in enumerate(pending)
        if i not in inside
    )


def _smaller(
    candidates: list[_Candidate], best: _Candidate, cost: LinearCost, min_gain: float
) -> _Candidate:
    """The smallest candidate that costs each of its items at most `min_gain` of their
    device time more than `best` does, and whose own work outweighs the overhead of the
    extra batch it leaves behind (on a GPU a smaller batch finishes little sooner)."""
    allowed = _avoidable(best, cost) + min_gain * _per_item(best, cost)
    within = [
        c
        for c in candidates
        if _avoidable(c, cost) <= allowed
        and cost.overhead_s < cost.per_token_s * (c.waste + c.real)
    ]
    return min([best, *within], key=lambda c: (c.size, _avoidable(c, cost), c.age))
