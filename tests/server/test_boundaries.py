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
    root = SERVER.parent / "benchmarks"

    def sibling_imports(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
                found |= {alias.name for alias in node.names}  # from benchmarks import x
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
                found.add(node.module.split(".")[1])  # type: ignore[union-attr]
        return found

    graph = {path.stem: sibling_imports(path) for path in root.glob("*.py")}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, set()) - seen:
            if nxt == target or reaches(nxt, target, seen | {nxt}):
                return True
        return False

    assert "compare" in graph["bench"], "imports inside functions count too (--compare)"
    circles = sorted(name for name in graph if reaches(name, name, set()))
    assert circles == [], f"modules on an import circle: {circles}"
