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
