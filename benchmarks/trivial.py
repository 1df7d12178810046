"""A server that costs nothing: answers /predict at once with an embedding-sized JSON.
Measures the load generator's own ceiling (it must be far above any real server's).

    python -m benchmarks.trivial --port 8002
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI


def _embedding(dimension: int = 384, seed: int = 0) -> list[float]:
    """A unit vector of float32 values as Python floats, like a real model's output (whose
    JSON has 17 or so digits a number, not a short constant's)."""
    rng = np.random.default_rng(seed)
    vector = rng.standard_normal(dimension).astype(np.float32)
    return [float(x) for x in vector / np.linalg.norm(vector)]


EMBEDDING = _embedding()


def create_app() -> FastAPI:
    app = FastAPI(title="trivial")

    @app.post("/predict")
    async def predict() -> dict[str, Any]:
        return {"embedding": EMBEDDING, "model": "trivial"}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trivial", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning",
                loop="uvloop", http="httptools")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
