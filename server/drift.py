"""Drift: each version's recent answers against a reference, in `/metrics` and on
`/dashboard`.

The reference is the version's first `--drift-window` answers after it was loaded, or
one put back from a saved file (`PUT /admin/drift/NAME@VERSION` with what `GET
/admin/drift` gave). The recent window is its last `--drift-window` answers. What is
compared depends on the task:

- classifiers: each label's share, and the population stability index (PSI) of the
  recent shares against the reference's (above 0.2 is read as a real shift);
- embedders: the mean cosine of the recent embeddings to the reference's centroid,
  beside the reference's own (a fall means the inputs moved away);
- rerankers: the 10th, 50th and 90th percentiles of the scores, recent and reference.

Each answer costs the loop an append (and, for an embedding, one dot product); the
statistics are computed when read."""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batcher import Result
from batcher.models import Classification, Output, SparseVector, TokenVectors
from server.served import Served

logger = logging.getLogger("microbatch.server")

QUANTILES = (0.1, 0.5, 0.9)
PSI_FLOOR = 1e-4
"""A share never counts below this in the PSI (a label unseen on one side would make it
infinite)."""


def psi(reference: dict[str, float], recent: dict[str, float]) -> float:
    """The population stability index of `recent` shares against `reference` shares."""
    total = 0.0
    for label in set(reference) | set(recent):
        r = max(reference.get(label, 0.0), PSI_FLOOR)
        n = max(recent.get(label, 0.0), PSI_FLOOR)
        total += (n - r) * math.log(n / r)
    return total


def shares(labels: Iterable[str]) -> dict[str, float]:
    counted = Counter(labels)
    total = sum(counted.values())
    return {label: n / total for label, n in counted.most_common()} if total else {}


@dataclass(slots=True)
class Reference:
    """What the recent window is compared with (a saved file holds one, as JSON)."""

    task: str
    answers: int
    label_shares: dict[str, float] = field(default_factory=dict)
    centroid: list[float] | None = None
    centroid_cosine: float | None = None
    """The reference answers' own mean cosine to their centroid."""
    score_quantiles: list[float] | None = None

    @classmethod
    def parse(cls, value: dict[str, Any]) -> Reference:
        """From its JSON. Raises ValueError."""
        try:
            return cls(**value)
        except TypeError as exc:
            raise ValueError(f"not a drift reference: {exc}") from None


class VersionDrift:
    """One version's windows; `observe` runs on the loop."""

    def __init__(
        self, model: str, version: str, task: str, window: int, dimension: int | None = None
    ) -> None:
        self.model, self.version, self.task, self.window = model, version, task, window
        self.dimension = dimension
        """An embedder's full width: answers cut to fewer `dimensions` by their request
        are left out (a centroid is of one width). None: the first answer's width."""
        self.failed = False
        """Set when observing raised (a bug): drift is off for this version from then on."""
        self.reference: Reference | None = None
        self._first: list[Output] = []
        self._labels: deque[str] = deque(maxlen=window)
        self._scores: deque[float] = deque(maxlen=window)
        self._cosines: deque[float] = deque(maxlen=window)
        self._unit_centroid: np.ndarray[Any, Any] | None = None

    def observe(self, values: Iterable[Output]) -> None:
        for value in values:
            if isinstance(value, TokenVectors | SparseVector):
                continue  # token or sparse vectors: no dense vector to follow
            if not isinstance(value, Classification):
                if self.dimension is None:
                    self.dimension = len(value)
                if len(value) != self.dimension:
                    continue
            if self.reference is None:
                self._first.append(value)
                if len(self._first) >= self.window:
                    self._set(self._reference_of(self._first))
                    self._first = []
                continue
            self._add(value)

    def _add(self, value: Output) -> None:
        if isinstance(value, Classification):
            self._labels.append(value.label)
            self._scores.append(value.score)
        elif self._unit_centroid is not None:
            x = np.asarray(value, dtype=np.float64)
            norm = float(np.linalg.norm(x))
            if norm > 0:
                self._cosines.append(float(x @ self._unit_centroid) / norm)

    def _reference_of(self, values: Sequence[Output]) -> Reference:
        if self.task == "embed":
            rows = np.asarray(values, dtype=np.float64)
            rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
            centroid = rows.mean(axis=0)
            unit = centroid / max(float(np.linalg.norm(centroid)), 1e-12)
            return Reference(self.task, len(values), centroid=unit.tolist(),
                             centroid_cosine=float((rows @ unit).mean()))  # fmt: skip
        answers = [cast("Classification", v) for v in values]
        scores = [a.score for a in answers]
        return Reference(self.task, len(values), label_shares=shares(a.label for a in answers),
                         score_quantiles=np.quantile(scores, QUANTILES).tolist())  # fmt: skip

    def _set(self, reference: Reference) -> None:
        self.reference = reference
        if reference.centroid is not None:
            self._unit_centroid = np.asarray(reference.centroid, dtype=np.float64)

    def put_reference(self, reference: Reference) -> None:
        """Compare with a saved reference from now on. Raises ValueError when it is of
        another task or another dimension."""
        if reference.task != self.task:
            raise ValueError(f"the reference is of a {reference.task} model, not {self.task}")
        ours = self._unit_centroid
        if (
            ours is not None
            and reference.centroid is not None
            and len(reference.centroid) != len(ours)
        ):
            raise ValueError("the reference's centroid has another dimension")
        self._first = []
        self._set(reference)

    def recent(self) -> dict[str, Any]:
        """The recent window's statistics, beside the reference's (None before the
        reference is complete, or while the window is empty)."""
        found: dict[str, Any] = {"answers": len(self._cosines) or len(self._labels)}
        reference = self.reference
        if reference is None:
            found["answers"] = 0
            return found
        if self.task == "embed":
            found["centroid_cosine"] = float(np.mean(self._cosines)) if self._cosines else None
        elif self.task == "classify":
            now = shares(self._labels)
            found["label_shares"] = now
            found["psi"] = psi(reference.label_shares, now) if now else None
        if self.task == "rerank":
            found["score_quantiles"] = (
                np.quantile(list(self._scores), QUANTILES).tolist() if self._scores else None
            )
        return found


