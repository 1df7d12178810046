"""Naive server vs microbatch (adaptive and window) vs the raw-forward ceiling, in one run
on this machine, written to benchmarks/results/<hardware>-<date>.md with a plot.

microbatch runs with its defaults (`--dtype auto`), and once more in each other precision
this machine runs natively (float32 beside bfloat16 on a CPU that has it), so that the
report puts each precision's speed beside its accuracy against float32. The naive server
stays float32: it is the textbook baseline.

Servers are pinned to CPU 0 with one torch thread; the load generator runs on CPU 1.

    microbatch bench --compare                 # or: python -m benchmarks.compare
    microbatch bench --compare --duration 20 --concurrency 1,16,64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx

from benchmarks import environment
from benchmarks.ceiling import native_dtypes
from benchmarks.corpus import WORKLOADS
from benchmarks.loadgen import Load, Request
from benchmarks.plot import plot_runs
from benchmarks.processes import pin, server
from benchmarks.runs import Run, bench, format_table, load_corpus, show_defaults

SERVER_CPU, CLIENT_CPU = 0, 1


def run_bench(
    url: str, loads: list[Load], label: str, args: argparse.Namespace,
    request: Request | None = None,
) -> Run:  # fmt: skip
    """`loads` against `url` with `request` (default: ours, one text a request), on the
    texts of `args.workload`."""
    corpus = load_corpus(None, getattr(args, "workload", "short"))
    request = request or Request(encoding_format=getattr(args, "encoding_format", None))
    print(f"\n== {label} ({url})")
    print(format_table([]))
    return asyncio.run(
        bench(
            url, loads, texts=corpus.texts, corpus_source=corpus.source, request=request,
            duration_s=args.duration, warmup_s=args.warmup, kinds=corpus.kinds, label=label,
            progress=True, on_step=lambda s: print(format_table([s]).splitlines()[1], flush=True),
        )
    )  # fmt: skip


@dataclass(frozen=True)
class Target:
    """A server of the comparison: its URL, the batching settings to PATCH before each of
    its steps (None: not microbatch), and the requests it takes (None: ours)."""

    url: str
    batching: dict[str, object] | None = None
    request: Request | None = None


def interleaved(
    targets: dict[str, Target], loads: list[Load], args: argparse.Namespace, first: int = 0,
) -> dict[str, Run]:  # fmt: skip
    """Each load on every server back to back, the order rotating from load to load, so
    that a drift of the host's speed (CPU steal comes and goes on a VM) hits all alike.
    `targets`: name -> `Target`."""
    runs: dict[str, Run] = {}
    names = list(targets)
    for i, load in enumerate(loads, start=first):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            target = targets[name]
            if target.batching is not None:
                patch = httpx.patch(f"{target.url}/admin/batching", json=target.batching)
                patch.raise_for_status()
            run = run_bench(target.url, [load], name, args, target.request)
            if name in runs:
                runs[name].steps += run.steps
            else:
                runs[name] = run
    return runs


PEER = "infinity"
"""The best peer on these inputs (`infinity-emb`), run from a virtual environment of its
own (`--peer-venv`): its requirements are not ours."""


def peer_version(venv: Path) -> str:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('infinity_emb'))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def start_peers(
    stack: contextlib.ExitStack, venv: Path, dtypes: list[str], logs: Path
) -> dict[str, Target]:
    """Infinity on the default model's files, in each of `dtypes`, pinned as our servers
    are (its torch engine, batches of up to 32, as our default), answering OpenAI's
    `/embeddings`."""
    from batcher.models import default_source

    os.environ["HF_HUB_OFFLINE"] = "1"  # the model is a local directory: nothing to fetch
    program = [str(venv / "bin" / "infinity_emb"), "v2"]
    peers = {}
    for dtype in dtypes:
        args = ["--model-id", default_source(), "--engine", "torch", "--device", "cpu",
                "--dtype", dtype, "--batch-size", "32"]  # fmt: skip
        log = logs / f"{PEER}-{dtype}.log"
        url = stack.enter_context(
            server(args, log, cpu=SERVER_CPU, program=program, ready="/health")
        )
        model = httpx.get(f"{url}/models").json()["data"][0]["id"]
        peers[f"{PEER} {dtype}"] = Target(url, request=Request("/embeddings", model=model))
    return peers


def peer_table(runs: dict[str, Run], version: str | None = None) -> list[str]:
    """microbatch's default server against the peer in each precision, load by load."""
    adaptive = runs["microbatch adaptive"]
    peers = [name for name in runs if name.startswith(f"{PEER} ")]
    if not peers:
        return []
    lines = [
        "## Against the peer",
        "",
        f"microbatch's default server (`microbatch adaptive`) against Infinity "
        f"{version or ''} in each precision, in this run: a req/s ratio above 1.00x means "
        "microbatch serves more, a latency ratio below 1.00x that it answers sooner.",
        "",
        "| load | peer | microbatch / peer req/s | p50 ratio | p99 ratio |",
        "|---|---|---|---|---|",
    ]
    for i, ours in enumerate(adaptive.steps):
        for name in peers:
            theirs = runs[name].steps[i]
            lines.append(
                f"| {ours.load} | {name} | {ratio(ours.throughput_rps, theirs.throughput_rps)} | "
                f"{ratio(ours.latency_ms['p50'], theirs.latency_ms['p50'])} | "
                f"{ratio(ours.latency_ms['p99'], theirs.latency_ms['p99'])} |"
            )
    return [*lines, ""]


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """`LABEL=JSON` (a PATCH body for /admin/batching) -> (label, body)."""
    label, _, body = text.partition("=")
    settings = json.loads(body) if body else None
    if not label or " " in label or not isinstance(settings, dict):
        raise argparse.ArgumentTypeError(f"expected LABEL={{json object}}, got {text!r}")
    return label, settings


