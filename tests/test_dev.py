"""dev.py, the two commands of a fresh checkout: what it sets up, and that it sets up
nothing the second time. (CI runs `python3 dev.py test` itself on a clean clone.)"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dev() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_a_fresh_checkout_gets_a_venv_the_pinned_cpu_torch_and_the_dev_extra(
    checkout: Path,
) -> None:
    commands = dev().plan(checkout, cuda=False)
    assert commands[0] == [sys.executable, "-m", "venv", str(checkout / ".venv")]
    pip = [str(checkout / ".venv/bin/python"), "-m", "pip", "install", "--quiet"]
    constraints = str(checkout / "constraints.txt")
    assert commands[1:] == [
        [*pip, "--upgrade", "pip"],
        [*pip, "torch", "-c", constraints],
        [*pip, "-e", f"{checkout}[dev]", "-c", constraints],
    ]
    assert "torch==2.13.0" in (checkout / "constraints.txt").read_text()


def test_with_an_nvidia_driver_torch_is_pips_default_build_without_the_pins(
    checkout: Path,
) -> None:
    commands = dev().plan(checkout, cuda=True)
    assert [c[5:] for c in commands[2:]] == [["torch"], ["-e", f"{checkout}[dev]"]]


def test_a_set_up_checkout_needs_nothing_until_its_inputs_change(checkout: Path) -> None:
    module = dev()
    python = checkout / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    stamp = checkout / ".venv/microbatch-setup.json"
    stamp.write_text(json.dumps(module.wanted(checkout, False)))
    assert module.plan(checkout, cuda=False) == []
    assert module.plan(checkout, cuda=True) != [], "another torch build: set up again"
    with (checkout / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n# changed\n")
    again = module.plan(checkout, cuda=False)
    assert again != []
    assert all("venv" not in command[2] for command in again), "the venv itself is kept"
    stamp.write_text("{not json")
    assert module.plan(checkout, cuda=False) != []


def test_the_commands_run_the_server_and_the_suite_with_the_rest_of_the_line() -> None:
    def dry(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, str(ROOT / "dev.py"), *args, "--dry-run"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return done.stderr.strip().splitlines()[-1]

    venv_bin = ROOT / ".venv/bin"
    assert dry("serve", "--port", "9000") == f"+ {venv_bin / 'microbatch'} serve --port 9000"
    assert dry("test", "-m", "not slow") == f"+ {venv_bin / 'pytest'} -m not slow"
