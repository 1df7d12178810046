"""`microbatch log FILE|URL`: what operators ask of the prediction log, per version and
hour: requests, inputs, latency p50/p99 and errors; label shares over time; how far
each shadow version agrees with the version it shadows; and, on a server with tenants,
requests, inputs, latency and errors per tenant and hour.

Reads only the columns it needs, for the last `--hours`, and aggregates in Python, so
that SQLite and PostgreSQL answer alike."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from server.log_sinks import connect_to_read


@dataclass(slots=True)
class VersionHour:
    hour: str
    model: str
    version: str
    requests: int
    inputs: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    labels: dict[str, float] = field(default_factory=dict)
    """Each top label's share of the hour's answered inputs (classifiers)."""


@dataclass(slots=True)
class ShadowHour:
    hour: str
    model: str
    primary: str
    shadow: str
    inputs: int
    agreement: float | None
    """Mean of the rows' agreement: cosine (embeddings), same top label (classifiers),
    rank correlation (rerankers)."""


@dataclass(slots=True)
class TenantHour:
    hour: str
    tenant: str
    requests: int
    inputs: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None


@dataclass(slots=True)
class Report:
    versions: list[VersionHour]
    shadows: list[ShadowHour]
    tenants: list[TenantHour] = field(default_factory=list)
    """Rows that name a tenant (a server with tenants: `server.tenants`)."""


QUERY = (
    "SELECT at, model, version, shadow, against, request_id, status, latency_ms, label, "
    "agreement, tenant FROM predictions WHERE at >= {mark} ORDER BY at"
)


def read(url: str, since: float) -> Report:
    """The report of the log at `url` from Unix time `since` on."""
    conn = connect_to_read(url)
    mark = "%s" if url.startswith(("postgresql://", "postgres://")) else "?"
    try:
        cur = conn.cursor()
        cur.execute(QUERY.format(mark=mark), (since,))
        return summarize(cur.fetchall())
    finally:
        conn.close()


def summarize(rows: Iterable[tuple[object, ...]]) -> Report:
    """Rows of `QUERY` into the per-hour tables."""
    requests: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    inputs: Counter[tuple[str, str, str]] = Counter()
    errors: Counter[tuple[str, str, str]] = Counter()
    latency: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    labels: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    agreement: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    shadow_inputs: Counter[tuple[str, str, str, str]] = Counter()
    tenants: dict[tuple[str, str], _Tally] = defaultdict(_Tally)
    for (at, model, version, shadow, against, request_id, status, latency_ms, label, agree,
         tenant) in rows:  # fmt: skip
        hour = time.strftime("%Y-%m-%d %H:00", time.gmtime(float(at)))  # type: ignore[arg-type]
        if shadow:
            key4 = (hour, str(model), str(against), str(version))
            shadow_inputs[key4] += 1
            if agree is not None:
                agreement[key4].append(float(agree))  # type: ignore[arg-type]
            continue
        if tenant is not None:
            tenants[hour, str(tenant)].add(str(request_id), status, latency_ms)
        key = (hour, str(model), str(version))
        requests[key].add(str(request_id))
        inputs[key] += 1
        if status != "ok":
            errors[key] += 1
            continue
        if latency_ms is not None:
            latency[key][str(request_id)] = float(latency_ms)  # type: ignore[arg-type]
        if label is not None:
            labels[key][str(label)] += 1
    versions = []
    for key in sorted(inputs):
        times = np.asarray(list(latency[key].values()))
        counted = labels[key]
        total = sum(counted.values())
        versions.append(VersionHour(
            *key, requests=len(requests[key]), inputs=inputs[key], errors=errors[key],
            p50_ms=float(np.percentile(times, 50)) if times.size else None,
            p99_ms=float(np.percentile(times, 99)) if times.size else None,
            labels={name: n / total for name, n in counted.most_common()} if total else {},
        ))  # fmt: skip
    shadows = [
        ShadowHour(*key, inputs=shadow_inputs[key],
                   agreement=float(np.mean(agreement[key])) if agreement[key] else None)
        for key in sorted(shadow_inputs)
    ]  # fmt: skip
    return Report(versions, shadows, [tally.hour(*key) for key, tally in sorted(tenants.items())])


@dataclass(slots=True)
class _Tally:
    requests: set[str] = field(default_factory=set)
    inputs: int = 0
    errors: int = 0
    latency: dict[str, float] = field(default_factory=dict)
    """Each request's latency (its rows share it)."""

    def add(self, request_id: str, status: object, latency_ms: object) -> None:
        self.requests.add(request_id)
        self.inputs += 1
        if status != "ok":
            self.errors += 1
        elif latency_ms is not None:
            self.latency[request_id] = float(latency_ms)  # type: ignore[arg-type]

    def hour(self, hour: str, tenant: str) -> TenantHour:
        times = np.asarray(list(self.latency.values()))
        p50 = float(np.percentile(times, 50)) if times.size else None
        p99 = float(np.percentile(times, 99)) if times.size else None
        return TenantHour(hour, tenant, len(self.requests), self.inputs, self.errors, p50, p99)


def render(report: Report) -> str:
    """The report as text tables."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = ["requests per version and hour (UTC)",
             f"{'hour':<17} {'model@version':<24} {'requests':>8} {'inputs':>8} "
             f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"]  # fmt: skip
    for v in report.versions:
        name = f"{v.model}@{v.version}"
        lines.append(f"{v.hour:<17} {name:<24} {v.requests:>8} {v.inputs:>8} "
                     f"{ms(v.p50_ms):>8} {ms(v.p99_ms):>8} {v.errors:>7}")  # fmt: skip
    labelled = [v for v in report.versions if v.labels]
    if labelled:
        lines += ["", "label shares per version and hour"]
        for v in labelled:
            shares = ", ".join(f"{name} {share:.1%}" for name, share in v.labels.items())
            lines.append(f"{v.hour:<17} {v.model}@{v.version:<18} {shares}")
    if report.tenants:
        lines += ["", "requests per tenant and hour",
                  f"{'hour':<17} {'tenant':<24} {'requests':>8} {'inputs':>8} "
                  f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"]  # fmt: skip
        for t in report.tenants:
            lines.append(f"{t.hour:<17} {t.tenant:<24} {t.requests:>8} {t.inputs:>8} "
                         f"{ms(t.p50_ms):>8} {ms(t.p99_ms):>8} {t.errors:>7}")  # fmt: skip
    if report.shadows:
        lines += ["", "shadow agreement per hour (cosine, same label, or rank correlation)",
                  f"{'hour':<17} {'model':<12} {'primary':<10} {'shadow':<10} {'inputs':>8} "
                  f"{'agreement':>10}"]  # fmt: skip
        for s in report.shadows:
            agree = "-" if s.agreement is None else f"{s.agreement:.4f}"
            lines.append(f"{s.hour:<17} {s.model:<12} {s.primary:<10} {s.shadow:<10} "
                         f"{s.inputs:>8} {agree:>10}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="microbatch log",
        description="What the prediction log (--log-url) says: requests, latency p50/p99 "
        "and errors per version and hour; label shares; shadow agreement; the same per "
        "tenant.",
    )
    parser.add_argument("url", help="the log: a SQLite file, sqlite:///FILE or postgresql://...")
    parser.add_argument("--hours", type=float, default=24.0, help="how far back (default 24)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    try:
        report = read(args.url, time.time() - args.hours * 3600)
    except (ValueError, FileNotFoundError) as exc:
        print(f"microbatch log: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    return 0
