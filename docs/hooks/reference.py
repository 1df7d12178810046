"""mkdocs hook: the reference pages, made from the code at every build so that they cannot
drift from it.

- `reference/settings.md`: every field of `server.settings.Settings`, with its flag, its
  environment variable, its default and its description.
- `reference/cli.md`: the `--help` of `microbatch` and of the subcommands users run, as
  their own argparse parsers print it.
- `reference/open-inference-protocol.md`: each task's tensors, the parameters and the
  gRPC status codes of `server/kserve/`.
- `reference/metrics.md`: every metric family of `/metrics`, read from a real app
  (`create_app` on the tests' fake model, its lifespan run in process), and the GPU memory
  gauges, which exist only on CUDA, from their collector.

The pages exist only in the build (mkdocs `on_files`), never in the tree. The figures of
`benchmarks/results/` are published under the same path, so that a page's link
`../benchmarks/results/NAME.png` works on GitHub and on the site alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files

REPO = Path(__file__).resolve().parents[2]
FIGURES = "benchmarks/results"

CLI_COMMANDS: tuple[tuple[str, list[str]], ...] = (
    ("microbatch", []),
    ("microbatch serve", ["serve"]),
    ("microbatch log", ["log"]),
    ("microbatch key", ["key"]),
    ("microbatch bench", ["bench"]),
    ("microbatch bench --compare", ["bench", "--compare"]),
    ("microbatch sweep", ["sweep"]),
    ("microbatch plot", ["plot"]),
    ("microbatch soak", ["soak"]),
)
"""The commands whose `--help` the CLI page shows, and their arguments before `--help`."""

HELP_COLUMNS = "100"
"""The width argparse wraps help to, fixed so that the page does not follow the terminal."""


def _importable() -> None:
    """The repository's packages (and `tests`, for the fake model) importable by the hook."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def _cell(text: str) -> str:
    """Text made safe for one cell of a Markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


# -- settings ---------------------------------------------------------------------------


def _choices(annotation: Any) -> list[str]:
    """The values of a `Literal[...]` setting (also inside `X | None`), else none."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    for arg in typing.get_args(annotation):
        found = _choices(arg)
        if found:
            return found
    return []


def _default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def settings_rows() -> Iterator[tuple[str, str, str, str]]:
    """(flag, environment variable, default, description) of every setting, in the
    order of `microbatch serve --help`."""
    _importable()
    from server.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            flag = f"{flag} / --no-{name.replace('_', '-')}"
        description = field.description or ""
        choices = _choices(field.annotation)
        if choices:
            description += " One of: " + ", ".join(f"`{c}`" for c in choices) + "."
        variable = f"{prefix}{name}".upper()
        yield f"`{flag}`", f"`{variable}`", _default(field.default), _cell(description)


