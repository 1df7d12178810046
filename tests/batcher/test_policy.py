"""The batch former as a pure function: plain numbers in, decisions out."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.config import EngineConfig
from batcher.cost import LinearCost
from batcher.items import PendingItem
from batcher.metrics import EngineMetrics
from batcher.padding import bucket_length, padded_tokens
from batcher.policy import WAIT_FOR_EVENT, Dispatch, Wait, batch_limits, decide, select_batch
from batcher.queue import PendingQueue


@dataclass(frozen=True)
class Q:
    enqueued_at: float
    cost: int = 8
    overtaken: int = 0


def queue(*costs: int, start: float = 0.0) -> list[Q]:
    return [Q(start + i * 0.001, c) for i, c in enumerate(costs)]


ADAPTIVE = EngineConfig(max_batch_size=4, max_wait_ms=50, policy="adaptive")
WINDOW = EngineConfig(max_batch_size=4, max_wait_ms=50, policy="window")


def test_empty_queue_waits_for_an_event() -> None:
    assert decide([], 0.0, ADAPTIVE, in_flight=0) == WAIT_FOR_EVENT


def test_adaptive_dispatches_at_once_when_the_device_is_idle() -> None:
    assert decide([Q(0.0)], 0.0, ADAPTIVE, in_flight=0) == Dispatch("idle")


def test_adaptive_gathers_while_the_device_is_busy_until_the_oldest_is_due() -> None:
    assert decide([Q(0.0)], 0.01, ADAPTIVE, in_flight=1) == Wait(0.05)
    assert decide([Q(0.0)], 0.05, ADAPTIVE, in_flight=1) == Dispatch("window")


def test_window_waits_for_the_window_even_when_the_device_is_idle() -> None:
    assert decide([Q(1.0)], 1.0, WINDOW, in_flight=0) == Wait(1.05)
    assert decide([Q(1.0)], 1.048, WINDOW, in_flight=0) == Wait(1.05)
    assert decide([Q(1.0)], 1.05, WINDOW, in_flight=0) == Dispatch("window")


@pytest.mark.parametrize("config", [ADAPTIVE, WINDOW])
def test_a_full_batch_goes_at_once(config: EngineConfig) -> None:
    assert decide(queue(8, 8, 8, 8), 0.0, config, in_flight=1) == Dispatch("full")


@pytest.mark.parametrize("config", [ADAPTIVE, WINDOW])
def test_never_more_than_one_batch_waits_behind_the_running_one(config: EngineConfig) -> None:
    assert decide(queue(8, 8, 8, 8), 9.0, config, in_flight=2) == WAIT_FOR_EVENT


def test_a_token_budget_makes_a_batch_full_early() -> None:
    config = EngineConfig(max_batch_size=32, max_wait_ms=50, max_batch_tokens=64, policy="window")
    assert decide(queue(32), 0.0, config, in_flight=0) == Wait(0.05)
    assert decide(queue(32, 32), 0.0, config, in_flight=0) == Dispatch("tokens")


def test_without_a_learned_cost_selection_groups_similar_lengths_around_the_oldest() -> None:
    pending = queue(100, 8, 200, 96, 7, 104, 9, 100)
    chosen = select_batch(pending, ADAPTIVE, now=0.010)
    assert sorted(pending[i].cost for i in chosen) == [96, 100, 100, 104]
    assert 0 in chosen


def test_with_a_learned_cost_the_batch_forms_around_the_highest_response_ratio() -> None:
    """Ratio = (wait + own device time) / own device time: at 10 ms, the 8-token item
    queued at 1 ms leads ((9 + 11.2) / 11.2), not the 100-token one queued at 0."""
    pending = queue(100, 8, 200, 96, 7, 104, 9, 8, 100)
    chosen = select_batch(pending, ADAPTIVE, CPU_LIKE, now=0.010)
    assert sorted(pending[i].cost for i in chosen) == [7, 8, 8]
    assert 1 in chosen
    assert 0 in select_batch(pending, ADAPTIVE, CPU_LIKE), "no clock: the oldest leads"
    assert 0 in select_batch(pending, ADAPTIVE, now=0.010), "no cost learned: the oldest"


def test_short_items_go_before_older_long_ones_until_those_have_waited_long_enough() -> None:
    long_then_short = [Q(0.000, 256), Q(0.001, 256), Q(0.002, 12), Q(0.003, 10)]
    assert select_batch(long_then_short, ADAPTIVE, CPU_LIKE, now=0.010) == [2, 3]
    # The long item's 0.5 s is 4.5 times its own 110 ms; the short one's 10 ms, 0.7 times.
    aged = [Q(0.000, 256), Q(0.490, 12)]
    assert select_batch(aged, ADAPTIVE, CPU_LIKE, now=0.500) == [0]


def test_due_items_go_first_whatever_their_ratio() -> None:
    bounded = ADAPTIVE.replace(max_overtakes=4)
    due = [Q(0.000, 256, overtaken=4), Q(0.001, 256), Q(0.002, 12), Q(0.003, 10)]
    assert 0 in select_batch(due, bounded, CPU_LIKE, now=0.010)


def test_selection_prefers_older_items_among_equal_lengths() -> None:
    pending = queue(8, 8, 8, 8, 8, 8)
    assert select_batch(pending, ADAPTIVE) == [0, 1, 2, 3]


def test_selection_keeps_the_token_budget() -> None:
    config = EngineConfig(max_batch_size=32, max_batch_tokens=100)
    pending = queue(40, 40, 40, 40)
    chosen = select_batch(pending, config)
    assert chosen == [0, 1]  # 2 x 40 padded to 40 = 80 <= 100; 3 x 40 = 120 > 100


@given(
    costs=st.lists(st.integers(1, 300), min_size=1, max_size=80),
    max_batch_size=st.integers(1, 40),
    budget=st.one_of(st.none(), st.integers(304, 4000)),
)
def test_selection_invariants(costs: list[int], max_batch_size: int, budget: int | None) -> None:
    config = EngineConfig(max_batch_size=max_batch_size, max_batch_tokens=budget)
    pending = queue(*costs)
    chosen = select_batch(pending, config)
    assert 0 in chosen, "no cost learned: the oldest item always goes"
    assert len(chosen) == len(set(chosen))
    assert 1 <= len(chosen) <= max_batch_size
    if budget is None:
        assert len(chosen) == min(max_batch_size, len(costs)), "batches are as full as possible"
    else:
        assert padded_tokens(pending[i].cost for i in chosen) <= budget


def test_bucket_length_rounds_up_to_multiples_of_eight_within_a_cap() -> None:
    assert [bucket_length(n) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]
    assert bucket_length(250, cap=256) == 256
    assert bucket_length(253, cap=254) == 254


CPU_LIKE = LinearCost(overhead_s=0.008, per_token_s=0.0004)  # padding is expensive
GPU_LIKE = LinearCost(overhead_s=0.010, per_token_s=0.000001)  # a batch is almost free


def test_a_learned_cpu_cost_picks_a_tight_batch_over_a_full_padded_one() -> None:
    config = EngineConfig(max_batch_size=32, min_batch_gain=0)
    pending = queue(12, *([12] * 7), *range(20, 120, 4))  # 8 short items, 25 spread out
    chosen = select_batch(pending, config, CPU_LIKE)
    assert sorted(pending[i].cost for i in chosen) == [12] * 8
    assert len(select_batch(pending, config, GPU_LIKE)) == 32
    assert len(select_batch(pending, config)) == 32, "without a learned cost: fill"


def test_fill_sizing_ignores_the_learned_cost() -> None:
    config = EngineConfig(max_batch_size=32, batch_sizing="fill")
    pending = queue(12, *([12] * 7), *range(20, 120, 4))
    assert len(select_batch(pending, config, CPU_LIKE)) == 32


@given(
    costs=st.lists(st.integers(1, 300), min_size=1, max_size=60),
    max_batch_size=st.integers(1, 40),
    budget=st.one_of(st.none(), st.integers(304, 4000)),
    overhead=st.floats(0, 0.05),
    per_token=st.floats(0, 0.001),
    wait=st.floats(0, 2),
)
def test_learned_selection_keeps_the_invariants(
    costs: list[int],
    max_batch_size: int,
    budget: int | None,
    overhead: float,
    per_token: float,
    wait: float,
) -> None:
    config = EngineConfig(max_batch_size=max_batch_size, max_batch_tokens=budget)
    pending = queue(*costs)
    cost = LinearCost(overhead, per_token)
    now = len(costs) * 0.001 + wait
    chosen = select_batch(pending, config, cost, now)

    def ratio(item: Q) -> float:
        own = cost.seconds(bucket_length(item.cost))
        return (now - item.enqueued_at + own) / own if own > 0 else 0.0

    leader = 0 if cost.seconds(8) <= 0 else max(range(len(costs)), key=lambda i: ratio(pending[i]))
    assert leader in chosen, "the highest response ratio (ties: the oldest) always goes"
    assert 1 <= len(chosen) <= max_batch_size
    if budget is not None:
        assert padded_tokens(pending[i].cost for i in chosen) <= budget


def test_a_full_queue_says_full_even_when_the_window_is_also_due() -> None:
    assert decide(queue(8, 8, 8, 8), 9.0, WINDOW, in_flight=0) == Dispatch("full")


def test_without_preparing_ahead_nothing_waits_behind_a_busy_device() -> None:
    """Where batches are not prepared while the device computes (a CPU), the next batch
    is chosen when the device frees: not when the window is due, nor when it is full."""
    for config in (ADAPTIVE, WINDOW):
        assert decide(queue(8, 8, 8, 8), 9.0, config, 1, ahead=False) == WAIT_FOR_EVENT
        assert decide(queue(8, 8, 8, 8), 9.0, config, 0, ahead=False) == Dispatch("full")
    assert decide([Q(0.0)], 0.0, ADAPTIVE, 1, devices=2, ahead=False) == Dispatch("idle")
    assert decide([Q(0.0)], 0.0, ADAPTIVE, 2, devices=2, ahead=False) == WAIT_FOR_EVENT


def test_one_stray_short_input_does_not_cut_batches_of_long_ones() -> None:
    """`PendingQueue.recent_short`: the length a tenth of the last admissions are at most,
    over the last 10 s; one short input among 256 long ones does not count."""
    loop = asyncio.new_event_loop()
    try:
        pending: PendingQueue[int, int] = PendingQueue(EngineMetrics())

        def admit(at: float, *lengths: int) -> None:
            pending.extend(PendingItem(0, loop.create_future(), at, None, n) for n in lengths)

        admit(0.0, 12, *([256] * 255))
        assert pending.recent_short(1.0) == 256
        admit(1.0, *([12] * 30))  # now more than a tenth of the last 256 are short
        assert pending.recent_short(1.0) == 12
        assert pending.recent_short(10.5) == 12, "the 30 short ones are recent"
        assert pending.recent_short(11.5) is None, "nothing admitted in the last 10 s"
    finally:
        loop.close()


def test_with_several_devices_adaptive_dispatches_while_any_is_idle() -> None:
    assert decide([Q(0.0)], 0.0, ADAPTIVE, in_flight=1, devices=2) == Dispatch("idle")
    assert decide([Q(0.0)], 0.0, ADAPTIVE, in_flight=2, devices=2) == Wait(0.05)
    assert decide([Q(0.0)], 0.05, ADAPTIVE, in_flight=2, devices=2) == Dispatch(
        "window"
    )  # one staged
    assert decide([Q(0.0)], 9.0, ADAPTIVE, in_flight=3, devices=2) == WAIT_FOR_EVENT


def test_draining_dispatches_without_waiting_for_the_window_while_a_device_can_take_it() -> None:
    pending = queue(5)
    assert decide(pending, 0.0, WINDOW, in_flight=0) == Wait(0.05)
    assert decide(pending, 0.0, WINDOW, in_flight=0, draining=True) == Dispatch("drain")
    assert decide(pending, 0.0, WINDOW, in_flight=2, draining=True) == WAIT_FOR_EVENT
    assert decide([], 0.0, WINDOW, in_flight=0, draining=True) == WAIT_FOR_EVENT


def test_the_memory_cap_lowers_the_token_budget_never_raises_it() -> None:
    assert batch_limits(ADAPTIVE, None) is ADAPTIVE
    assert batch_limits(ADAPTIVE, 64).max_batch_tokens == 64
    capped = EngineConfig(max_batch_tokens=32)
    assert batch_limits(capped, 64) is capped
    assert batch_limits(EngineConfig(max_batch_tokens=128), 64).max_batch_tokens == 64


# -- the overtaking bound: the real queue counts, the batches are checked from outside --


def run_queue(
    arrivals: list[list[int]], config: EngineConfig, cost: LinearCost | None
) -> list[list[int]]:
    """Items of `arrivals[k]` (their lengths) join a real `PendingQueue` before its k-th
    batch is taken, then the queue drains. Returns each batch's item numbers (the order
    of arrival)."""
    loop = asyncio.new_event_loop()
    try:
        pending: PendingQueue[int, int] = PendingQueue(EngineMetrics())
        batches: list[list[int]] = []
        number = 0
        for step, lengths in enumerate(arrivals):
            items = [
                PendingItem(number + k, loop.create_future(), float(step), None, length)
                for k, length in enumerate(lengths)
            ]
            number += len(items)
            pending.extend(items)
            if len(pending):
                batches.append([item.payload for item in pending.take(step, config, cost)])
        while len(pending):
            batches.append([item.payload for item in pending.take(len(arrivals), config, cost)])
        return batches
    finally:
        loop.close()


def overtakes(batches: list[list[int]]) -> dict[int, int]:
    """For each item: the batches that left before its own holding a younger item."""
    went = {item: b for b, batch in enumerate(batches) for item in batch}
    return {
        item: sum(1 for earlier in batches[:b] if max(earlier) > item) for item, b in went.items()
    }


def adversarial(old: int) -> list[list[int]]:
    """`old` items of distinct lengths, then a long one, then before every batch a copy of
    each old length: each old item's best partners are young, so without a bound every
    batch that takes an old item also passes the long one over."""
    lengths = [8 * (k + 1) for k in range(old)]
    return [[*lengths, 256], *([lengths] * old)]


@pytest.mark.parametrize("bound", [0, 1, 2])
def test_no_item_is_overtaken_more_than_max_overtakes_times(bound: int) -> None:
    config = EngineConfig(max_batch_size=4, max_overtakes=bound)
    batches = run_queue(adversarial(12), config, CPU_LIKE)
    assert sorted(i for b in batches for i in b) == list(range(12 * 13 + 1)), "all served once"
    assert max(overtakes(batches).values()) <= bound
    assert overtakes(batches)[12] == bound, "the long item is passed over as often as allowed"


def test_without_a_bound_the_long_item_is_passed_over_by_almost_every_batch() -> None:
    config = EngineConfig(max_batch_size=4, max_overtakes=None)
    batches = run_queue(adversarial(12), config, CPU_LIKE)
    assert overtakes(batches)[12] >= 8, "passed over by most of the 12 older items' batches"


@given(
    arrivals=st.lists(st.lists(st.integers(1, 300), max_size=12), min_size=1, max_size=30),
    max_batch_size=st.integers(1, 16),
    budget=st.one_of(st.none(), st.integers(304, 3000)),
    bound=st.integers(0, 3),
    learned=st.sampled_from([None, CPU_LIKE, GPU_LIKE]),
)
def test_the_overtaking_bound_holds_for_any_lengths_and_limits(
    arrivals: list[list[int]],
    max_batch_size: int,
    budget: int | None,
    bound: int,
    learned: LinearCost | None,
) -> None:
    config = EngineConfig(
        max_batch_size=max_batch_size, max_batch_tokens=budget, max_overtakes=bound
    )
    batches = run_queue(arrivals, config, learned)
    assert sorted(i for b in batches for i in b) == list(range(sum(map(len, arrivals))))
    assert all(1 <= len(b) <= max_batch_size for b in batches)
    assert all(overtaken <= bound for overtaken in overtakes(batches).values())


# -- the batch size follows the learned cost curve -------------------------------------

LONG_ON_A_CPU = LinearCost(overhead_s=0.001, per_token_s=0.0002)  # a batch buys ~2 %
SOME_GAIN = LinearCost(overhead_s=0.005, per_token_s=0.0002)  # batch 32 saves ~9 %


def per_item_s(cost: LinearCost, size: int, length: int) -> float:
    return cost.seconds(size * bucket_length(length)) / size


def test_long_inputs_where_a_batch_buys_little_go_one_at_a_time_while_short_work_flows() -> None:
    chunks = queue(*([256] * 32))
    latency = EngineConfig(max_batch_size=32, min_batch_gain=0.03)
    assert len(select_batch(chunks, latency, LONG_ON_A_CPU)) == 32, "alike: reordering buys nothing"
    assert len(select_batch(chunks, latency, LONG_ON_A_CPU, recent_short=12)) == 1
    assert len(select_batch(queue(*([256] * 32), 12), latency, LONG_ON_A_CPU)) == 1, "queued"
    most_items = EngineConfig(max_batch_size=32, min_batch_gain=0)
    assert len(select_batch(chunks, most_items, LONG_ON_A_CPU, recent_short=12)) == 32
    assert len(select_batch(chunks, latency, GPU_LIKE, recent_short=12)) == 32


@pytest.mark.parametrize("gain", [0.01, 0.03, 0.05, 0.08])
def test_the_smallest_batch_within_min_batch_gain_of_the_best_goes(gain: float) -> None:
    pending = queue(*([256] * 32))
    config = EngineConfig(max_batch_size=32, min_batch_gain=gain)
    size = len(select_batch(pending, config, SOME_GAIN, recent_short=8))
    best = per_item_s(SOME_GAIN, 32, 256)
    assert per_item_s(SOME_GAIN, size, 256) <= (1 + gain) * best
    assert size == 1 or per_item_s(SOME_GAIN, size - 1, 256) > (1 + gain) * best


@given(
    costs=st.lists(st.integers(1, 300), min_size=1, max_size=40),
    overhead=st.floats(0, 0.05),
    per_token=st.floats(0, 0.001),
    gains=st.lists(st.floats(0, 1), min_size=2, max_size=2).map(sorted),
)
def test_a_larger_min_batch_gain_never_makes_batches_bigger(
    costs: list[int], overhead: float, per_token: float, gains: list[float]
) -> None:
    pending = queue(*costs)
    cost = LinearCost(overhead, per_token)
    low, high = (EngineConfig(max_batch_size=32, min_batch_gain=g) for g in gains)
    assert len(select_batch(pending, high, cost)) <= len(select_batch(pending, low, cost))


def test_without_min_batch_gain_equal_costs_keep_the_larger_batch() -> None:
    """No overhead learned and no padding: every size costs each item the same, and the
    most items per second means the full batch."""
    pending = queue(*([64] * 16))
    free = LinearCost(overhead_s=0.0, per_token_s=0.0002)
    most_items = EngineConfig(max_batch_size=16, min_batch_gain=0)
    assert len(select_batch(pending, most_items, free)) == 16