class Drift(Collector):
    """Every version's drift, collected into `/metrics` when scraped."""

    def __init__(self, window: int, registry: CollectorRegistry) -> None:
        self.window = window
        self.versions: dict[str, VersionDrift] = {}
        if window > 0:
            registry.register(self)

    def observe(self, served: Served, results: Sequence[Result[Output]]) -> None:
        """A version's answers (skipped when drift is off: `--drift-window 0`). Never
        raises: drift must not cost a request its answer."""
        if self.window <= 0:
            return
        found = self.versions.get(served.key)
        if found is None:
            dimension = served.describe().get("dimension")  # once per version
            found = self.versions[served.key] = VersionDrift(
                served.name, served.version, served.encoder.task, self.window,
                dimension if isinstance(dimension, int) else None,
            )  # fmt: skip
        if found.failed:
            return
        try:
            found.observe(r.value for r in results if not r.cached)
        except Exception:
            found.failed = True
            logger.exception("drift of %s failed; it is off for this version (a bug)", served.key)

    def forget(self, key: str) -> None:
        self.versions.pop(key, None)

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked: the families' labels are known only once collected

    def collect(self) -> Iterable[Metric]:
        labels = ["model", "version"]
        psi_family = GaugeMetricFamily(
            "microbatch_drift_psi",
            "Classifiers: population stability index of the recent label shares against "
            "the reference's (above 0.2: a real shift).",
            labels=labels,
        )
        share = GaugeMetricFamily(
            "microbatch_drift_label_share", "Classifiers: each top label's share, by window.",
            labels=[*labels, "window", "label"],
        )  # fmt: skip
        cosine = GaugeMetricFamily(
            "microbatch_drift_centroid_cosine",
            "Embedders: mean cosine of the answers to the reference's centroid, by window.",
            labels=[*labels, "window"],
        )
        quantile = GaugeMetricFamily(
            "microbatch_drift_score_quantile",
            "Rerankers: score percentiles (0.1, 0.5, 0.9), by window.",
            labels=[*labels, "window", "quantile"],
        )
        for drift in self.versions.values():
            reference = drift.reference
            if reference is None:
                continue
            at = [drift.model, drift.version]
            recent = drift.recent()
            if drift.task == "classify":
                for label, value in reference.label_shares.items():
                    share.add_metric([*at, "reference", label], value)
                for label, value in (recent.get("label_shares") or {}).items():
                    share.add_metric([*at, "recent", label], value)
                if recent.get("psi") is not None:
                    psi_family.add_metric(at, recent["psi"])
            elif drift.task == "embed" and reference.centroid_cosine is not None:
                cosine.add_metric([*at, "reference"], reference.centroid_cosine)
                if recent.get("centroid_cosine") is not None:
                    cosine.add_metric([*at, "recent"], recent["centroid_cosine"])
            if drift.task == "rerank" and reference.score_quantiles is not None:
                for q, value in zip(QUANTILES, reference.score_quantiles, strict=True):
                    quantile.add_metric([*at, "reference", str(q)], value)
                for q, value in zip(QUANTILES, recent.get("score_quantiles") or [], strict=False):
                    quantile.add_metric([*at, "recent", str(q)], value)
        yield from (psi_family, share, cosine, quantile)
