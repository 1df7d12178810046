"""The server's own cost per request: microbatch with a model that costs nothing, against
a bare FastAPI endpoint returning the same JSON (`benchmarks/trivial.py`), same pinning,
same load. Optionally profiles the microbatch server with py-spy.

    python -m benchmarks.overhead --concurrency 1,64 --duration 10 --profile profile.txt
    python -m benchmarks.overhead --serve --port 8003      # just the zero-cost server
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from batcher.models import Encoded, Output
from benchmarks.compare import CLIENT_CPU, SERVER_CPU, run_bench
from benchmarks.loadgen import Load
from benchmarks.processes import pin, server
from benchmarks.trivial import EMBEDDING


class NullModel:
    """Embeds every text as the same 384 numbers, at once: only the server's path costs."""

    name = "null"
    task: Literal["embed", "classify"] = "embed"
    labels: tuple[str, ...] = ()
    max_tokens = 256

    def encode(self, text: str) -> Encoded:
        return Encoded([1] * min(len(text) // 4 + 2, 256), truncated=False)

    def encode_many(self, texts: Sequence[str]) -> list[Encoded]:
        return [self.encode(t) for t in texts]

    def cost(self, item: Encoded) -> int:
        return len(item.ids)

    def predict(self, items: Sequence[Encoded]) -> list[Output]:
        return [EMBEDDING] * len(items)

    def warm_up(self, max_batch_size: int) -> None:
        return None

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "task": self.task, "device": "none"}


def serve(port: int) -> None:
    """Run microbatch on the null model, exactly as `microbatch serve` runs uvicorn."""
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(port=port), model=NullModel())
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--serve", action="store_true", help="only run the null-model server")
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--profile", help="write py-spy's top functions of the server here")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.port)
        return 0
    pin(CLIENT_CPU)
    loads = [Load("closed", int(c)) for c in args.concurrency.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="microbatch-overhead-"))
    with server(["benchmarks.trivial"], logs / "trivial.log", cpu=SERVER_CPU) as url:
        bare = run_bench(url, loads, "bare FastAPI", args)
    with server(["benchmarks.overhead", "--serve"], logs / "null.log", cpu=SERVER_CPU) as url:
        profiler = None
        if args.profile and shutil.which("py-spy"):
            pid = _server_pid(url)
            profiler = subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                 "--duration", str(int(args.warmup + args.duration) * len(loads)),
                 "--output", str(logs / "profile.txt"), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        ours = run_bench(url, loads, "microbatch, null model", args)
        if profiler is not None:
            profiler.wait(timeout=120)
            Path(args.profile).write_text(top_functions(logs / "profile.txt"))
    print("\n| load | bare FastAPI req/s | microbatch req/s | ratio |\n|---|---|---|---|")
    for b, o in zip(bare.steps, ours.steps, strict=True):
        ratio = o.throughput_rps / b.throughput_rps
        print(f"| {b.load} | {b.throughput_rps:.0f} | {o.throughput_rps:.0f} | {ratio:.2f}x |")
    return 0


def _server_pid(url: str) -> int:
    port = url.rsplit(":", 1)[1]
    out = subprocess.run(["pgrep", "-f", "benchmarks.overhead --serve --port " + port],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout.split()[0])


_PREFIX = re.compile(
    r"\((?:[^()]*/site-packages/|[^()]*/lib/python3\.\d+/|[^()]*/(?=(?:batcher|server|benchmarks)/))"
)


def _relative(frame: str) -> str:
    """`f (/any/where/site-packages/pkg/x.py:3)` -> `f (pkg/x.py:3)`: no local paths."""
    return _PREFIX.sub("(", frame)


def top_functions(raw_profile: Path, limit: int = 25) -> str:
    """Self time by function from py-spy's raw (collapsed stacks) output."""
    totals: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    samples = 0
    for line in raw_profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        frames = [_relative(frame) for frame in stack.split(";")]
        leaf = frames[-1]
        totals[leaf] = totals.get(leaf, 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    rows = [f"{samples} samples\n", "self %  function (file:line)"]
    for frame, n in sorted(totals.items(), key=lambda kv: -kv[1])[:limit]:
        rows.append(f"{100 * n / samples:5.1f}  {frame}")
    rows += ["", "inclusive %  function"]
    for frame, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:limit]:
        rows.append(f"{100 * n / samples:5.1f}  {frame}")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
