"""Which version of a model answers a request that names the model: the traffic split
(a canary) and the shadow shares, set by `--route` and `PATCH /admin/routes`.

Pure and torch-free. A request with a route key (`X-Route-Key`, else its API key) lands
in one point of [0, 1) that depends only on the key and the model's name, so one user
stays on one version while the weights stand (and, when the last-listed version's
weight grows, only users move to it, never away from it). A request without a key draws
its point at random. Versions not ready to serve are left out and the rest share their
weight; a route whose every weighted version is unready falls back to the model's first
version (the caller's `fallback`)."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Container, Mapping
from dataclasses import dataclass, field

SHADOW = "shadow"
"""The key of a route's shadow shares (so no version may be called that)."""


@dataclass(frozen=True, slots=True)
class Route:
    """One model's split: each version's weight, in order, and the share of its
    requests mirrored to each shadow version."""

    weights: tuple[tuple[str, int], ...]
    shadow: tuple[tuple[str, float], ...] = ()

    def versions(self) -> set[str]:
        return {v for v, _ in self.weights} | {v for v, _ in self.shadow}

    def takes_traffic(self, version: str) -> bool:
        return any(v == version and w > 0 for v, w in self.weights)

    def without(self, version: str) -> Route:
        """This route once `version` is unloaded."""
        return Route(
            tuple((v, w) for v, w in self.weights if v != version),
            tuple((v, s) for v, s in self.shadow if v != version),
        )

    def as_json(self) -> dict[str, object]:
        found: dict[str, object] = dict(self.weights)
        if self.shadow:
            found[SHADOW] = dict(self.shadow)
        return found


@dataclass(frozen=True, slots=True)
class RoutePatch:
    """What a `PATCH /admin/routes` entry changes: the weights, the shadow shares, or
    both (None: left as they are)."""

    weights: tuple[tuple[str, int], ...] | None = None
    shadow: tuple[tuple[str, float], ...] | None = None

    def applied_to(self, route: Route) -> Route:
        return Route(
            route.weights if self.weights is None else self.weights,
            route.shadow if self.shadow is None else self.shadow,
        )


@dataclass(slots=True)
class Picked:
    """The version that answers, and those that shadow the request."""

    version: str
    shadows: list[str] = field(default_factory=list)


def point(model: str, key: str | None) -> float:
    """Where a request lands in [0, 1): fixed by its key (and the model), else random."""
    if key is None:
        return random.random()
    digest = hashlib.blake2b(f"{model}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick(route: Route, ready: Container[str], at: float) -> str | None:
    """The version whose stretch of [0, 1) holds `at`, among the ready versions with a
    weight; None when none is ready."""
    live = [(v, w) for v, w in route.weights if w > 0 and v in ready]
    total = sum(w for _, w in live)
    if not total:
        return None
    left = at * total
    for version, weight in live:
        if left < weight:
            return version
        left -= weight
    return live[-1][0]


def shares(route: Route, ready: Container[str]) -> dict[str, float]:
    """Each ready version's share of the requests `route` sends now (`pick`'s odds)."""
    live = [(v, w) for v, w in route.weights if w > 0 and v in ready]
    total = sum(w for _, w in live)
    return {v: w / total for v, w in live} if total else {}


def shadows(route: Route, answering: str, ready: Container[str], draw: float) -> list[str]:
    """The versions a request answered by `answering` is mirrored to: each ready shadow
    version (other than the one answering) whose share exceeds `draw`."""
    return [v for v, share in route.shadow if v != answering and v in ready and draw < share]


def parse_patch(entry: object, where: str) -> RoutePatch:
    """One model's entry: `{"v1": 95, "v2": 5, "shadow": {"v2": 0.2}}`. Raises
    ValueError naming what is wrong."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: give an object of version weights, e.g. {{'v1': 95}}")
    weights: list[tuple[str, int]] = []
    shadow: list[tuple[str, float]] | None = None
    for version, value in entry.items():
        if version == SHADOW:
            shadow = _shadow(value, f"{where}.{SHADOW}")
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}.{version}: a weight is a whole number >= 0, got {value!r}")
        weights.append((str(version), value))
    if weights and not any(w for _, w in weights):
        raise ValueError(f"{where}: at least one version needs a weight above 0")
    return RoutePatch(
        tuple(weights) if weights else None, None if shadow is None else tuple(shadow)
    )


def _shadow(value: object, where: str) -> list[tuple[str, float]]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: give an object of shares, e.g. {{'v2': 0.2}}")
    found = []
    for version, share in value.items():
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise ValueError(f"{where}.{version}: a shadow share is between 0 and 1, got {share!r}")
        found.append((str(version), float(share)))
    return found


def parse_routes(text: str) -> dict[str, RoutePatch]:
    """`--route`'s JSON: model name to its entry. Raises ValueError."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--route is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError('--route: give an object, e.g. {"emb": {"v1": 95, "v2": 5}}')
    return {str(name): parse_patch(entry, f"--route {name}") for name, entry in value.items()}
