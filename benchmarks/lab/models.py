"""Two models on one device: does a bulk flood on one leave the other's latency alone?

An embedder (the built-in all-MiniLM-L6-v2) and a reranker (a cross-encoder of the same
size and compute as ms-marco-MiniLM-L-6-v2: random weights, built here) share one CPU.
A reranker stream (Poisson, `--rate` requests/s, each a query and `--docs` documents on
`/rerank`) runs alone, then beside a bulk flood on the embedder (`--flood` closed-loop
clients, each posting `/embed` with `--chunks` RAG chunks at a time), in three setups:

- `shared`: one server serving both models (`--model emb=... --model rr=...`), whose
  engines share the device through the fair device scheduler;
- `two processes`: one server per model on the same CPU, what one runs without
  several-model support (the OS shares the core between two torch processes).

Every server is pinned to CPU 0 with one torch thread; this load generator runs on
CPU 1. Every request says `Cache-Control: no-cache`. The table gives the reranker's p50
and p99 in each phase and the embedder's chunks per second under the flood.

    python -m benchmarks.lab.models --out benchmarks/results/NAME [--rate 8] [--duration 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchmarks.corpus import builtin, rag_chunks
from benchmarks.environment import command_line, describe, portable_values
from benchmarks.processes import pin, server

NO_CACHE = {"cache-control": "no-cache"}
SERVE = ["server.cli", "serve", "--torch-threads", "1"]


def build_reranker(path: Path) -> Path:
    """A one-score cross-encoder shaped like ms-marco-MiniLM-L-6-v2 (6 layers, 384 wide,
    12 heads), random weights from a seed, with the built-in model's tokenizer, saved by
    sentence-transformers' CrossEncoder."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from batcher.models import default_source

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
        intermediate_size=1536, max_position_embeddings=512,
    )  # fmt: skip
    config.num_labels = 1
    base = path.with_name(path.name + "-base")
    BertForSequenceClassification(config).save_pretrained(base)
    AutoTokenizer.from_pretrained(default_source()).save_pretrained(base)
    CrossEncoder(str(base), device="cpu").save(str(path))
    return path


@dataclass
class Phase:
    setup: str
    phase: str
    rerank_requests: int
    rerank_p50_ms: float
    rerank_p99_ms: float
    rerank_failed: int
    embed_chunks_per_s: float | None
    rerank_queue_p50_ms: float = 0.0
    """The longest queue wait among a request's pairs (X-Queue-Time-Ms), median."""
    rerank_queue_p99_ms: float = 0.0
    rerank_inference_p50_ms: float = 0.0
    """Device time of the request's slowest batch (X-Inference-Time-Ms), median."""


@dataclass
class Stream:
    latencies: list[float]
    """Seconds, request to reply."""
    waits_ms: list[float]
    device_ms: list[float]
    failed: int


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_stream(
    client: httpx.AsyncClient, url: str, model: str | None, rate: float, duration: float,
    docs: int, seed: int,
) -> Stream:  # fmt: skip
    """Poisson arrivals at `rate` for `duration`: each a query and `docs` documents on
    /rerank, or (`docs` 0) a query alone on /predict."""
    rng = random.Random(seed)
    sentences = builtin(4000, seed, 20, 40).texts
    queries = builtin(500, seed + 1, 8, 15).texts
    latencies: list[float] = []
    waits: list[float] = []
    device: list[float] = []
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        query = queries[i % len(queries)]
        body: dict[str, object] = (
            {"query": query,
             "texts": [sentences[(i * docs + k) % len(sentences)] for k in range(docs)]}
            if docs else {"text": query}
        )  # fmt: skip
        if model is not None:
            body["model"] = model
        started = time.perf_counter()
        route = "/rerank" if docs else "/predict"
        reply = await client.post(f"{url}{route}", json=body, headers=NO_CACHE)
        if reply.status_code == 200:
            latencies.append(time.perf_counter() - started)
            waits.append(float(reply.headers["x-queue-time-ms"]))
            device.append(float(reply.headers["x-inference-time-ms"]))
        else:
            failed += 1

    tasks = []
    end = time.perf_counter() + duration
    i = 0
    while time.perf_counter() < end:
        tasks.append(asyncio.create_task(one(i)))
        i += 1
        await asyncio.sleep(rng.expovariate(rate))  # the stream's own clock
    await asyncio.gather(*tasks)
    return Stream(latencies, waits, device, failed)


async def flood(
    client: httpx.AsyncClient, url: str, model: str | None, clients: int, chunks: int,
    stop: asyncio.Event, priority: str | None = None,
) -> int:  # fmt: skip
    """`clients` closed-loop clients posting `chunks` RAG chunks each to /embed until
    `stop`, with `X-Priority: priority` if given; returns the chunks embedded."""
    texts = rag_chunks(400).texts
    done = 0
    headers = NO_CACHE if priority is None else {**NO_CACHE, "x-priority": priority}

    async def loop(k: int) -> None:
        nonlocal done
        i = k * chunks
        while not stop.is_set():
            batch = [texts[(i + j) % len(texts)] for j in range(chunks)]
            body: dict[str, object] = {"inputs": batch}
            if model is not None:
                body["model"] = model
            reply = await client.post(f"{url}/embed", json=body, headers=headers)
            if reply.status_code == 200 and not stop.is_set():
                done += chunks
            i += clients * chunks

    await asyncio.gather(*(loop(k) for k in range(clients)))
    return done


