"""What `--model` names: a model to serve, its served name and its version."""

from __future__ import annotations

import re
from dataclasses import dataclass

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""A served model's name: what clients put in `model`."""

VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A model's version: what follows `@` in `NAME@VERSION`."""

DEFAULT_VERSION = "1"
"""The version of a model served without one (`--model NAME=PATH`), as Triton's."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model to serve: its name (None: named after its source), its source (a
    directory or a hub id; None: the built-in model) and its version (None: given
    none, served as `DEFAULT_VERSION`)."""

    name: str | None
    source: str | None
    version: str | None = None

    @classmethod
    def parse(cls, entry: str) -> ModelSpec:
        """`NAME=PATH`, `NAME@VERSION=PATH` or `PATH`. Raises ValueError for a
        malformed name or version."""
        name, sep, source = entry.partition("=")
        if not sep:
            return cls(None, entry)
        name, source = name.strip(), source.strip()
        name, at, version = name.partition("@")
        check_name(name, version if at else None, f"--model {entry!r}")
        if not source:
            raise ValueError(f"--model {entry!r}: no path after =")
        return cls(name, source, version if at else None)

    @property
    def served_version(self) -> str:
        return self.version if self.version is not None else DEFAULT_VERSION

    @property
    def key(self) -> str:
        """`NAME@VERSION` (the served name alone for an unversioned model): what names
        this version in metrics, in the cache and in `DELETE /admin/models/...`."""
        name = self.name or ""
        return name if self.version is None else f"{name}@{self.version}"


def check_name(name: str, version: str | None, where: str) -> None:
    """Raises ValueError unless `name` (and `version`) are well formed."""
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"{where}: a model's name is letters, digits and . _ : -, starting with a "
            f"letter or digit (NAME@VERSION gives a version)"
        )
    if version is not None and not VERSION.fullmatch(version):
        raise ValueError(
            f"{where}: a version is letters, digits and . _ -, starting with a letter or digit"
        )