def settings_page() -> str:
    lines = [
        "# Settings",
        "",
        "Generated from `server.settings.Settings` when the docs are built. Every setting is",
        "a flag of `microbatch serve` and an environment variable; a flag wins over the",
        "variable, and the variable over the default. [Configuration](../configuration.md)",
        "explains the settings by topic; [the CLI page](cli.md) has `microbatch serve --help`.",
        "",
        "| flag | environment variable | default | description |",
        "|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in settings_rows()]
    return "\n".join(lines) + "\n"


# -- the tenants file -------------------------------------------------------------------


def tenants_page() -> str:
    """Every key of a tenants file, from the pydantic models that read it."""
    _importable()
    from server.tenants import KeyEntry, TenantLimits

    lines = [
        "# The tenants file",
        "",
        "Generated from `server/tenants.py` when the docs are built. A TOML file given by",
        "`--tenants-file`; [Tenants and keys](../tenants.md) explains it. A limit left out",
        "is no limit; a tenant's own section overrides `[defaults]` key by key.",
        "",
        "## `[defaults]` and `[tenants.NAME]`",
        "",
        "| key | default | description |",
        "|---|---|---|",
    ]
    for name, field in TenantLimits.model_fields.items():
        lines.append(f"| `{name}` | {_default(field.default)} | {_cell(field.description or '')} |")
    lines += ["", "## `[[keys]]`", "", "| key | default | description |", "|---|---|---|"]
    for name, field in KeyEntry.model_fields.items():
        default = "required" if field.is_required() else _default(field.default)
        lines.append(f"| `{name}` | {default} | {_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def _json_types(schema: dict[str, Any]) -> list[str]:
    """A JSON schema's types: `boolean`, `integer`, an enum's values; null left out."""
    if "enum" in schema:
        return [str(v) for v in schema["enum"]]
    if "anyOf" in schema:
        return [t for option in schema["anyOf"] for t in _json_types(option)]
    kind = schema.get("type")
    return [] if kind in (None, "null") else [str(kind)]


def protocol_page() -> str:
    """The Open Inference Protocol as served: each task's tensors, the parameters and the
    gRPC code of each HTTP status, from `server/kserve/`."""
    _importable()
    from benchmarks.lab.null_model import NullEncoder
    from server.kserve.grpc_service import CODES
    from server.kserve.signatures import IGNORED, NOT_FOR_TENSORS, Parameters, inputs_of, outputs_of
    from tests.server.fakes import FakeImageModel

    def tensors(specs: Any, wide: str) -> str:
        shown = []
        for spec in specs:
            dims = [wide if i == 1 and d in (-1, 0) else str(d) for i, d in enumerate(spec.shape)]
            shown.append(f"`{spec.name}` {spec.datatype} [{', '.join(dims)}]")
        return "<br>".join(shown)

    lines = [
        "# The Open Inference Protocol",
        "",
        "Generated from `server/kserve/` when the docs are built; [Triton and KServe",
        "clients](../kserve.md) explains it. `-1`: any size; `n` texts a request.",
        "",
        "## Tensors, by task",
        "",
        "| task | inputs | outputs |",
        "|---|---|---|",
    ]
    for task, wide in (("embed", "d"), ("classify", "labels"), ("rerank", "")):
        model = NullEncoder(task, labels=())  # type: ignore[arg-type]
        lines.append(f"| {task} | {tensors(inputs_of(model), wide)} | "
                     f"{tensors(outputs_of(model), wide)} |")  # fmt: skip
    for task, wide, what in (("classify", "labels", "image classifier"),
                             ("embed", "d", "CLIP, SigLIP")):  # fmt: skip
        image = FakeImageModel(task=task).encoder  # type: ignore[arg-type]
        lines.append(f"| {task} ({what}) | {tensors(inputs_of(image), wide)} | "
                     f"{tensors(outputs_of(image), wide)} |")  # fmt: skip
    lines += ["", "## Parameters", "", "| parameter | type | description |", "|---|---|---|"]
    schema = Parameters.model_json_schema()["properties"]
    for name, field in Parameters.model_fields.items():
        if name not in NOT_FOR_TENSORS:
            kind = _cell(" | ".join(_json_types(schema[name])))
            lines.append(f"| `{name}` | {kind} | {_cell(field.description or '')} |")
    ignored = ", ".join(f"`{n}`" for n in sorted(IGNORED))
    lines += ["", f"Accepted and ignored: {ignored}.", "", "## gRPC status codes", ""]
    lines += ["| HTTP status | gRPC code |", "|---|---|"]
    lines += [f"| {status} | `{code.name}` |" for status, code in CODES.items()]
    lines += ["| any other | `INTERNAL` |"]
    return "\n".join(lines) + "\n"


# -- command line -----------------------------------------------------------------------


def command_help(args: list[str]) -> str:
    """What `microbatch ARGS --help` prints, from the real parsers, at a fixed width."""
    _importable()
    from server.cli import main

    out = io.StringIO()
    saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR")}
    os.environ.update(COLUMNS=HELP_COLUMNS, NO_COLOR="1")
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*args, "--help"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    text = out.getvalue().rstrip()
    if not text:
        raise RuntimeError(f"microbatch {' '.join(args)} --help printed nothing")
    return text


def cli_page() -> str:
    lines = [
        "# Command line",
        "",
        "Generated from the command's own parsers when the docs are built: what each",
        "`--help` prints. `microbatch key` makes a tenant's API key",
        "([Tenants and keys](../tenants.md)); `microbatch log` reads the prediction log",
        "([Rolling out a new version](../versions.md)). `microbatch bench`, `sweep`, `plot`",
        "and `soak` need the `bench` extra; [Load testing](../benchmarking.md) shows them at",
        "work, and",
        "[Settings](settings.md) has every flag of `microbatch serve` as a table.",
    ]
    for title, args in CLI_COMMANDS:
        lines += ["", f"## `{title}`", "", "```text", command_help(args), "```"]
    return "\n".join(lines) + "\n"


# -- metrics ----------------------------------------------------------------------------


SHADOWED = ("emb", "cls", "rr")
"""The docs' scrape serves these fake models in two versions each, the second a shadow
of the first, so that every shadow family has a child."""


async def _scrape_fake_server() -> str:
    """`/metrics` of the real app on the tests' fake models after one prediction each
    (so that every labelled family has a child to show its labels), with the prediction
    log on and a shadow version of each."""
    import json
    import tempfile

    from server.app import create_app
    from server.settings import Settings
    from tests.server.fakes import FakeImageModel, FakeTextModel

    tasks = {"emb": "embed", "cls": "classify", "rr": "rerank"}
    models = {
        f"{name}@{version}": FakeTextModel(name=name, task=task)  # type: ignore[arg-type]
        for name, task in tasks.items()
        for version in ("1", "2")
    }
    models["img"] = FakeImageModel(name="img")  # type: ignore[assignment]
    route = json.dumps({name: {"1": 1, "shadow": {"2": 1.0}} for name in SHADOWED})
    with tempfile.TemporaryDirectory() as directory:
        tenants = Path(directory) / "tenants.toml"
        tenants.write_text(TENANTS)
        settings = Settings(route=route, log_url=f"sqlite:///{directory}/log.db", drift_window=1,
                            tenants_file=tenants, grpc_port=0)  # fmt: skip
        return await _scrape(create_app(settings, model=models))


TENANTS = """
[[keys]]
key = "docs-key"
tenant = "docs"
[[keys]]
key = "docs-other"
tenant = "other-team"
scopes = ["predict:elsewhere"]
"""
"""The scrape's tenants: one whose requests are answered, one refused for its scope."""
KEY = {"Authorization": "Bearer docs-key"}
TINY_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGNkYGRiZmZmYWNjY2ZmBgABFwAtLr"
    "t4pAAAAABJRU5ErkJggg=="
)
"""A 2 x 2 PNG, for the image model's families."""


async def _scrape(app: Any) -> str:
    import httpx
    from asgi_lifespan import LifespanManager

    async with (
        LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://docs"
        ) as client,
    ):
        async with asyncio.timeout(60):
            # the server's state, polled (nothing of ours to wait on)
            while (await client.get("/ready")).status_code != 200:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        image = {"image": TINY_PNG, "model": "img"}
        (await client.post("/predict", json=image, headers=KEY)).raise_for_status()
        # Twice each: the first answers make the drift references (a window of 1), the
        # second the recent windows.
        for _ in range(2):
            for name in ("emb", "cls"):
                body = {"text": "counted", "model": name}
                (await client.post("/predict", json=body, headers=KEY)).raise_for_status()
            ranked = {"query": "q", "texts": ["a", "bb"], "model": "rr"}
            (await client.post("/rerank", json=ranked, headers=KEY)).raise_for_status()
        # The second round may be answered from the result cache, which drift does not
        # count: a text not seen before makes the classifier's recent window for certain.
        fresh = {"text": "counted once more", "model": "cls"}
        (await client.post("/predict", json=fresh, headers=KEY)).raise_for_status()
        other = {"Authorization": "Bearer docs-other"}
        refused = await client.post("/predict", json={"text": "x", "model": "emb"}, headers=other)
        assert refused.status_code == 403, refused.text
        async with asyncio.timeout(60):
            # the shadows answer in the background: wait for each one's first comparison
            while not _settled((await client.get("/metrics")).text):  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        return (await client.get("/metrics")).text


