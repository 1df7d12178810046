"""Memory: in `/metrics`, the allocated, reserved and peak bytes of each CUDA device; and
what a model holds, measured around its unloading (`memory_in_use`, `give_back_memory`).

The Prometheus collector reads torch's caching allocator when scraped, so a scrape
costs one `torch.cuda.memory_stats` call per device and nothing happens between scrapes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

MemoryStats = Callable[[str], Mapping[str, int]]
"""torch.cuda.memory_stats's shape: a device name in, the allocator's counters out."""

GAUGES = (
    (
        "microbatch_gpu_memory_allocated_bytes",
        "allocated_bytes.all.current",
        "Bytes held by tensors on the device now.",
    ),
    (
        "microbatch_gpu_memory_reserved_bytes",
        "reserved_bytes.all.current",
        "Bytes the caching allocator holds from the driver now (allocated plus cached).",
    ),
    (
        "microbatch_gpu_memory_peak_bytes",
        "allocated_bytes.all.peak",
        "Most bytes held by tensors at once since the process started.",
    ),
)


def _torch_memory_stats(device: str) -> Mapping[str, int]:
    import torch

    return torch.cuda.memory_stats(device)


class GpuMemoryCollector(Collector):
    """One gauge family per figure in `GAUGES`, labelled by device (`cuda:0`, ...)."""

    def __init__(self, devices: Sequence[str], stats: MemoryStats = _torch_memory_stats) -> None:
        self._devices = tuple(devices)
        self._stats = stats

    def describe(self) -> Iterator[Metric]:
        # Describing without reading keeps registration free of CUDA calls.
        for name, _, doc in GAUGES:
            yield GaugeMetricFamily(name, doc, labels=["device"])

    def collect(self) -> Iterator[Metric]:
        readings = {device: self._stats(device) for device in self._devices}
        for name, key, doc in GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["device"])
            for device, stats in readings.items():
                family.add_metric([device], float(stats.get(key, 0)))
            yield family


def cuda_devices(devices: Sequence[str]) -> list[str]:
    """The CUDA devices among `devices` (names as the models report them)."""
    return [d for d in devices if d.startswith("cuda")]


def memory_in_use(devices: Sequence[str]) -> tuple[int, str]:
    """What a model's weights and caches hold, as one figure and what it measures: the
    CUDA allocator's allocated bytes over `devices` where any is a GPU, else this
    process's resident set (0 where /proc is not there to read it)."""
    gpus = cuda_devices(devices)
    if gpus:
        import torch

        return sum(torch.cuda.memory_allocated(d) for d in gpus), "cuda allocated"
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0, "resident set"
    return pages * os.sysconf("SC_PAGE_SIZE"), "resident set"


def give_back_memory(devices: Sequence[str]) -> None:
    """After a model is dropped: collect its cycles, return the CUDA allocator's cached
    blocks to the driver, and ask glibc to return freed heap pages to the system (it
    keeps them otherwise, and the resident set would not show what was freed)."""
    gc.collect()
    if cuda_devices(devices):
        import torch

        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
