"""Devices and threads: what torch can run on here. The server asks these instead of
importing torch itself."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from batcher.models.errors import ModelLoadError


def pick_device(option: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; anything else is passed to torch."""
    if option == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(option)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {option!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {option!r} asked for, but CUDA is not available")
    return device


def cuda_device_count() -> int:
    """CUDA devices visible to this process (0 without CUDA)."""
    return torch.cuda.device_count()


def set_threads(count: int) -> None:
    """torch's intra-op threads for this process."""
    torch.set_num_threads(count)


@dataclass(frozen=True, slots=True)
class CpuBudget:
    """The CPUs this process may use: those its affinity mask allows (`taskset`,
    Kubernetes' static CPU manager), capped by a cgroup CPU quota (`docker --cpus`, a
    Kubernetes CPU limit), which the affinity mask does not show."""

    affinity: int
    quota: float | None
    """CPUs' worth of time per period the cgroup allows; None for no quota."""

    @property
    def usable(self) -> int:
        if self.quota is None:
            return self.affinity
        return max(1, min(self.affinity, math.ceil(self.quota - 1e-9)))

    def __str__(self) -> str:
        quota = "no CPU quota" if self.quota is None else f"a cgroup quota of {self.quota:g} CPUs"
        return f"{self.usable} usable: {self.affinity} in the affinity mask, {quota}"


def default_threads(budget: CpuBudget) -> tuple[int, str]:
    """torch's intra-op threads when `--torch-threads` is not given, and why: one per
    CPU the process may use. Leaving one to the event loop was measured and lost: on 2
    CPUs at 64 clients, 2 threads served 1.18-1.23x what 1 did, at a lower p99
    (`benchmarks/results/threads-cpu-2core-2026-12-02.md`)."""
    return budget.usable, "one per usable CPU"


def cpu_budget(cgroup: Path = Path("/sys/fs/cgroup")) -> CpuBudget:
    """This process's `CpuBudget`, from its affinity mask and its cgroup (v2 `cpu.max`,
    or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count() or 1
    return CpuBudget(affinity, _cgroup_quota(cgroup))


def _cgroup_quota(root: Path) -> float | None:
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def device_problem(option: str) -> str | None:
    """Why `option` (a `--device`) cannot be used on this machine, in one line; None
    when it can."""
    if option == "auto":
        return None
    try:
        device = torch.device(option)
    except RuntimeError:
        return f"unknown device {option!r}: use auto, cpu, cuda, cuda:N or mps"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"{option}: this machine has no CUDA device torch can use; use cpu or auto"
        if device.index is not None and device.index >= count:
            return f"{option}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"{option}: MPS (Apple GPU) is not available here; use cpu or auto"
    return None
