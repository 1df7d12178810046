"""Device memory in `/metrics`: allocated, reserved and peak bytes of each CUDA device.

A Prometheus collector that reads torch's caching allocator when scraped, so a scrape
costs one `torch.cuda.memory_stats` call per device and nothing happens between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

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