def variant_table(runs: dict[str, Run], variants: dict[str, dict[str, object]]) -> list[str]:
    """Each settings variant against the default settings, same server, same run."""
    if not variants:
        return []
    adaptive = runs["microbatch adaptive"]
    lines = [
        "## Settings variants",
        "",
        "The default server with these batching settings PATCHed in before each of their "
        "steps (and the defaults restored before the default's steps), in the same "
        "rotation: a req/s ratio above 1.00x means the defaults serve more, a latency "
        "ratio below 1.00x that they answer sooner.",
        "",
        *(f"- `microbatch {label}`: `{json.dumps(body)}`" for label, body in variants.items()),
        "",
        "| load | variant | defaults / variant req/s | p50 ratio | p99 ratio | "
        "variant's mean batch |",
        "|---|---|---|---|---|---|",
    ]
    for i, ours in enumerate(adaptive.steps):
        for label in variants:
            theirs = runs[f"microbatch {label}"].steps[i]
            batch = f"{theirs.server['mean_batch_size']:.1f}" if theirs.server else "-"
            lines.append(
                f"| {ours.load} | {label} | {ratio(ours.throughput_rps, theirs.throughput_rps)} | "
                f"{ratio(ours.latency_ms['p50'], theirs.latency_ms['p50'])} | "
                f"{ratio(ours.latency_ms['p99'], theirs.latency_ms['p99'])} | {batch} |"
            )
    return [*lines, ""]


