"""The ceiling: the raw tokenize + forward + pool loop on the same corpus and model, no
HTTP and no queue, at batch sizes 1..max, with batches in arrival order (FIFO) and with
similar lengths grouped. The best of these is the best the hardware can do.

    python -m benchmarks.ceiling --torch-threads 1 --batch-sizes 1,2,4,8,16,32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from benchmarks import environment
from benchmarks.corpus import builtin


@dataclass
class CeilingRow:
    batch_size: int
    order: str
    """'fifo' (arrival order) or 'grouped' (sorted by length)."""
    sequences_per_s: float
    batch_ms_mean: float
    batch_ms_p50: float


def measure(
    batch_sizes: list[int],
    *,
    compile: bool,
    texts_per_run: int,
    torch_threads: int | None,
) -> list[CeilingRow]:
    import torch

    from batcher.models import LoadOptions, TextModel

    if torch_threads:
        torch.set_num_threads(torch_threads)
    model = TextModel.load(LoadOptions(compile=compile))
    model.warm_up(max(batch_sizes))
    texts = builtin().texts[:texts_per_run]
    rows = []
    for order in ("fifo", "grouped"):
        for size in batch_sizes:
            chosen = texts if order == "fifo" else sorted(texts, key=len)
            timings = []
            started = time.perf_counter()
            for i in range(0, len(chosen), size):
                t0 = time.perf_counter()
                model.predict([model.encode(t) for t in chosen[i : i + size]])  # tokenize included
                timings.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
            ms = np.array(timings) * 1000
            rows.append(
                CeilingRow(
                    size, order, len(chosen) / elapsed, float(ms.mean()), float(np.median(ms))
                )
            )
    return rows


def format_table(rows: list[CeilingRow]) -> str:
    lines = [f"{'batch':>5} {'order':>8} {'seq/s':>8} {'batch ms':>9} {'p50 ms':>8}"]
    lines += [
        f"{r.batch_size:>5} {r.order:>8} {r.sequences_per_s:>8.1f} {r.batch_ms_mean:>9.1f} "
        f"{r.batch_ms_p50:>8.1f}"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--texts", type=int, default=256, help="texts per measurement")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--json", help="write the rows and environment here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    rows = measure(
        sizes, compile=args.compile, texts_per_run=args.texts, torch_threads=args.torch_threads
    )
    print(format_table(rows))
    if args.json:
        record = {"environment": environment.describe(), "rows": [asdict(r) for r in rows]}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
