"""Images per second for a ViT-base-sized image classifier (random weights, the compute of
google/vit-base-patch16-224: 12 layers of 768, 224 x 224 pictures in 16 x 16 patches,
1000 labels), against the textbook server and the raw batched ceiling, on one core.

- `microbatch`: `microbatch serve --model DIR --torch-threads 1` (compiled, `--dtype auto`),
  clients posting `{"image": base64}` to `/predict`; and `microbatch float32`, the same
  with `--dtype float32` (the naive server's precision: what batching and compiling give
  apart from bfloat16);
- `naive`: the textbook server, a sync FastAPI endpoint that decodes, preprocesses and runs
  one forward pass a request (float32, eager), as `pipeline("image-classification")` would;
- `ceiling`: the raw loop of microbatch's own forward (the same precision and compiled
  graph as the server's) on pictures decoded beforehand, at batch sizes 1, 8 and 32: no
  HTTP, no queue, no decoding. `ceiling with decoding` adds what decoding and the image
  processor cost a picture on the same core, one after the other.

Every server is pinned to CPU 0 with one torch thread; this load generator runs on CPU 1.
The pictures: photo-like JPEGs of 640 x 480 (about 60 KB, 80 KB in base64), distinct, so
nothing is answered from a cache (`Cache-Control: no-cache` as well). Closed loops of 1 and
64 clients, `--duration` seconds each after `--warmup`. Beside images/s and latency: the
server's CPU per image (`process_cpu_seconds_total`), the share of it that decoding and
preprocessing take (their CPU per picture, measured alone beside the ceiling), and their
wall time per image on microbatch's image threads (`microbatch_image_decode_seconds` and
`microbatch_image_preprocess_seconds`; under load it includes waiting for the core).

    python -m benchmarks.lab.images --out benchmarks/results/NAME [--duration 20]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from pydantic import BaseModel

from benchmarks.environment import command_line, describe, portable_values
from benchmarks.lab.reply_bytes import closed_loop
from benchmarks.processes import pin, server
from benchmarks.scrape import Scrape

SIZES = (1, 8, 32)
PICTURES = 256


def save_vit_base(path: Path) -> Path:
    """ViT-base's configuration with random weights (seed 0), and its image processor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from batcher.models.vision_loading import pil_processor_class

    torch.manual_seed(0)
    labels = {i: f"class {i}" for i in range(1000)}
    config = ViTConfig(id2label=labels, label2id={v: k for k, v in labels.items()})
    ViTForImageClassification(config).save_pretrained(path, safe_serialization=True)
    processor = pil_processor_class("ViT")(size={"height": 224, "width": 224})
    processor.save_pretrained(path)
    return path


def pictures(n: int = PICTURES) -> list[str]:
    """`n` distinct photo-like JPEGs (smooth gradients and noise), base64."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    out = []
    for i in range(n):
        base = np.stack([(x + 3 * i) % 256, (y + 5 * i) % 256, (x + y + 7 * i) % 256], axis=-1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        data = io.BytesIO()
        Image.fromarray(noisy, "RGB").save(data, format="JPEG", quality=85)
        out.append(base64.b64encode(data.getvalue()).decode())
    return out


async def run(
    session: aiohttp.ClientSession, url: str, images: list[str], clients: int, seconds: float
) -> dict[str, Any]:
    latencies: list[float] = []
    failed = 0
    stop = time.perf_counter() + seconds

    async def loop(k: int) -> None:
        nonlocal failed
        i = k
        while time.perf_counter() < stop:
            started = time.perf_counter()
            body = {"image": images[i % len(images)]}
            async with session.post(f"{url}/predict", json=body,
                                    headers={"cache-control": "no-cache"}) as reply:  # fmt: skip
                await reply.read()
            i += clients
            if reply.status != 200:
                failed += 1
                continue
            latencies.append(time.perf_counter() - started)

    before = await scrape(session, url)
    started = time.perf_counter()
    await asyncio.gather(*(loop(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    after = await scrape(session, url)
    cpu = after["cpu"] - before["cpu"]
    row = closed_loop(clients, latencies, failed, elapsed, cpu)
    row["images_per_s"] = row.pop("requests_per_s")
    row["server_cpu_ms_per_image"] = row.pop("server_cpu_us_per_request") / 1e3
    if "decode" in after:  # wall seconds on the image threads, waits for the core included
        spent = sum(after[k] - before.get(k, 0.0) for k in ("decode", "preprocess"))
        row["decode_wall_ms_per_image"] = spent / max(1, len(latencies)) * 1e3
    return row


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The server's CPU seconds, and (microbatch) its seconds decoding and preprocessing."""
    async with session.get(f"{url}/metrics") as reply:
        metrics = Scrape.parse(await reply.text())
    out = {"cpu": metrics.value("process_cpu_seconds_total")}
    decode = metrics.value("microbatch_image_decode_seconds_sum")
    if not math.isnan(decode):
        out["decode"] = decode
        out["preprocess"] = metrics.value("microbatch_image_preprocess_seconds_sum")
    return out


