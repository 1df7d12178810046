"""The table for `benchmarks/lab/variants.sh`: medians over rounds of each (workload,
load, variant), with the mix's latencies by kind.

    python -m benchmarks.lab.variants DIR 'LABEL=JSON' ...
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

Step = dict[str, Any]


def main(argv: list[str]) -> int:
    folder, variants = Path(argv[0]), argv[1:]
    cells: dict[tuple[str, str, str], list[Step]] = defaultdict(list)
    order: list[tuple[str, str]] = []
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        workload = path.stem.rsplit("-", 2)[0]  # WORKLOAD-LABEL-ROUND
        for step in run["steps"]:
            if (workload, step["load"]) not in order:
                order.append((workload, step["load"]))
            cells[(workload, step["load"], run["label"])].append(step)
    labels = [v.split("=", 1)[0] for v in variants]
    print(
        "| workload | load | variant | req/s | p50 ms | p99 ms | query p99 ms | chunk p99 ms "
        "| mean batch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for workload, load in order:
        for label in labels:
            steps = cells.get((workload, load, label))
            if not steps:
                continue

            def median(read: Callable[[Step], float | None]) -> str:
                values = [v for v in map(read, steps) if v is not None]  # noqa: B023
                return f"{statistics.median(values):,.1f}" if values else "-"

            def by_kind(kind: str) -> Callable[[Step], float | None]:
                return lambda s: (s.get("latency_ms_by_kind") or {}).get(kind, {}).get("p99")

            print(
                f"| {workload} | {load} | {label} | {median(lambda s: s['throughput_rps'])} "
                f"| {median(lambda s: s['latency_ms']['p50'])} "
                f"| {median(lambda s: s['latency_ms']['p99'])} "
                f"| {median(by_kind('query'))} | {median(by_kind('chunk'))} "
                f"| {median(lambda s: (s.get('server') or {}).get('mean_batch_size'))} |"
            )
    print()
    for variant in variants:
        print(f"- `{variant}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