def _settled(exposition: str) -> bool:
    """Whether the shadows have compared on each model, the reranker's ranks among them,
    and the classifier's drift has a recent window: the families made in the background."""
    return exposition.count('outcome="compared"') >= 3 and all(
        name in exposition
        for name in ("microbatch_shadow_rank_correlation_count{", "microbatch_drift_psi{")
    )


def _gpu_exposition() -> str:
    """The GPU memory gauges as one CUDA device would show them: the collector read with
    empty allocator statistics in place of torch's (no torch, no GPU needed)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from batcher.models.memory import GpuMemoryCollector

    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector(["cuda:0"], stats=lambda device: {}))
    return generate_latest(registry).decode()


Family = tuple[str, str, str, tuple[str, ...]]
"""(name as queried, type, help, labels) of one metric family."""


def metric_families(exposition: str) -> list[Family]:
    """Every family in a Prometheus text exposition, less the `_created` companions that
    prometheus_client exposes beside counters and histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(exposition))
    names = {f.name for f in families}
    found: list[Family] = []
    for family in families:
        if family.name.endswith("_created") and family.name.removesuffix("_created") in names:
            continue
        if not family.samples and family.name.startswith("microbatch_"):
            raise RuntimeError(
                f"{family.name} has no sample in the docs' scrape, so its labels are unknown: "
                "make docs/hooks/reference.py's scrape exercise it"
            )
        labels = sorted({k for s in family.samples for k in s.labels if k not in ("le",)})
        name = family.name + ("_total" if family.type == "counter" else "")
        found.append((name, family.type, family.documentation, tuple(labels)))
    return found


