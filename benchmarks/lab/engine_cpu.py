"""The engine process's own CPU per item: an engine with a model that costs nothing
(`benchmarks.lab.overhead.null_model`) served over `batcher.remote` to front-end clients in
another process, which keep `--concurrency` items in flight. What the process that owns
the device spends per item (its CPU time over the run / items answered) is the ceiling
of items per second one device can be fed at, whatever the front-ends do.

    python -m benchmarks.lab.engine_cpu --concurrency 256 --front-ends 4 --duration 10

The engine process runs on CPU 0, the clients on CPU 1 (where the machine has two).
`host_calibration_ms` times a fixed piece of Python in the engine process before the
run: on a VM whose speed drifts, compare figures only with it beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

from batcher import Engine, EngineClosed, EngineConfig, ThreadRunner
from batcher.items import Result
from batcher.link import Reply
from batcher.models import Encoded, Output, unpack_output
from batcher.remote import EngineServer, RemoteEngine, socket_dir
from benchmarks import environment
from benchmarks.lab.overhead import null_model

ENGINE_CPU, CLIENT_CPU = 0, 1


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


@dataclass(frozen=True, slots=True)
class EngineCounters:
    cpu_s: float
    """The engine process's CPU time (every thread), seconds."""
    items: int
    batches: int


def _engine_main(path: str, max_batch_size: int, ready: Any, profile: bool) -> None:
    _pin(ENGINE_CPU)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if not profile:
        asyncio.run(_serve_engine(path, max_batch_size, ready))
        return
    import cProfile
    import pstats

    with cProfile.Profile() as profiler:
        asyncio.run(_serve_engine(path, max_batch_size, ready))
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)


async def _serve_engine(path: str, max_batch_size: int, ready: Any) -> None:
    engine: Engine[Encoded, Output] = Engine(
        ThreadRunner(null_model(packed_outputs=True)),
        EngineConfig(max_batch_size=max_batch_size, max_queue_size=4096),
    )
    stop = asyncio.Event()

    async def counters() -> EngineCounters:
        items = engine.stats().items.get("ok", 0)
        # Batches computed (observed as each finishes, as the items' outcomes are), not
        # dispatched: a batch dispatched but not done would count without its items.
        batches = sum(
            int(sample.value)
            for metric in engine.metrics.batch_size.collect()
            for sample in metric.samples
            if sample.name.endswith("_count")
        )
        return EngineCounters(time.process_time(), items, batches)

    async def shutdown() -> None:
        stop.set()

    async def calibrate() -> float:
        """CPU seconds of a fixed piece of Python (pickling what the engine pickles),
        in this process on its core: how fast the host is right now."""
        started = time.process_time()
        sample = [Reply(i, [Result(b"x" * 1536, 0.001, 0.002, 32)]) for i in range(32)]
        for _ in range(2000):
            pickle.loads(pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL))
        return time.process_time() - started

    handlers = {"counters": counters, "stop": shutdown, "calibrate": calibrate}
    server = EngineServer(engine, path, handlers=handlers)
    async with engine:
        await server.start()
        ready.set()
        await stop.wait()
        await server.aclose()


async def _load(
    path: str, front_ends: int, concurrency: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    remotes = [RemoteEngine[Encoded, Output](path, unpack=unpack_output) for _ in range(front_ends)]
    for remote in remotes:
        await remote.connect()
    item = Encoded([101] + [2000] * 14 + [102], truncated=False)
    calibration_s: float = await remotes[0].control("call", name="calibrate")
    stopping = False

    async def client(remote: RemoteEngine[Encoded, Output]) -> None:
        while not stopping:
            await remote.submit(item)

    clients = [asyncio.create_task(client(remotes[i % front_ends])) for i in range(concurrency)]
    await asyncio.sleep(warmup_s)
    before: EngineCounters = await remotes[0].control("call", name="counters")
    started, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.sleep(duration_s)
    after: EngineCounters = await remotes[0].control("call", name="counters")
    elapsed, client_cpu = time.perf_counter() - started, time.process_time() - cpu0
    stopping = True
    await asyncio.gather(*clients, return_exceptions=True)
    with contextlib.suppress(EngineClosed):  # it closes the connection as it stops
        await remotes[0].control("call", name="stop")
    for remote in remotes:
        await remote.aclose()
    items = after.items - before.items
    batches = after.batches - before.batches
    return {
        "host_calibration_ms": calibration_s * 1e3,
        "items": items,
        "items_per_s": items / elapsed,
        "mean_batch": items / batches if batches else 0.0,
        "engine_cpu_us_per_item": (after.cpu_s - before.cpu_s) / items * 1e6 if items else None,
        "engine_cpu_busy": (after.cpu_s - before.cpu_s) / elapsed,
        "client_cpu_us_per_item": client_cpu / items * 1e6 if items else None,
        "frames_sent_per_front_end": [r.frames_sent for r in remotes],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lab.engine_cpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--front-ends", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument(
        "--profile", action="store_true", help="print the engine process's cProfile (slower)"
    )
    args = parser.parse_args(argv)
    directory = socket_dir()
    path = os.path.join(directory, "engine.sock")
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    engine = context.Process(
        target=_engine_main, args=(path, args.max_batch_size, ready, args.profile)
    )
    engine.start()
    try:
        if not ready.wait(60):
            print("the engine process did not start", file=sys.stderr)
            return 1
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        _pin(CLIENT_CPU)
        try:
            figures = asyncio.run(
                _load(path, args.front_ends, args.concurrency, args.warmup, args.duration)
            )
        finally:
            if allowed is not None:
                os.sched_setaffinity(0, allowed)  # called from a test, say
    finally:
        engine.join(10)
        if engine.is_alive():
            engine.kill()
        shutil.rmtree(directory, ignore_errors=True)
    figures |= {"settings": environment.portable_values(vars(args))}
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
