"""The device cost fit."""

from __future__ import annotations

import random

import pytest

from batcher.cost import CostModel, LinearCost


def test_the_fit_recovers_overhead_and_per_token_cost_from_noisy_batches() -> None:
    true = LinearCost(overhead_s=0.008, per_token_s=0.0003)
    rng = random.Random(0)
    model = CostModel()
    for _ in range(200):
        tokens = rng.randint(8, 2000)
        model.observe(tokens, true.seconds(tokens) * rng.uniform(0.95, 1.05))
    fit = model.estimate()
    assert fit is not None
    assert fit.overhead_s == pytest.approx(0.008, rel=0.25)
    assert fit.per_token_s == pytest.approx(0.0003, rel=0.05)


def test_no_estimate_until_enough_batches_of_different_sizes() -> None:
    model = CostModel(min_batches=4)
    for _ in range(10):
        model.observe(64, 0.02)  # every batch the same size: the slope is unknowable
    assert model.estimate() is None
    fresh = CostModel(min_batches=4)
    fresh.observe(8, 0.01)
    fresh.observe(64, 0.03)
    assert fresh.estimate() is None, "too few batches"


def test_the_fit_follows_a_change_of_device_speed() -> None:
    model = CostModel()
    for i in range(300):
        model.observe(100 + i % 50 * 10, 0.001 + 0.0001 * (100 + i % 50 * 10))
    for i in range(500):
        model.observe(100 + i % 50 * 10, 0.001 + 0.0004 * (100 + i % 50 * 10))
    fit = model.estimate()
    assert fit is not None
    assert fit.per_token_s == pytest.approx(0.0004, rel=0.05)
