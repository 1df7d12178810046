"""The ceiling: the raw tokenize + forward + pool loop on the same corpus and model, no
HTTP and no queue, at batch sizes 1..max, with batches in arrival order (FIFO) and with
similar lengths grouped, in each precision this machine runs natively (float32, and
bfloat16 where the CPU has it, or float16 on CUDA). The best of these is the best the
hardware can do. Beside each precision's speed: how far its vectors are from float32's
over the whole corpus (the cosine of each text's vector to its float32 vector).

    python -m benchmarks.ceiling --torch-threads 1 --batch-sizes 1,2,4,8,16,32
    python -m benchmarks.ceiling --dtypes float32,bfloat16 --accuracy-texts 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from benchmarks import environment
from benchmarks.corpus import WORKLOADS
from benchmarks.corpus import workload as load_workload


@dataclass
class CeilingRow:
    batch_size: int
    order: str
    """'fifo' (arrival order) or 'grouped' (sorted by length)."""
    sequences_per_s: float
    batch_ms_mean: float
    batch_ms_p50: float
    dtype: str = "float32"


@dataclass
class Accuracy:
    """One precision's vectors against float32's, text by text."""

    dtype: str
    texts: int
    worst_cosine: float
    p1_cosine: float
    """The 1st percentile: 99 % of texts agree at least this well."""
    mean_cosine: float


def native_dtypes() -> list[str]:
    """The precisions this machine runs natively: float32, plus float16 on CUDA or
    bfloat16 on a CPU with native bfloat16."""
    import torch

    from batcher.models.precision import native_bf16

    if torch.cuda.is_available():
        return ["float32", "float16"]
    return ["float32", "bfloat16"] if native_bf16() else ["float32"]


def measure(
    batch_sizes: list[int],
    *,
    compile: bool,
    texts_per_run: int,
    torch_threads: int | None,
    dtypes: list[str] | None = None,
    accuracy_texts: int = 2000,
    workload: str = "short",
) -> tuple[list[CeilingRow], list[Accuracy]]:
    """Every (dtype, order, batch size)'s speed, and every dtype's agreement with
    float32 over the first `accuracy_texts` texts of the corpus (none when 0)."""
    import torch

    from batcher.models import LoadOptions, TextModel

    if torch_threads:
        torch.set_num_threads(torch_threads)
    corpus = load_workload(workload).texts
    texts = corpus[:texts_per_run]
    rows: list[CeilingRow] = []
    vectors: dict[str, np.ndarray] = {}
    for dtype in dtypes or native_dtypes():
        model = TextModel.load(LoadOptions(compile=compile, dtype=dtype))  # type: ignore[arg-type]
        model.warm_up(max(batch_sizes))
        rows += _speed(model, texts, batch_sizes, dtype)
        if accuracy_texts:
            vectors[dtype] = _vectors(model, corpus[:accuracy_texts])
        del model
    return rows, _accuracy(vectors)


def _speed(model: Any, texts: list[str], batch_sizes: list[int], dtype: str) -> list[CeilingRow]:
    rows = []
    for order in ("fifo", "grouped"):
        for size in batch_sizes:
            chosen = texts if order == "fifo" else sorted(texts, key=len)
            timings = []
            started = time.perf_counter()
            for i in range(0, len(chosen), size):
                t0 = time.perf_counter()
                # tokenizing included
                model.predict([model.encoder.encode(t) for t in chosen[i : i + size]])
                timings.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
            ms = np.array(timings) * 1000
            rows.append(
                CeilingRow(
                    size, order, len(chosen) / elapsed, float(ms.mean()), float(np.median(ms)),
                    dtype,
                )
            )  # fmt: skip
    return rows


def _vectors(model: Any, texts: list[str], batch: int = 32) -> np.ndarray:
    """Unnormalised vectors, in the corpus' order, computed in length-sorted batches."""
    from batcher.models import Options

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.dimension), dtype=np.float64)
    raw = Options(normalize=False)
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        out[chunk] = model.predict([model.encoder.encode(texts[i], options=raw) for i in chunk])
    return out


def _accuracy(vectors: dict[str, np.ndarray]) -> list[Accuracy]:
    if "float32" not in vectors:
        return []
    reference = vectors["float32"]
    out = []
    for dtype, ours in vectors.items():
        cosines = (ours * reference).sum(axis=1) / (
            np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
        )
        out.append(
            Accuracy(dtype, len(cosines), float(cosines.min()), float(np.percentile(cosines, 1)),
                     float(cosines.mean()))
        )  # fmt: skip
    return out


def format_table(rows: list[CeilingRow]) -> str:
    lines = [f"{'dtype':>9} {'batch':>5} {'order':>8} {'seq/s':>8} {'batch ms':>9} {'p50 ms':>8}"]
    lines += [
        f"{r.dtype:>9} {r.batch_size:>5} {r.order:>8} {r.sequences_per_s:>8.1f} "
        f"{r.batch_ms_mean:>9.1f} {r.batch_ms_p50:>8.1f}"
        for r in rows
    ]
    return "\n".join(lines)


def format_precisions(rows: list[CeilingRow], accuracy: list[Accuracy]) -> str:
    """One line per precision: its best speed, its ratio to float32's, its agreement."""
    best: dict[str, CeilingRow] = {}
    for r in rows:
        if r.dtype not in best or r.sequences_per_s > best[r.dtype].sequences_per_s:
            best[r.dtype] = r
    by_dtype = {a.dtype: a for a in accuracy}
    base = best.get("float32")
    lines = [f"{'dtype':>9} {'best seq/s':>10} {'vs fp32':>8} {'worst cos':>10} {'p1 cos':>8} "
             f"{'mean cos':>9}"]  # fmt: skip
    for dtype, r in best.items():
        a = by_dtype.get(dtype)
        ratio = f"{r.sequences_per_s / base.sequences_per_s:.2f}x" if base else "-"
        cos = (
            f"{a.worst_cosine:>10.5f} {a.p1_cosine:>8.5f} {a.mean_cosine:>9.6f}"
            if a
            else f"{'-':>10} {'-':>8} {'-':>9}"
        )
        lines.append(f"{dtype:>9} {r.sequences_per_s:>10.1f} {ratio:>8} {cos}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--texts", type=int, default=256, help="texts per measurement")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument(
        "--dtypes",
        help="comma-separated precisions; default: those this machine runs natively "
        "(float32, plus bfloat16 on a CPU with native bfloat16, float16 on CUDA)",
    )
    parser.add_argument(
        "--accuracy-texts",
        type=int,
        default=2000,
        help="corpus texts over which each precision is compared with float32 (0: none)",
    )
    parser.add_argument(
        "--workload", choices=list(WORKLOADS), default="short", help="the built-in texts"
    )
    parser.add_argument("--json", help="write the rows and environment here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    dtypes = args.dtypes.split(",") if args.dtypes else None
    rows, accuracy = measure(
        sizes, compile=args.compile, texts_per_run=args.texts, torch_threads=args.torch_threads,
        dtypes=dtypes, accuracy_texts=args.accuracy_texts, workload=args.workload,
    )  # fmt: skip
    print(format_table(rows))
    print()
    print(format_precisions(rows, accuracy))
    if args.json:
        record = {
            "environment": environment.describe(),
            "rows": [asdict(r) for r in rows],
            "accuracy": [asdict(a) for a in accuracy],
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
