"""GPU memory gauges: read from the allocator at scrape time, one series per device."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from batcher.models.memory import GpuMemoryCollector, cuda_devices


def test_each_device_gets_allocated_reserved_and_peak_at_scrape_time() -> None:
    reads: list[str] = []

    def stats(device: str) -> Mapping[str, int]:
        reads.append(device)
        base = 1000 if device == "cuda:0" else 5000
        return {
            "allocated_bytes.all.current": base,
            "reserved_bytes.all.current": base * 2,
            "allocated_bytes.all.peak": base * 3,
        }

    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector(["cuda:0", "cuda:1"], stats))
    assert reads == [], "registering reads nothing"
    value = registry.get_sample_value
    assert value("microbatch_gpu_memory_allocated_bytes", {"device": "cuda:0"}) == 1000
    assert value("microbatch_gpu_memory_reserved_bytes", {"device": "cuda:1"}) == 10000
    assert value("microbatch_gpu_memory_peak_bytes", {"device": "cuda:1"}) == 15000
    text = generate_latest(registry).decode()
    assert "# TYPE microbatch_gpu_memory_reserved_bytes gauge" in text


def test_only_cuda_devices_are_watched() -> None:
    assert cuda_devices(["cpu", "cuda:0", "mps", "cuda:1"]) == ["cuda:0", "cuda:1"]


@pytest.mark.gpu
def test_the_real_allocator_is_read() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector(["cuda:0"]))
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda:0")
    allocated = registry.get_sample_value(
        "microbatch_gpu_memory_allocated_bytes", {"device": "cuda:0"}
    )
    assert allocated is not None
    assert allocated >= block.numel()
