"""benchmarks/ has two rooms: the load tool (`microbatch bench/sweep/plot/soak` and what
they run) and the lab (benchmarks/lab/: studies and the GPU-lease run). The lab uses the
load tool and the server; neither the server nor the load tool reaches the lab, read from
the source and seen in a process that imports them all."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB = "benchmarks.lab"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load_tool() -> list[Path]:
    """Every module of benchmarks/ outside the lab."""
    root = REPO / "benchmarks"
    return sorted(p for p in root.rglob("*.py") if not p.is_relative_to(root / "lab"))


def references(source: str, module: str, is_package: bool = False) -> set[str]:
    """The modules that `source` (module `module`) imports, at any depth, relative imports
    resolved, or names as a whole string (`import_module("x.y")`, `python -m x.y`'s
    argument). Docstrings are prose, not arrows."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            origin = ".".join([*base, *([node.module] if node.module else [])])
            found.add(origin)
            found |= {f"{origin}.{alias.name}" for alias in node.names}  # from x import module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            words = node.value.split()
            if id(node) not in docstrings and len(words) == 1 and "." in words[0]:
                found.add(words[0])
    return found


def reaches_lab(source: str, module: str, is_package: bool = False) -> set[str]:
    return {
        name
        for name in references(source, module, is_package)
        if name == LAB or name.startswith(LAB + ".")
    }


def test_the_check_sees_every_way_to_reach_the_lab() -> None:
    """A check that finds nothing must be able to find something."""
    ways = {
        "import benchmarks.lab.overhead": "benchmarks.lab.overhead",
        "from benchmarks import lab": "benchmarks.lab",
        "from benchmarks.lab.null_model import NullModel": "benchmarks.lab.null_model",
        "from .lab import gpu_report": "benchmarks.lab",
        "from . import lab": "benchmarks.lab",
        "def f():\n    from benchmarks.lab import slo": "benchmarks.lab",
        "importlib.import_module('benchmarks.lab.slo')": "benchmarks.lab.slo",
        "server(['benchmarks.lab.overhead', '--serve'], log)": "benchmarks.lab.overhead",
    }
    for source, name in ways.items():
        assert name in reaches_lab(source, "benchmarks.sweep"), source
    assert reaches_lab("from . import lab", "benchmarks", is_package=True) == {"benchmarks.lab"}
    prose = '"""Measured with the null model of `benchmarks.lab.overhead`."""\n'
    assert reaches_lab(prose + "from benchmarks import labels", "benchmarks.sweep") == set()
    engine_cpu = REPO / "benchmarks" / "lab" / "engine_cpu.py"
    assert "benchmarks.lab.overhead" in reaches_lab(engine_cpu.read_text(), "x.engine_cpu")


def test_neither_the_server_nor_the_load_tool_imports_the_lab() -> None:
    paths = [*sorted((REPO / "server").rglob("*.py")), *load_tool()]
    assert REPO / "benchmarks" / "bench.py" in paths
    found = {
        str(path.relative_to(REPO)): sorted(names)
        for path in paths
        if (
            names := reaches_lab(
                path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py"
            )
        )
    }
    assert found == {}, f"the lab is reached from outside it: {found}"


def test_every_module_outside_the_lab_is_the_load_tools() -> None:
    """What `microbatch`'s subcommands import from benchmarks/, transitively, or run
    (`python -m`): a module outside the lab that none of them reaches is the lab's."""
    modules = {module_name(path): path for path in load_tool()}
    cli = (REPO / "server" / "cli.py").read_text(encoding="utf-8")
    pending = sorted(name for name in references(cli, "server.cli") if name in modules)
    assert "benchmarks.bench" in pending, "the command's tools are found"
    reached: set[str] = {"benchmarks"}
    while pending:
        name = pending.pop()
        if name not in reached:
            reached.add(name)
            path = modules[name]
            source = path.read_text(encoding="utf-8")
            found = references(source, name, path.name == "__init__.py")
            pending += [other for other in found if other in modules]
    assert "benchmarks.naive" in reached, "compare runs it with python -m"
    assert sorted(set(modules) - reached) == []


def test_importing_the_server_and_the_load_tool_loads_no_lab_module() -> None:
    modules = ["server.app", "server.cli", *(module_name(path) for path in load_tool())]
    probe = textwrap.dedent(f"""
        import importlib, json, sys
        for name in {modules!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m == "{LAB}" or m.startswith("{LAB}."))
        import benchmarks.lab.null_model  # the control: the probe does see a lab module
        control = sorted(m for m in sys.modules if m.startswith("{LAB}"))
        print(json.dumps([loaded, control]))
    """)
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    loaded, control = json.loads(done.stdout.splitlines()[-1])
    assert loaded == []
    assert "benchmarks.lab.null_model" in control
