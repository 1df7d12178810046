"""Two tenants on one device: does a flood from one leave the other its latency and its
share?

One server (the built-in all-MiniLM-L6-v2, pinned to CPU 0 with one torch thread; this
load generator on CPU 1) with a tenants file of two keys, in two setups:

- `fair`: the keys belong to tenants `a` and `b` (weights `--weight-a`, `--weight-b`),
  so the engine shares the device between them (`batcher/fairness.py`);
- `a bulk`: as `fair`, with `lane = "bulk"` for tenant `a` (a batch job's tenant):
  its requests go behind b's, and its batches are cut short while b's flow;
- `one tenant`: both keys belong to one tenant, what the server did before tenants.

Phases, in each setup (short queries on /predict, `Cache-Control: no-cache`):

1. `b alone`: b sends Poisson arrivals at `--rate` requests/s (default: an eighth of
   what the server answers with 64 clients, measured first);
2. `a floods`: b as before, and a at ten times b's rate (a quarter more than the server
   can answer; what the queue of 1,024 cannot hold is refused with 429): b's p50/p99
   against phase 1;
3. `both backlogged`: closed loop, a with ten times b's `--clients` (48: b keeps more
   than half a batch queued): the device seconds each tenant had
   (`microbatch_tenant_device_seconds_total` in `fair`; the replies' inference time over
   batch size in both), against the weights.

Each tenant sends texts of its own (prefixed with its key): identical inputs would share
one computation, owned by whoever sent it first.

And the cost of checking a credential (`--verify-only` runs only this): microseconds per
call of an API key's lookup, and of an HS256, RS256 and ES256 token's verification the
first time it comes and when it comes again (remembered until it expires).

    python -m benchmarks.lab.tenants --out benchmarks/results/NAME [--duration 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from benchmarks.corpus import builtin
from benchmarks.environment import command_line, describe, portable_values
from benchmarks.processes import pin, server
from benchmarks.scrape import Scrape

NO_CACHE = {"cache-control": "no-cache"}
SERVE = ["server.cli", "serve", "--torch-threads", "1", "--max-queue-size", "1024"]


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    """The replies' X-Queue-Time-Ms: how much of the latency was the engine's queue."""
    device_s: float = 0.0
    """The replies' inference time over batch size: this tenant's share of the device."""
    failed: int = 0


def session() -> aiohttp.ClientSession:
    """aiohttp, not httpx: with hundreds of connections httpx's pool costs the load
    generator more CPU than the server spends (`benchmarks/transport.py`)."""
    connector = aiohttp.TCPConnector(limit=0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300))


def texts_of(tenant: str, seed: int) -> list[str]:
    """Each tenant's own texts: identical inputs from two tenants would share one
    computation (the first one's), which is not what this measures."""
    return [f"{tenant}: {text}" for text in builtin(2000, seed, 8, 15).texts]


async def call(client: aiohttp.ClientSession, url: str, key: str, text: str, tally: Tally) -> None:
    started = time.perf_counter()
    headers = {**NO_CACHE, "authorization": f"Bearer {key}"}
    try:
        async with client.post(f"{url}/predict", json={"text": text}, headers=headers) as reply:
            await reply.read()
    except (aiohttp.ClientError, TimeoutError):
        tally.failed += 1
        return
    if reply.status != 200:
        tally.failed += 1
        return
    tally.latencies.append(time.perf_counter() - started)
    tally.queue_ms.append(float(reply.headers["x-queue-time-ms"]))
    size = int(reply.headers["x-batch-size"])
    tally.device_s += float(reply.headers["x-inference-time-ms"]) / 1e3 / max(1, size)


async def open_loop(
    client: aiohttp.ClientSession, url: str, key: str, rate: float, duration: float, seed: int
) -> Tally:
    rng = random.Random(seed)
    texts = texts_of(key, seed)
    tally, tasks = Tally(), []
    end = time.perf_counter() + duration
    i = 0
    while time.perf_counter() < end:
        tasks.append(asyncio.create_task(call(client, url, key, texts[i % len(texts)], tally)))
        i += 1
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    return tally


async def closed_loop(
    client: aiohttp.ClientSession, url: str, key: str, clients: int, stop: asyncio.Event,
    seed: int,
) -> Tally:  # fmt: skip
    texts = texts_of(key, seed)
    tally = Tally()

    async def one(k: int) -> None:
        i = k
        while not stop.is_set():
            await call(client, url, key, texts[i % len(texts)], tally)
            i += clients

    await asyncio.gather(*(one(k) for k in range(clients)))
    return tally


async def device_seconds(client: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with client.get(f"{url}/metrics") as reply:
        scrape = Scrape.parse(await reply.text())
    return {t: scrape.value("microbatch_tenant_device_seconds_total", tenant=t) for t in "ab"}


async def capacity(url: str, seconds: float) -> float:
    """Requests/s the server answers with 64 closed-loop clients."""
    async with session() as client:
        stop = asyncio.Event()
        task = asyncio.create_task(closed_loop(client, url, "key-a", 64, stop, 3))
        await asyncio.sleep(seconds)
        stop.set()
        tally = await task
    return len(tally.latencies) / seconds


async def phases(url: str, setup: str, args: argparse.Namespace) -> dict[str, object]:
    async with session() as client:
        await open_loop(client, url, "key-b", args.rate, args.warmup, 9)
        alone = await open_loop(client, url, "key-b", args.rate, args.duration, 1)
        flood = asyncio.create_task(
            open_loop(client, url, "key-a", 10 * args.rate, args.duration + args.warmup, 2)
        )
        await asyncio.sleep(args.warmup)
        beside = await open_loop(client, url, "key-b", args.rate, args.duration, 1)
        flooded = await flood
        stop = asyncio.Event()
        fair = setup != "one tenant"
        before = await device_seconds(client, url) if fair else None
        a_task = asyncio.create_task(closed_loop(client, url, "key-a", 10 * args.clients, stop, 4))
        b_task = asyncio.create_task(closed_loop(client, url, "key-b", args.clients, stop, 5))
        await asyncio.sleep(args.duration)
        after = await device_seconds(client, url) if fair else None
        stop.set()
        a_tally, b_tally = await a_task, await b_task
    b_share = b_tally.device_s / ((a_tally.device_s + b_tally.device_s) or 1.0)
    result: dict[str, object] = {
        "setup": setup,
        "b_alone_p50_ms": quantile(alone.latencies, 0.5) * 1e3,
        "b_alone_p99_ms": quantile(alone.latencies, 0.99) * 1e3,
        "b_flooded_p50_ms": quantile(beside.latencies, 0.5) * 1e3,
        "b_flooded_p99_ms": quantile(beside.latencies, 0.99) * 1e3,
        "b_p99_ratio": quantile(beside.latencies, 0.99) / quantile(alone.latencies, 0.99),
        "b_flooded_queue_p50_ms": quantile(beside.queue_ms, 0.5),
        "b_flooded_queue_p99_ms": quantile(beside.queue_ms, 0.99),
        "b_failed": alone.failed + beside.failed,
        "a_answered_per_s": len(flooded.latencies) / (args.duration + args.warmup),
        "a_failed": flooded.failed,
        "backlogged_b_share_replies": b_share,
        "backlogged_requests": [len(a_tally.latencies), len(b_tally.latencies)],
    }
    if before is not None and after is not None:
        spent = {t: after[t] - before[t] for t in "ab"}
        result["backlogged_b_share_metrics"] = spent["b"] / ((spent["a"] + spent["b"]) or 1.0)
    return result


SETUPS = ("fair", "a bulk", "one tenant")


def tenants_file(path: Path, setup: str, args: argparse.Namespace) -> Path:
    a, b = ("a", "a") if setup == "one tenant" else ("a", "b")
    lane = 'lane = "bulk"\n' if setup == "a bulk" else ""
    path.write_text(
        f"[tenants.a]\nweight = {args.weight_a}\n{lane}[tenants.b]\nweight = {args.weight_b}\n"
        f'[[keys]]\nkey = "key-a"\ntenant = "{a}"\n[[keys]]\nkey = "key-b"\ntenant = "{b}"\n'
    )
    return path


def verification_costs(n: int) -> dict[str, float]:
    """Microseconds per credential check, on this thread (no server)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    from server.tenants import Tenants
    from server.tokens import JwtConfig, Verifier

    secret = "a-benchmark-secret-of-32-bytes-or-more"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    public = [
        {**json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "r"},
        {**json.loads(ECAlgorithm.to_jwk(ec_key.public_key())), "kid": "e"},
    ]
    claims = {"sub": "a", "scope": "predict", "exp": int(time.time()) + 3600}

    def tokens_of(key: object, alg: str = "HS256", kid: str | None = None) -> list[bytes]:
        """`n` tokens, each different (`jti`), so that each is verified in full."""
        headers = {"kid": kid} if kid else None
        return [
            jwt.encode({**claims, "jti": str(i)}, key, algorithm=alg, headers=headers).encode()  # type: ignore[arg-type]
            for i in range(n)
        ]

    with tempfile.TemporaryDirectory() as tmp:
        jwks = Path(tmp) / "jwks.json"
        jwks.write_text(json.dumps({"keys": public}))
        keys = Path(tmp) / "tenants.toml"
        keys.write_text('[[keys]]\nkey = "a-key"\ntenant = "a"\n')
        tenants = Tenants(keys)
        hs = Verifier(JwtConfig(secret=secret), tenants)
        asym = Verifier(JwtConfig(jwks=str(jwks)), tenants)
        tokens = {
            "HS256": (hs, tokens_of(secret)),
            "RS256": (asym, tokens_of(rsa_key, "RS256", "r")),
            "ES256": (asym, tokens_of(ec_key, "ES256", "e")),
        }

        async def measure() -> dict[str, float]:
            assert asym.jwks is not None
            await asym.jwks.load()
            costs = {}
            started = time.perf_counter()
            for _ in range(n):
                tenants.by_key(b"a-key")
            costs["api_key_us"] = (time.perf_counter() - started) / n * 1e6
            for name, (verifier, raws) in tokens.items():
                started = time.perf_counter()
                for raw in raws:  # each one new: its signature checked
                    await verifier.principal(raw)
                costs[f"{name}_first_us"] = (time.perf_counter() - started) / n * 1e6
                started = time.perf_counter()
                for _ in range(n):  # one token again and again, as a client sends it
                    await verifier.principal(raws[-1])
                costs[f"{name}_again_us"] = (time.perf_counter() - started) / n * 1e6
            return costs

        return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rate", type=float, default=None, help="b's requests/s")
    parser.add_argument("--clients", type=int, default=48, help="b's clients when backlogged")
    parser.add_argument("--weight-a", type=float, default=1.0)
    parser.add_argument("--weight-b", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"of {', '.join(SETUPS)}")
    parser.add_argument("--verify-only", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pin(1)
    costs = verification_costs(2000)
    print(costs, flush=True)
    results: list[dict[str, object]] = []
    measured = None
    if not args.verify_only:
        with tempfile.TemporaryDirectory() as tmp:
            for setup in args.setups.split(","):
                path = tenants_file(Path(tmp) / f"{setup}.toml", setup, args)
                log = args.out / f"server-{setup.replace(' ', '-')}.log"
                with server([*SERVE, "--tenants-file", str(path)], log, cpu=0) as url:
                    if args.rate is None:
                        measured = asyncio.run(capacity(url, 15.0))
                        args.rate = round(measured / 8, 1)
                        print(f"capacity {measured:.0f} requests/s; b's rate {args.rate}/s")
                    results.append(asyncio.run(phases(url, setup, args)))
                print(results[-1], flush=True)
    record = {
        "command": command_line(),
        "environment": describe(),
        "settings": portable_values({k: v for k, v in vars(args).items() if k != "out"}),
        "capacity_per_s": measured,
        "verification": costs,
        "results": results,
    }
    name = "verification.json" if args.verify_only else "tenants.json"
    (args.out / name).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