def kind_table(runs: dict[str, Run]) -> list[str]:
    """Latencies by kind of text (a mixed workload), load by load, server by server."""
    adaptive = runs["microbatch adaptive"]
    kinds = sorted({k for s in adaptive.steps for k in (s.latency_ms_by_kind or {})})
    if len(kinds) < 2:
        return []
    lines = [
        "## Latency by kind of text",
        "",
        "| load | server | " + " | ".join(f"{k} p50 ms | {k} p99 ms" for k in kinds) + " |",
        "|---|---|" + "---|---|" * len(kinds),
    ]
    for i, step in enumerate(adaptive.steps):
        for name, run in runs.items():
            by_kind = run.steps[i].latency_ms_by_kind or {}
            cells = [
                f"{by_kind[k]['p50']:.1f} | {by_kind[k]['p99']:.1f}" if k in by_kind else "- | -"
                for k in kinds
            ]
            lines.append(f"| {step.load} | {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def dtype_of(row: dict[str, Any]) -> str:
    """A ceiling row's precision (rows written before precisions were measured: float32)."""
    return str(row.get("dtype", "float32"))


def precision_table(
    runs: dict[str, Run], ceiling: list[dict[str, Any]], accuracy: list[dict[str, Any]],
    variants: dict[str, dict[str, object]] | None = None,
) -> list[str]:  # fmt: skip
    """Each precision's speed (raw loop and server, adaptive policy) beside its agreement
    with float32, and its ratio to float32 in this run."""
    servers = {
        str(run.server.get("dtype")): run
        for name, run in runs.items()
        if name.startswith("microbatch ")
        and name != "microbatch window"
        and name.removeprefix("microbatch ") not in (variants or {})
    }
    dtypes = sorted({dtype_of(r) for r in ceiling} | set(servers),
                    key=lambda d: d != "float32")  # fmt: skip
    if len(dtypes) < 2:
        return []
    raw = {d: max((r["sequences_per_s"] for r in ceiling if dtype_of(r) == d),
                  default=0.0) for d in dtypes}  # fmt: skip
    agree = {a["dtype"]: a for a in accuracy}
    closed = [s.load for s in runs["microbatch adaptive"].steps if s.kind == "closed"]
    top, one = (closed[-1], closed[0]) if closed else ("", "")

    def step(dtype: str, load: str) -> Any:
        run = servers.get(dtype)
        return next((s for s in run.steps if s.load == load), None) if run else None

    base_top = step("float32", top)
    lines = [
        "## Precision: speed beside accuracy",
        "",
        f"The server figures are microbatch's adaptive policy at {top} and {one}; the "
        "accuracy is the cosine of each corpus text's vector to its float32 vector "
        f"({agree[dtypes[0]]['texts'] if dtypes[0] in agree else 0} texts, the raw loop).",
        "",
        f"| dtype | raw seq/s (best batch) | server req/s at {top} | vs float32 | "
        f"p50 ms at {one} | worst cosine | 1st percentile | mean cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in dtypes:
        s_top, s_one, a = step(d, top), step(d, one), agree.get(d)
        req = f"{s_top.throughput_rps:.1f}" if s_top else "-"
        vs = ratio(s_top.throughput_rps, base_top.throughput_rps) if s_top and base_top else "-"
        p50 = f"{s_one.latency_ms['p50']:.1f}" if s_one else "-"
        cos = (f"{a['worst_cosine']:.5f} | {a['p1_cosine']:.5f} | {a['mean_cosine']:.6f}"
               if a else "- | - | -")  # fmt: skip
        lines.append(f"| {d} | {raw[d]:.1f} | {req} | {vs} | {p50} | {cos} |")
    return [*lines, ""]


def write_report(
    out: Path, runs: dict[str, Run], ceiling: list[dict[str, Any]], generator: Run,
    commands: list[str], plot_name: str, compiled: dict[str, Any] | None = None,
    steal_percent: float | None = None, accuracy: list[dict[str, Any]] | None = None,
    peer_version: str | None = None, variants: dict[str, dict[str, object]] | None = None,
) -> None:  # fmt: skip
    accuracy = accuracy or []
    naive, adaptive, window = runs["naive"], runs["microbatch adaptive"], runs["microbatch window"]
    default_dtype = str(adaptive.server.get("dtype", "float32"))
    own = [r for r in ceiling if dtype_of(r) == default_dtype] or ceiling
    best = max(own, key=lambda r: r["sequences_per_s"])
    env = adaptive.environment
    lines = [
        f"# microbatch vs naive vs ceiling: {env['cpu']} ({env['cpu_count']} CPUs), {date.today()}",
        "",
        f"Model: {adaptive.server.get('name')} ({adaptive.server.get('device')}, "
        f"{adaptive.server.get('dtype')}, compile "
        f"{'on' if adaptive.server.get('compile', {}).get('enabled') else 'off'}). "
        f"Corpus: {adaptive.corpus}. Servers pinned to CPU {SERVER_CPU} with 1 torch thread; "
        f"load generator on CPU {CLIENT_CPU}. {adaptive.duration_s:g} s measured per step "
        f"after {adaptive.warmup_s:g} s warm-up. Commit {env['git_commit']}; "
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}.",
        "",
        f"Each load ran on the {len(runs)} servers back to back, in an order that rotates "
        "from load to load, so that a change in the host's speed during the run (CPU steal "
        "on a VM) hits all alike. The naive server runs float32."
        + (
            f" CPU time stolen by the hypervisor during the run: {steal_percent} %."
            if steal_percent is not None
            else ""
        ),
        "",
        *(
            [
                "Graphs compiled after warm-up, counted by the server at the end of the run "
                f"(every load, every policy): **{compiled.get('graphs_since_warm_up')}**.",
                "",
            ]
            if compiled
            else []
        ),
        "## Throughput and latency",
        "",
        "| load | server | req/s | p50 ms | p90 ms | p99 ms | max ms | mean batch | padding |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, step in enumerate(adaptive.steps):
        for name in runs:
            s = runs[name].steps[i]
            srv = s.server
            batch = f"{srv['mean_batch_size']:.1f}" if srv else "1"
            pad = f"{srv['padding_ratio']:.2f}" if srv else "-"
            lines.append(
                f"| {step.load} | {name} | {s.throughput_rps:.1f} | {s.latency_ms['p50']:.1f} | "
                f"{s.latency_ms['p90']:.1f} | {s.latency_ms['p99']:.1f} | "
                f"{s.latency_ms.get('max', float('nan')):.1f} | {batch} | {pad} |"
            )
    lines += [
        "",
        "## Ratios in this run",
        "",
        "| load | adaptive / naive req/s | adaptive / naive p50 | adaptive / naive p99 | "
        "adaptive / ceiling | window / naive req/s |",
        "|---|---|---|---|---|---|",
    ]
    for a, n, w in zip(adaptive.steps, naive.steps, window.steps, strict=True):
        # An open-loop step carries its offered rate, so against the ceiling it says nothing.
        vs_ceiling = ratio(a.throughput_rps, best["sequences_per_s"]) if a.kind == "closed" else "-"
        lines.append(
            f"| {a.load} | {ratio(a.throughput_rps, n.throughput_rps)} | "
            f"{ratio(a.latency_ms['p50'], n.latency_ms['p50'])} | "
            f"{ratio(a.latency_ms['p99'], n.latency_ms['p99'])} | {vs_ceiling} | "
            f"{ratio(w.throughput_rps, n.throughput_rps)} |"
        )
    lines += [
        "",
        *peer_table(runs, peer_version),
        *variant_table(runs, variants or {}),
        *kind_table(runs),
        *precision_table(runs, ceiling, accuracy, variants),
        f"## Ceiling: raw tokenize + forward + pool, no HTTP (best in {default_dtype}, the "
        f"default's precision: batch {best['batch_size']}, {best['order']}, "
        f"{best['sequences_per_s']:.1f} seq/s)",
        "",
        "| dtype | batch | order | seq/s | ms per batch (mean) | p50 |",
        "|---|---|---|---|---|---|",
        *(
            f"| {dtype_of(r)} | {r['batch_size']} | {r['order']} | "
            f"{r['sequences_per_s']:.1f} | {r['batch_ms_mean']:.1f} | {r['batch_ms_p50']:.1f} |"
            for r in ceiling
        ),
        "",
        "## The load generator's own ceiling",
        "",
        "Against `benchmarks/trivial.py` (answers at once with an embedding-sized JSON), same "
        "pinning, one process:",
        "",
        "| load | req/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
        *(
            f"| {s.load} | {s.throughput_rps:.0f} | {s.latency_ms['p50']:.1f} | "
            f"{s.latency_ms['p99']:.1f} |"
            for s in generator.steps
        ),
        "",
        f"![throughput vs latency]({plot_name})",
        "",
        "## Reproduce",
        "",
        "```bash",
        *commands,
        "```",
        "",
        "Raw results (every setting, versions, hardware) are in the JSON files beside this one.",
    ]
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="microbatch bench --compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument(
        "--open-fractions",
        default="0.5",
        help="open-loop rates as fractions of microbatch's top closed-loop req/s, e.g. "
        "0.25,0.5,0.75",
    )
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--render", metavar="DIR", help="only rewrite the report of a past run")
    parser.add_argument("--name", help="report name; default: <hardware>-<date>")
    parser.add_argument("--serve-args", default="",
                        help="extra flags for microbatch serve (default: none, its defaults; "
                        "pinned to one CPU, it runs one torch thread)")  # fmt: skip
    parser.add_argument(
        "--workload",
        choices=list(WORKLOADS),
        default="short",
        help="the built-in texts every server gets (see microbatch bench)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        default=[],
        metavar="LABEL=JSON",
        help="also run the default server with these batching settings (a PATCH body for "
        "/admin/batching), as `microbatch LABEL`, in the same rotation; repeatable",
    )
    parser.add_argument(
        "--peer-venv",
        help="a virtual environment with infinity-emb[torch,server]: Infinity runs beside "
        "the others, in each precision the CPU runs natively",
    )
    args = show_defaults(parser).parse_args(argv)
    if args.render:
        render(Path(args.render), args)
        return 0
    pin(CLIENT_CPU)
    slug = args.name or f"{environment.hardware_slug()}-{date.today()}"
    raw = Path(args.out_dir) / slug
    raw.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="microbatch-compare-"))
    print(f"server logs: {logs}")
    closed = [Load("closed", int(c)) for c in args.concurrency.split(",")]
    cpu_before = environment.cpu_times()
    serve = ["server.cli", "serve", *shlex.split(args.serve_args)]
    naive = ["benchmarks.naive", "--torch-threads", "1"]
    dtypes = native_dtypes()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(server(serve, logs / "microbatch.log", cpu=SERVER_CPU))
        naive_url = stack.enter_context(server(naive, logs / "naive.log", cpu=SERVER_CPU))
        variants = dict(args.variant)
        # Every microbatch target PATCHes each setting a variant changes, so that none
        # leaks into the next target's steps on the same server.
        live = httpx.get(f"{url}/admin/batching").json()
        keys = {"policy"} | {key for body in variants.values() for key in body}
        defaults = {key: live[key] for key in keys}
        targets = {
            "microbatch adaptive": Target(url, defaults | {"policy": "adaptive"}),
            "microbatch window": Target(url, defaults | {"policy": "window"}),
            "naive": Target(naive_url),
        }
        for label, body in variants.items():
            targets[f"microbatch {label}"] = Target(url, defaults | body)
        default_dtype = httpx.get(f"{url}/model").json().get("dtype")
        for dtype in dtypes:
            if dtype != default_dtype and "--dtype" not in args.serve_args:
                log = logs / f"microbatch-{dtype}.log"
                other = stack.enter_context(server([*serve, "--dtype", dtype], log, cpu=SERVER_CPU))
                targets[f"microbatch {dtype}"] = Target(other, {"policy": "adaptive"})
        if args.peer_venv is not None:
            targets |= start_peers(stack, Path(args.peer_venv), dtypes, logs)
        runs = interleaved(targets, closed, args)
        saturation = max(s.throughput_rps for s in runs["microbatch adaptive"].steps)
        opened = [
            Load("open", float(max(round(float(f) * saturation), 1)))
            for f in args.open_fractions.split(",")
        ]
        for name, run in interleaved(targets, opened, args, first=len(closed)).items():
            runs[name].steps += run.steps
        # The compiler's count at the end: graphs made after warm-up, under every load.
        compiled = httpx.get(f"{url}/model").json().get("compile", {})
        (raw / "compile-after-run.json").write_text(json.dumps(compiled, indent=2) + "\n")
    with server(["benchmarks.trivial"], logs / "trivial.log", cpu=SERVER_CPU) as url:
        generator = run_bench(url, [Load("closed", 64)], "trivial (load generator ceiling)", args)

    print("\n== ceiling")
    ceiling_json = raw / "ceiling.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.ceiling", "--torch-threads", "1",
         "--dtypes", ",".join(dtypes), "--workload", args.workload, "--json", str(ceiling_json)],
        check=True, preexec_fn=lambda: pin(SERVER_CPU),
    )  # fmt: skip
    servers = list(runs)
    runs["trivial"] = generator
    for name, run in runs.items():
        (raw / f"{name.replace(' ', '-')}.json").write_text(json.dumps(run.to_json(), indent=2))
    steal = environment.steal_percent(cpu_before, environment.cpu_times())
    saved = {**environment.portable_values(vars(args)), "cpu_steal_percent": steal,
             "servers": servers, "variants": variants}  # fmt: skip
    if args.peer_venv is not None:
        saved["peer"] = {"name": "infinity-emb", "version": peer_version(Path(args.peer_venv))}
    (raw / "args.json").write_text(json.dumps(saved, indent=2))
    render(raw, args)
    return 0


