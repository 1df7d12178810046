"""The textbook server, the baseline every report compares to: a sync FastAPI endpoint,
one tokenize + forward + pool per request, no batching, no compile.

    python -m benchmarks.naive --port 8001 --torch-threads 1
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field
from transformers import AutoModel, AutoTokenizer

from batcher.models import DEFAULT_HUB_ID, default_source


class PredictRequest(BaseModel):
    text: str = Field(min_length=1)


def create_app(source: str | None = None) -> FastAPI:
    path = source or default_source()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
    name = DEFAULT_HUB_ID if source is None else source
    app = FastAPI(title="naive baseline")

    @app.post("/predict")
    def predict(body: PredictRequest) -> dict[str, Any]:  # sync: runs in the threadpool
        inputs = tokenizer(body.text, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        embedding = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)[0]
        return {"embedding": embedding.tolist(), "model": name}

    @app.get("/model")
    def info() -> dict[str, Any]:
        return {"name": name, "server": "naive", "batching": {"policy": "naive"}}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.naive", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default=None, help="default: the built-in default model")
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    uvicorn.run(create_app(args.model), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
