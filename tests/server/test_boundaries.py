"""The arrows between the packages, read from the source: `server` reaches torch only
through `batcher.models`, uses the engine's public names, and reaches `benchmarks` only
through the `microbatch` command's declared table of tools."""

from __future__ import annotations

import ast
from pathlib import Path

import server
from server import cli

SERVER = Path(server.__file__).parent


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module, imported inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(fn)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in nested) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in nested))
    return found


def test_server_imports_no_torch_no_engine_internals_and_no_benchmarks_at_module_level() -> None:
    for path in sorted(SERVER.rglob("*.py")):
        for module, in_function in imports(path):
            top = module.split(".")[0]
            assert top not in ("torch", "transformers"), f"{path.name} imports {module}"
            if top == "batcher":
                assert module in ("batcher", "batcher.models"), f"{path.name} imports {module}"
            if top == "benchmarks":
                assert (path.name, in_function) == ("cli.py", True), f"{path.name}: {module}"


def test_every_tool_of_the_command_is_declared_and_listed_in_the_usage() -> None:
    assert sorted(cli.TOOLS) == ["bench", "plot", "soak", "sweep"]
    for name in cli.TOOLS:
        assert f"  {name} " in cli.USAGE


def test_the_benchmark_modules_import_one_another_without_a_circle() -> None:
    """The load tool and the lab (benchmarks/lab/) alike."""
    graph = module_graph("benchmarks")
    for package in ("benchmarks", "benchmarks.lab"):
        graph[package] = set()  # a package's __init__: an arrow down, not a loop
    assert "benchmarks.compare" in graph["benchmarks.bench"], "imports inside functions count"
    assert "benchmarks.lab.overhead" in graph["benchmarks.lab.engine_cpu"], "the lab is read"
    assert circles(graph) == []


FRONT_END = """
import asyncio, sys
import httpx
from asgi_lifespan import LifespanManager
from server import cli, workers
from server.app import create_app
from server.settings import Settings

async def main() -> None:
    app = create_app(Settings(), engine_path="no-engine-here.sock")
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://front-end") as c:
            assert (await c.get("/health")).status_code == 200
            assert (await c.get("/ready")).status_code == 503  # no engine: warming
            reply = await c.post("/predict", json={"text": "hello"})
            assert reply.status_code == 503, reply.text

asyncio.run(main())
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print("heavy:", heavy)
print("host:", "server.host" in sys.modules)
"""


def test_a_front_end_imports_neither_torch_nor_transformers() -> None:
    """What a front-end process of `--workers N` loads, run for real: the modules the
    supervisor's spawn imports, the app, its lifespan with the remote client, and
    requests through every layer. torch, transformers and the engine side
    (`server.host`) stay out."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FRONT_END],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=SERVER.parent,
    )
    assert done.returncode == 0, done.stderr
    assert "heavy: []" in done.stdout, done.stdout
    assert "host: False" in done.stdout, done.stdout


def module_graph(*packages: str) -> dict[str, set[str]]:
    """Each module of `packages` and the modules of those packages it imports, at module
    level or inside a function (`from server import logs` names `server.logs`)."""
    root = SERVER.parent
    modules = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_in_batcher_or_server() -> None:
    """Packages importing their own submodules (`batcher/__init__.py`) aside, no module
    of batcher/ or server/ reaches itself through its imports, in functions too."""
    graph = module_graph("batcher", "server")
    for package in ("batcher", "batcher.models", "server", "server.routes"):
        graph[package] = set()  # a package's __init__ re-exports: an arrow down, not a loop
    assert circles(graph) == []
    # The check can fail: a circle put in by hand is found.
    graph["server.tokenizing"].add("server.served")
    assert ["server.served", "server.tokenizing"] in circles(graph)


def test_no_module_of_batcher_or_server_is_over_450_lines_and_the_engine_under_375() -> None:
    root = SERVER.parent
    sizes = {
        str(path.relative_to(root)): len(path.read_text(encoding="utf-8").splitlines())
        for package in ("batcher", "server")
        for path in (root / package).rglob("*.py")
    }
    assert {path: n for path, n in sizes.items() if n > 450} == {}
    assert sizes["batcher/engine.py"] <= 375