def render(raw: Path, args: argparse.Namespace) -> None:
    """Write `<raw>.md` and `<raw>.png` from the JSON files a compare run left in `raw`."""
    saved = json.loads((raw / "args.json").read_text())
    names = saved.get("servers", ["microbatch adaptive", "microbatch window", "naive"])
    runs = {
        name: Run.from_json(json.loads((raw / f"{name.replace(' ', '-')}.json").read_text()))
        for name in [*names, "trivial"]
    }
    generator = runs.pop("trivial")
    ceiling_record = json.loads((raw / "ceiling.json").read_text())
    ceiling, accuracy = ceiling_record["rows"], ceiling_record.get("accuracy", [])
    slug = raw.name
    plot_name = f"{slug}.png"
    order = ["naive", "microbatch window", "microbatch adaptive"]
    order += [n for n in names if n not in order]
    dtypes = ",".join(dict.fromkeys(dtype_of(r) for r in ceiling))
    cpu = runs["naive"].environment["cpu"]
    labels = order
    if len({r.server.get("dtype") for r in runs.values() if r.server}) > 1:
        # Name each microbatch server's precision, unless its name already does.
        served = {n: str(runs[n].server.get("dtype")) for n in order}
        labels = [
            f"{n} ({served[n]})" if n.startswith("microbatch") and not n.endswith(served[n]) else n
            for n in order
        ]
    plot_runs([runs[n].to_json() for n in order], labels, str(raw.parent / plot_name),
              f"{cpu}: throughput vs latency")  # fmt: skip
    rates = ",".join(f"{s.value:g}" for s in runs["microbatch adaptive"].steps if s.kind == "open")
    concurrency, duration, warmup = saved["concurrency"], saved["duration"], saved["warmup"]
    serve = shlex.join(["taskset", "-c", "0", "microbatch", "serve",
                        *shlex.split(saved["serve_args"])])  # fmt: skip
    workload = saved.get("workload", "short")
    peer = saved.get("peer")
    variants = saved.get("variants") or {}
    options = (
        (f" --workload {workload}" if workload != "short" else "")
        + (" --peer-venv PEER_VENV" if peer else "")
        + "".join(f" --variant {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in variants.items())
    )
    commands = [
        f"microbatch bench --compare --concurrency {concurrency} --duration {duration:g} "
        f"--warmup {warmup:g}{options}",
        "# which runs, with servers on CPU 0 and the load generator on CPU 1:",
        f"{serve} --port 8000",
        f"taskset -c 1 microbatch bench http://127.0.0.1:8000 --concurrency {concurrency} "
        f"--rate {rates} --duration {duration:g}",
        "curl -X PATCH localhost:8000/admin/batching -H 'content-type: application/json' "
        '-d \'{"policy": "window"}\'   # then the same bench again',
        *(
            "curl -X PATCH localhost:8000/admin/batching -H 'content-type: application/json' "
            f"-d {shlex.quote(json.dumps(body))}   # microbatch {label}: the same bench"
            for label, body in variants.items()
        ),
        "taskset -c 0 python -m benchmarks.naive --torch-threads 1 --port 8001   # same bench",
        "# (the tool runs each load on every server back to back, rather than server by server)",
        "taskset -c 0 python -m benchmarks.trivial --port 8002   # bench at 64 clients",
        *(
            f"{serve} --dtype {n.split()[-1]} --port 8003   # the same bench"
            for n in names
            if n.startswith("microbatch ")
            and n.split()[-1] not in ("adaptive", "window", *variants)
        ),
        *(
            [
                f"# PEER_VENV: python3 -m venv PEER_VENV && PEER_VENV/bin/pip install "
                f"torch==2.13.0 'infinity-emb[torch,server]=={peer['version']}'",
                "taskset -c 0 PEER_VENV/bin/infinity_emb v2 --model-id MODEL_DIR --engine torch "
                "--device cpu --dtype DTYPE --batch-size 32 --port 8004   # the same bench, "
                "with --endpoint /embeddings",
            ]
            if peer
            else []
        ),
        f"taskset -c 0 python -m benchmarks.ceiling --torch-threads 1 --dtypes {dtypes}"
        + (f" --workload {workload}" if workload != "short" else ""),
    ]
    report = raw.parent / f"{slug}.md"
    after = raw / "compile-after-run.json"
    compiled = json.loads(after.read_text()) if after.exists() else None
    write_report(report, runs, ceiling, generator, commands, plot_name, compiled,
                 saved.get("cpu_steal_percent"), accuracy,
                 peer["version"] if peer else None, variants)  # fmt: skip
    print(f"wrote {report}")


if __name__ == "__main__":
    sys.exit(main())