async def phases(
    setup: str, rerank_url: str, embed_url: str, named: bool, args: argparse.Namespace,
    priority: str | None = None,
) -> list[Phase]:  # fmt: skip
    rr, emb = ("rr", "emb") if named else (None, None)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await run_stream(client, rerank_url, rr, args.rate, args.warmup, args.docs, 7)
        solo = await run_stream(client, rerank_url, rr, args.rate, args.duration, args.docs, 1)
        stop = asyncio.Event()
        flooding = asyncio.create_task(
            flood(client, embed_url, emb, args.flood, args.chunks, stop, priority)
        )
        await asyncio.sleep(args.warmup)  # the flood's batches are running and learned
        started = time.perf_counter()
        loaded = await run_stream(client, rerank_url, rr, args.rate, args.duration, args.docs, 1)
        elapsed = time.perf_counter() - started
        stop.set()
        chunks = await flooding
    made = []
    for phase, stream, rate in (
        ("alone", solo, None),
        ("beside the flood", loaded, chunks / elapsed),
    ):
        made.append(
            Phase(
                setup,
                phase,
                len(stream.latencies),
                quantile(stream.latencies, 0.5) * 1e3,
                quantile(stream.latencies, 0.99) * 1e3,
                stream.failed,
                rate,
                quantile(stream.waits_ms, 0.5),
                quantile(stream.waits_ms, 0.99),
                quantile(stream.device_ms, 0.5),
            )
        )
    return made


@contextmanager
def shared_server(reranker: Path, out: Path) -> Iterator[str]:
    from batcher.models import default_source

    models = ["--model", f"emb={default_source()}", "--model", f"rr={reranker}"]
    with server([*SERVE, *models], out / "server-shared.log", cpu=0) as url:
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenario", choices=("models", "lanes"), default="models")
    parser.add_argument("--rate", type=float, default=3.0, help="stream requests/s")
    parser.add_argument("--docs", type=int, default=8, help="documents per rerank request")
    parser.add_argument("--flood", type=int, default=4, help="embedder clients")
    parser.add_argument("--chunks", type=int, default=32, help="chunks per embed request")
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--setups", default=None)
    args = parser.parse_args()
    if args.setups is None:
        args.setups = "shared,two processes" if args.scenario == "models" else "lanes,one lane"
    args.out.mkdir(parents=True, exist_ok=True)
    pin(1)
    results: list[Phase] = []
    with tempfile.TemporaryDirectory() as tmp:
        reranker = build_reranker(Path(tmp) / "reranker") if args.scenario == "models" else None
        for setup in args.setups.split(","):
            with ExitStack() as stack:
                priority = None
                if args.scenario == "lanes":  # one model: short queries beside the job
                    url = stack.enter_context(server(SERVE, args.out / f"server-{setup}.log",
                                                     cpu=0))  # fmt: skip
                    rerank_url, embed_url, named = url, url, False
                    args.docs = 0
                    priority = "interactive" if setup == "one lane" else None
                elif setup == "shared":
                    assert reranker is not None
                    url = stack.enter_context(shared_server(reranker, args.out))
                    rerank_url, embed_url, named = url, url, True
                else:
                    rerank_url = stack.enter_context(server(
                        [*SERVE, "--model", str(reranker)], args.out / "server-rr.log", cpu=0
                    ))  # fmt: skip
                    embed_url = stack.enter_context(
                        server(SERVE, args.out / "server-emb.log", cpu=0)
                    )
                    named = False
                results += asyncio.run(phases(setup, rerank_url, embed_url, named, args, priority))
            print(*(asdict(r) for r in results[-2:]), sep="\n", flush=True)
    settings = portable_values(vars(args) | {"out": str(args.out)})
    report = {"settings": settings, "command": command_line(), "environment": describe(),
              "phases": [asdict(r) for r in results]}  # fmt: skip
    (args.out / f"{args.scenario}.json").write_text(json.dumps(report, indent=2))
    lines = [
        "| setup | stream | requests | p50 ms | p99 ms | queue p50 / p99 ms | device p50 ms "
        "| failed | job's chunks/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = "" if r.embed_chunks_per_s is None else f"{r.embed_chunks_per_s:.1f}"
        lines.append(
            f"| {r.setup} | {r.phase} | {r.rerank_requests} | {r.rerank_p50_ms:.1f} | "
            f"{r.rerank_p99_ms:.1f} | {r.rerank_queue_p50_ms:.1f} / {r.rerank_queue_p99_ms:.1f} "
            f"| {r.rerank_inference_p50_ms:.1f} | {r.rerank_failed} | {rate} |"
        )
    for setup in dict.fromkeys(r.setup for r in results):
        alone, loaded = (r for r in results if r.setup == setup)
        lines.append(f"\n{setup}: p99 beside the flood / alone = "
                     f"{loaded.rerank_p99_ms / alone.rerank_p99_ms:.2f}x")  # fmt: skip
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
