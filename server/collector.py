"""The cyclic garbage collector, tuned for serving once a process holds what it keeps."""

from __future__ import annotations

import gc

GC_GEN0_THRESHOLD = 10_000
"""Net allocations between young-generation collections (Python's default: 700)."""


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for serving, once the model is warm.

    What exists then (torch, transformers, the model) lives as long as the process:
    `gc.freeze` takes it out of every later collection. And with 64 requests in flight,
    their live coroutines, futures and dicts crossed Python's default threshold of 700
    net allocations every few requests: collections took about a tenth of the server's
    CPU under load (measured with `gc.callbacks` on the null-model server of
    `benchmarks/lab/overhead.py`).
    Short-lived objects die by reference counting anyway; the collector is only needed
    for cycles, and a higher threshold still finds them."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(GC_GEN0_THRESHOLD, gen0), gen1, gen2)
