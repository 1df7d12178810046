"""Regenerate the KServe schema fixtures that `tests/deploy/test_kserve.py` validates the
manifests of `deploy/kserve/` against: the `openAPIV3Schema` of two of KServe's CRDs, as
minified JSON, gzipped (the InferenceService CRD is about 2 MB of YAML).

    python tests/deploy/kserve_crds/extract.py PATH/TO/KSERVE-CHECKOUT

The output is byte-for-byte reproducible (no timestamp in the gzip header), so a diff
after regenerating means the schemas changed."""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent

SOURCES = {
    "servingruntimes.v1alpha1.json.gz": (
        "config/crd/full/serving.kserve.io_servingruntimes.yaml",
        "v1alpha1",
    ),
    "inferenceservices.v1beta1.json.gz": (
        "config/crd/full/serving.kserve.io_inferenceservices.yaml",
        "v1beta1",
    ),
}
"""Fixture file name: (the CRD's path in a KServe checkout, the version whose schema)."""


def schema_of(crd_path: Path, version: str) -> dict[str, Any]:
    """The `openAPIV3Schema` of `version` in the CRD at `crd_path`. Raises ValueError when
    the CRD has no such version."""
    crd = yaml.safe_load(crd_path.read_text())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema: dict[str, Any] = entry["schema"]["openAPIV3Schema"]
            return schema
    served = ", ".join(entry["name"] for entry in crd["spec"]["versions"])
    raise ValueError(f"{crd_path} has no version {version!r}; it has: {served}")


def write_fixture(schema: dict[str, Any], target: Path) -> None:
    data = json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode()
    with target.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        out.write(data)


def commit_of(checkout: Path) -> str:
    """The checkout's commit, or a note that it is not a git work tree."""
    found = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"],
                           capture_output=True, text=True, check=False)  # fmt: skip
    return found.stdout.strip() if found.returncode == 0 else "(not a git checkout)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a checkout of github.com/kserve/kserve")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the fixtures")
    args = parser.parse_args(argv)
    for name, (source, version) in SOURCES.items():
        write_fixture(schema_of(args.checkout / source, version), args.out / name)
        print(f"{args.out / name}: {source} ({version})")
    print(f"KServe commit: {commit_of(args.checkout)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
