"""The CPUs a process may use: its affinity mask, capped by a cgroup CPU quota, which a
container's `--cpus` sets and the affinity mask does not show."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batcher.models.devices import CpuBudget, cpu_budget, default_threads


def affinity() -> int:
    return len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, no limit
        ({"cpu.max": "150000 100000\n"}, 1.5),  # docker --cpus 1.5
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({}, None),  # no cgroup files at all
    ],
)
def test_the_quota_is_read_from_cgroup_v2_or_v1(
    tmp_path: Path, files: dict[str, str], quota: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    budget = cpu_budget(tmp_path)
    assert budget == CpuBudget(affinity(), quota)


def test_usable_cpus_are_the_affinity_capped_by_the_quota_rounded_up() -> None:
    assert CpuBudget(8, None).usable == 8
    assert CpuBudget(8, 1.5).usable == 2
    assert CpuBudget(8, 2.0).usable == 2
    assert CpuBudget(2, 6.0).usable == 2
    assert CpuBudget(4, 0.5).usable == 1
    assert str(CpuBudget(8, 1.5)) == "2 usable: 8 in the affinity mask, a cgroup quota of 1.5 CPUs"


def test_default_threads_follow_the_budget() -> None:
    count, reason = default_threads(CpuBudget(8, 3.0))
    assert count == 3
    assert reason