async def measure(url: str, images: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for clients in (1, 64):
            await run(session, url, images, clients, args.warmup)
            row = await run(session, url, images, clients, args.duration)
            print(row, flush=True)
            rows.append(row)
    return rows


class NaiveBody(BaseModel):
    image: str


def serve_naive(model: str, port: int) -> None:
    """The textbook server: decode, preprocess, one eager float32 forward a request."""
    import torch
    import uvicorn
    from fastapi import FastAPI, Response
    from prometheus_client import generate_latest
    from transformers import AutoModelForImageClassification
    from transformers.image_utils import load_image

    from batcher.models.vision_loading import image_processor

    torch.set_num_threads(1)
    processor = image_processor(model)
    network = AutoModelForImageClassification.from_pretrained(model).eval()
    labels = network.config.id2label
    app = FastAPI()

    @app.get("/metrics")
    def metrics() -> Response:  # its process's CPU, as microbatch's /metrics has it
        return Response(generate_latest(), media_type="text/plain")

    @app.post("/predict")
    def predict(body: NaiveBody) -> dict[str, Any]:  # sync: runs in the threadpool
        inputs = processor(load_image(body.image), return_tensors="pt")
        with torch.inference_mode():
            scores = network(**inputs).logits.softmax(-1)[0]
        best = int(scores.argmax())
        return {"label": labels[best], "score": float(scores[best])}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def ceiling(model: str, images: list[str]) -> dict[str, Any]:
    """microbatch's own forward (the server's precision and compiled graph) on pictures
    decoded beforehand, at each batch size; and what decoding costs a picture."""
    from batcher.models import LoadOptions, set_threads
    from batcher.models.vision import load_model

    set_threads(1)
    network = load_model(LoadOptions(source=model, device="cpu", compile=True))
    network.warm_up(max(SIZES))
    started = time.perf_counter()
    items = network.encoder.encode_images(images)
    decode_s = (time.perf_counter() - started) / len(images)
    rows = []
    for size in SIZES:
        batch = items[:size]
        network.predict(batch)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < 10 or runs < 3:
            network.predict(batch)
            runs += 1
        per_image = (time.perf_counter() - started) / (runs * size)
        rows.append({"batch_size": size, "images_per_s": 1 / per_image,
                     "with_decoding_per_s": 1 / (per_image + decode_s)})  # fmt: skip
    return {"dtype": network.precision.name, "decode_ms_per_image": decode_s * 1e3, "rows": rows}


def table(results: dict[str, Any]) -> str:
    top = results["ceiling"]
    decode = top["decode_ms_per_image"]
    lines = ["| server | clients | images/s | p50 ms | p99 ms | server CPU ms/image | "
             "decoding's share of it | decoding, wall ms/image |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in ("microbatch", "microbatch float32", "naive"):
        for r in results[name]:
            cpu = r["server_cpu_ms_per_image"]
            wall = r.get("decode_wall_ms_per_image")
            lines.append(
                f"| {name} | {r['clients']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | "
                f"{r['p99_ms']:.0f} | {cpu:.1f} | {decode / cpu:.1%} | "
                f"{'' if wall is None else f'{wall:.1f}'} |"
            )
    lines += ["", f"Ceiling ({top['dtype']}, compiled; decoding and preprocessing "
              f"{decode:.1f} ms of CPU a picture, one after the other):", "",
              "| batch size | images/s | with decoding |", "|---:|---:|---:|"]  # fmt: skip
    for r in top["rows"]:
        lines.append(f"| {r['batch_size']} | {r['images_per_s']:.2f} | "
                     f"{r['with_decoding_per_s']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--serve-naive", metavar="MODEL", help="only run the naive server")
    parser.add_argument("--ceiling", metavar="MODEL", help="only measure the ceiling (JSON)")
    parser.add_argument("--port", type=int, default=8005)
    args = parser.parse_args()
    if args.serve_naive:
        serve_naive(args.serve_naive, args.port)
        return
    if args.ceiling:
        print(json.dumps(ceiling(args.ceiling, pictures(64))))
        return
    if args.out is None:
        parser.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    images = pictures()
    with tempfile.TemporaryDirectory() as directory:
        model = str(save_vit_base(Path(directory) / "vit-base"))
        command = [sys.executable, "-m", "benchmarks.lab.images", "--ceiling", model]
        found = subprocess.run(command, check=True, capture_output=True, text=True,
                               preexec_fn=lambda: pin(0))  # fmt: skip
        results: dict[str, Any] = {"ceiling": json.loads(found.stdout.splitlines()[-1])}
        print(results["ceiling"], flush=True)
        pin(1)
        serve = ["server.cli", "serve", "--model", model, "--torch-threads", "1"]
        servers = {
            "microbatch": serve,
            "microbatch float32": [*serve, "--dtype", "float32"],
            "naive": ["benchmarks.lab.images", "--serve-naive", model],
        }
        for name, args_ in servers.items():
            ready = "/docs" if name == "naive" else None
            with server(args_, args.out / f"server-{name}.log", cpu=0, ready=ready) as url:
                results[name] = asyncio.run(measure(url, images, args))
    record = {
        "command": command_line(),
        "environment": describe(),
        "settings": portable_values({"duration": args.duration, "warmup": args.warmup}),
        "results": results,
    }
    (args.out / "images.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
