"""What does a protocol cost? Requests/s and the server's CPU per request for one text a
request, over each way a client can ask for an embedding:

- `JSON`: `POST /predict`, the vector as JSON numbers;
- `base64`: `POST /predict` with `encoding_format: base64` (the float32 bytes);
- `v2 JSON`: the Open Inference Protocol's `POST /v2/models/NAME/infer`, JSON tensors;
- `v2 binary`: the same route with Triton's binary tensor extension, in and out;
- `gRPC`: the same protocol's `ModelInfer` over `--grpc-port`, raw contents.

One server at a time, pinned to CPU 0: the built-in all-MiniLM-L6-v2 (384 dimensions,
one torch thread), then the null model (`benchmarks.lab.overhead`: 384 fixed floats, no
compute), whose CPU per request is the server's and the protocol's own; this load
generator on CPU 1 (aiohttp for HTTP, grpc.aio for gRPC, one
channel per client). Every text is computed (`Cache-Control: no-cache`). Closed loops of
1 and 64 clients, `--duration` seconds each after `--warmup`: requests/s, p50 and p99
latency, request and reply bytes, and the server's CPU per request
(`process_cpu_seconds_total` over the requests answered).

    python -m benchmarks.lab.protocols --out benchmarks/results/NAME [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from benchmarks.corpus import builtin
from benchmarks.environment import command_line, describe, portable_values
from benchmarks.lab.reply_bytes import closed_loop, cpu_seconds
from benchmarks.processes import free_port, pin, server
from server.kserve import messages as pb
from server.kserve.tensors import pack_bytes

MODEL = "all-MiniLM-L6-v2"
FORMATS = ("JSON", "base64", "v2 JSON", "v2 binary", "gRPC")
Call = Callable[[str], Awaitable[tuple[int, int, int]]]
"""One request for a text: its status (200 or not), request bytes and reply bytes."""


def http_call(client: aiohttp.ClientSession, url: str, name: str) -> Call:
    infer = f"{url}/v2/models/{MODEL}/infer"
    fresh = {"cache-control": "no-cache"}

    async def post(path: str, body: bytes, headers: dict[str, str]) -> tuple[int, int, int]:
        async with client.post(path, data=body, headers={**fresh, **headers}) as reply:
            data = await reply.read()
        return reply.status, len(body), len(data)

    async def call(text: str) -> tuple[int, int, int]:
        if name in ("JSON", "base64"):
            options = {"encoding_format": "base64"} if name == "base64" else {}
            body = json.dumps({"text": text, **options}).encode()
            return await post(f"{url}/predict", body, {"content-type": "application/json"})
        if name == "v2 JSON":
            plain = {"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}
            body = json.dumps({"inputs": [plain]}).encode()
            return await post(infer, body, {"content-type": "application/json"})
        blob = pack_bytes([text.encode()])
        tensor: dict[str, object] = {"name": "text", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(blob)}}  # fmt: skip
        head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
        headers = {"inference-header-content-length": str(len(head)),
                   "content-type": "application/octet-stream"}  # fmt: skip
        return await post(infer, head.encode() + blob, headers)

    return call


def grpc_call(channel: grpc.aio.Channel) -> Call:
    infer = channel.unary_unary(
        f"/{pb.SERVICE}/ModelInfer",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda raw: raw,  # its size is what is measured
    )
    metadata = (("cache-control", "no-cache"),)

    async def call(text: str) -> tuple[int, int, int]:
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="text", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(pack_bytes([text.encode()]))
        sent = request.SerializeToString()
        try:
            reply = await infer(request, metadata=metadata, timeout=60)
        except grpc.aio.AioRpcError:
            return 500, len(sent), 0
        return 200, len(sent), len(reply)

    return call


async def run(calls: list[Call], session: aiohttp.ClientSession, url: str,
              seconds: float) -> dict[str, Any]:  # fmt: skip
    clients = len(calls)
    texts = builtin(4000, clients, 8, 15).texts
    latencies: list[float] = []
    sizes: list[tuple[int, int]] = []
    failed = 0
    stop = time.perf_counter() + seconds

    async def loop(k: int) -> None:
        nonlocal failed
        i = k
        while time.perf_counter() < stop:
            started = time.perf_counter()
            status, sent, got = await calls[k](texts[i % len(texts)])
            i += clients  # the next text, answered or not: a failure is not retried
            if status != 200:
                failed += 1
                continue
            latencies.append(time.perf_counter() - started)
            sizes.append((sent, got))

    cpu_before, started = await cpu_seconds(session, url), time.perf_counter()
    await asyncio.gather(*(loop(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    cpu = await cpu_seconds(session, url) - cpu_before
    n = len(latencies)
    return {
        **closed_loop(clients, latencies, failed, elapsed, cpu),
        "request_bytes": sum(s for s, _ in sizes) / max(1, n),
        "reply_bytes": sum(g for _, g in sizes) / max(1, n),
    }


async def measure(url: str, target: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for clients in (1, 64):
            channels = [grpc.aio.insecure_channel(target) for _ in range(clients)]
            try:
                for name in FORMATS:
                    if name == "gRPC":
                        calls = [grpc_call(channel) for channel in channels]
                    else:
                        calls = [http_call(session, url, name)] * clients
                    await run(calls, session, url, args.warmup)
                    row = {"format": name, **await run(calls, session, url, args.duration)}
                    print(row, flush=True)
                    results.append(row)
            finally:
                for channel in channels:
                    await channel.close()
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | format | clients | request bytes | reply bytes | requests/s | p50 ms "
        "| p99 ms | server CPU µs/request |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['format']} | {r['clients']} | {r['request_bytes']:.0f} | "
            f"{r['reply_bytes']:.0f} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['server_cpu_us_per_request']:.0f} |"
        )
    return "\n".join(lines)


def serve_null(port: int, grpc_port: int) -> None:
    """microbatch on the model that costs nothing (`benchmarks.lab.overhead`), with gRPC:
    what is left of a request's CPU is the server's and the protocol's own."""
    import uvicorn

    from benchmarks.lab.overhead import null_model
    from server.app import create_app
    from server.settings import Settings

    settings = Settings(port=port, grpc_port=grpc_port)
    app = create_app(settings, model=null_model())
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=settings.access_log,
                timeout_keep_alive=settings.keep_alive_s)  # fmt: skip


MODELS = {
    "all-MiniLM-L6-v2": ["server.cli", "serve", "--torch-threads", "1"],
    "null model": ["benchmarks.lab.protocols", "--serve-null"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--serve-null", action="store_true", help="only run the null server")
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--grpc-port", type=int, default=8004)
    args = parser.parse_args()
    if args.serve_null:
        serve_null(args.port, args.grpc_port)
        return
    if args.out is None:
        parser.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    pin(1)
    results = []
    for model, command in MODELS.items():
        grpc_port = free_port()
        command = [*command, "--grpc-port", str(grpc_port)]
        with server(command, args.out / f"server-{model.split()[0]}.log", cpu=0) as url:
            rows = asyncio.run(measure(url, f"127.0.0.1:{grpc_port}", args))
        results += [{"model": model, **row} for row in rows]
    record = {
        "command": command_line(),
        "environment": describe(),
        "settings": portable_values(
            {k: v for k, v in vars(args).items() if k in ("duration", "warmup")}
        ),
        "results": results,
    }
    (args.out / "protocols.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