def metrics_rows() -> tuple[list[Family], list[Family]]:
    """(every family a server on any device exposes, those a CUDA device adds)."""
    _importable()
    served = metric_families(asyncio.run(_scrape_fake_server()))
    gpu = metric_families(_gpu_exposition())
    return served, gpu


def metrics_page() -> str:
    served, gpu = metrics_rows()
    head = ["| metric | type | labels | help |", "|---|---|---|---|"]

    def rows(families: list[Family]) -> list[str]:
        return [
            f"| `{name}` | {kind} | {', '.join(f'`{x}`' for x in labels) or '—'} | {_cell(doc)} |"
            for name, kind, doc, labels in families
        ]

    ours = sorted(f for f in served if f[0].startswith("microbatch_"))
    process = sorted(f for f in served if not f[0].startswith("microbatch_"))
    lines = [
        "# Metrics",
        "",
        "Generated when the docs are built, from what `GET /metrics` serves: the real app",
        "(`server.app.create_app`) on the tests' fake model, after one prediction. A",
        "histogram `NAME` is exposed as `NAME_bucket`, `NAME_sum` and `NAME_count`; a",
        "counter `NAME_total` comes with `NAME_created` (prometheus_client's start time of",
        "each series). With `--workers N`, any front-end answers with the engine process's",
        "metrics and every front-end's request counters, summed, each family once.",
        "[Monitoring](../monitoring.md) says what to watch and how to read it.",
        "",
        "## On every device",
        "",
        *head,
        *rows(ours),
        "",
        "## On CUDA only",
        "",
        "A server with a CUDA device adds its GPU memory, read from torch's caching",
        "allocator at each scrape (`batcher/models/memory.py`), one series per device:",
        "",
        *head,
        *rows(gpu),
        "",
        "## The process",
        "",
        "prometheus_client's process collector (Linux); with `--workers N`, the engine",
        "process's.",
        "",
        *head,
        *rows(process),
    ]
    return "\n".join(lines) + "\n"


# -- mkdocs -----------------------------------------------------------------------------

PAGES: dict[str, Callable[[], str]] = {
    "reference/settings.md": settings_page,
    "reference/cli.md": cli_page,
    "reference/metrics.md": metrics_page,
    "reference/tenants-file.md": tenants_page,
    "reference/open-inference-protocol.md": protocol_page,
}
"""Each generated page, by its path in the site's docs, and what writes it."""


def on_files(files: Files, config: MkDocsConfig) -> Files:
    from mkdocs.structure.files import File, InclusionLevel

    for uri, make in PAGES.items():
        files.append(File.generated(config, uri, content=make()))
    docs_dir = Path(config.docs_dir)
    for figure in sorted((REPO / FIGURES).rglob("*.png")):
        relative = figure.relative_to(REPO).as_posix()
        files.append(
            File(
                os.path.relpath(figure, docs_dir),
                src_dir=str(docs_dir),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
                dest_uri=relative,
                # included by name: mkdocs would take a path starting with a dot as hidden
                inclusion=InclusionLevel.INCLUDED,
            )
        )
    return files
