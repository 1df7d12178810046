"""Shadow traffic: a sampled share of a model's requests, once answered, mirrored to
another version (`PATCH /admin/routes` `shadow`), and the two versions' answers compared.

What the client gets never waits for, fails with or changes by its shadow: the mirror
starts after the reply is built, in the bulk lane (every interactive batch goes first),
on the shadow version's own queue. It is shed, and counted, before it could crowd real
work: when the shadow version's queue is half full, or its mirrored items in flight
reach a quarter of its queue. Agreement per pair of versions is in `/metrics` and on
`/dashboard`: the cosine of the two embeddings, whether the top labels agree and how
far the primary label's scores are apart, the rank correlation of a rerank's scores."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from batcher import Result
from batcher.models import Classification, Encoded, Output, SparseVector
from server.calls import Call
from server.drift import Drift
from server.prediction_log import PredictionLog
from server.served import Served
from server.settings import Settings

logger = logging.getLogger("microbatch.server")

AGREEMENT_BUCKETS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0)
"""No bucket below 0 (a negative cosine counts in `le="0.0"`): prometheus_client leaves
out the `_sum` of a histogram with negative buckets, and the sum gives the mean."""
DIFFERENCE_BUCKETS = (0.0001, 0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
OUTCOMES = ("compared", "shed", "failed")
PAIR = ("model", "primary", "shadow")


@dataclass(slots=True)
class Agreement:
    """Running sums for one pair of versions (the dashboard's means)."""

    model: str
    primary: str
    shadow: str
    task: str
    items: int = 0
    cosine_sum: float = 0.0
    same_label: int = 0
    score_difference_sum: float = 0.0
    rankings: int = 0
    rank_correlation_sum: float = 0.0

    def means(self) -> dict[str, float | None]:
        """Mean cosine, top-label agreement, score difference and rank correlation;
        None where the task does not have one or nothing was compared yet."""
        n, task = self.items, self.task
        ranked = self.rankings
        return {
            "cosine": self.cosine_sum / n if n and task in VECTORS else None,
            "label_agreement": self.same_label / n if n and task == "classify" else None,
            "score_difference": (
                self.score_difference_sum / n if n and task not in VECTORS else None
            ),
            "rank_correlation": self.rank_correlation_sum / ranked if ranked else None,
        }


VECTORS = ("embed", "sparse")
"""The tasks whose answers compare by cosine."""


class Shadows:
    """Mirrors calls to their shadow versions and records how the answers agree."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        log: PredictionLog | None = None,
        drift: Drift | None = None,
    ) -> None:
        self._settings = settings
        self._log = log
        self._drift = drift
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[str, int] = {}
        self.pairs: dict[tuple[str, str, str], Agreement] = {}
        self.requests = Counter(
            "microbatch_shadow_requests",
            "Requests mirrored to a shadow version, by outcome: compared, shed (the shadow "
            "was too busy) or failed.",
            ["model", "version", "outcome"],
            registry=registry,
        )
        self.cosine = Histogram(
            "microbatch_shadow_cosine", "Embeddings: cosine of the shadow's to the primary's.",
            PAIR, buckets=AGREEMENT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.labels = Counter(
            "microbatch_shadow_label_agreement",
            "Classifiers: items compared, by whether the two top labels agree (agree=yes|no).",
            [*PAIR, "agree"],
            registry=registry,
        )
        self.score_difference = Histogram(
            "microbatch_shadow_score_difference",
            "Classifiers and rerankers: |primary score - shadow score| of the primary's label.",
            PAIR, buckets=DIFFERENCE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.rank_correlation = Histogram(
            "microbatch_shadow_rank_correlation",
            "Rerankers: Spearman correlation of the versions' scores over a request's documents.",
            PAIR, buckets=AGREEMENT_BUCKETS, registry=registry,
        )  # fmt: skip

    def mirror(self, call: Call, results: Sequence[Result[Output]]) -> None:
        """Start mirroring `call` (answered with `results`) to each of its shadows."""
        n = len(call.items)
        if call.options is None or not n:
            return
        for shadow in call.shadows:
            if self._busy(shadow, n):
                self.requests.labels(shadow.name, shadow.version, "shed").inc()
                continue
            self._in_flight[shadow.key] = self._in_flight.get(shadow.key, 0) + n
            shadow.enter()  # an unload of the shadow waits for this mirror (`_run` leaves)
            task = asyncio.create_task(self._run(call, shadow, list(results)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _busy(self, shadow: Served, n: int) -> bool:
        if not shadow.serving:
            return True
        engine = shadow.engine
        bound = engine.config.max_queue_size
        if self._in_flight.get(shadow.key, 0) + n > max(1, bound // 4):
            return True
        return engine.stats().queue_depth + n > bound // 2

    async def _run(self, call: Call, shadow: Served, primary: list[Result[Output]]) -> None:
        outcome = "failed"
        try:
            assert call.options is not None
            if call.images:
                decoded = await shadow.encode_images(cast("list[str | bytes]", call.inputs),
                                                     call.options)  # fmt: skip
                items = cast("list[Encoded]", decoded.pixels)
            else:
                texts = cast("list[str | list[int]]", call.inputs)
                items = await shadow.encode(texts, call.pairs, call.options, call.direction)
            engine = shadow.engine_for(cached=True)
            deadline = engine.clock() + self._settings.request_timeout_s
            answers = await engine.submit_many(items, deadline=deadline, lane="bulk")
            agreement = self._compare(call.served, shadow, [r.value for r in primary],
                                      [r.value for r in answers])  # fmt: skip
            outcome = "compared"
            if self._log is not None:
                self._log.record_shadow(call, shadow, items, answers, agreement)
            if self._drift is not None:
                self._drift.observe(shadow, answers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a shadow's failure is counted, never the client's
            logger.debug("shadow %s failed: %s: %s", shadow.key, type(exc).__name__, exc)
        finally:
            shadow.leave()
            self._in_flight[shadow.key] -= len(call.items)
            self.requests.labels(shadow.name, shadow.version, outcome).inc()

    def _compare(
        self, served: Served, shadow: Served, ours: list[Output], theirs: list[Output]
    ) -> list[float | None]:
        """Record how the answers agree; each item's agreement, for the log: its cosine
        (embeddings), 1 or 0 for the same top label (classifiers), the request's rank
        correlation (rerankers)."""
        task = served.encoder.task
        key = (served.name, served.version, shadow.version)
        pair = self.pairs.get(key)
        if pair is None:
            pair = self.pairs[key] = Agreement(*key, task=task)
        if task in VECTORS:
            found: list[float | None] = []
            for a, b in zip(ours, theirs, strict=True):
                cosine = _cosine(a, b)
                found.append(cosine)
                if cosine is not None:
                    self.cosine.labels(*key).observe(cosine)
                    pair.items += 1
                    pair.cosine_sum += cosine
            return found
        firsts = [cast("Classification", a) for a in ours]
        seconds = [cast("Classification", b) for b in theirs]
        found = []
        for a, b in zip(firsts, seconds, strict=True):
            pair.items += 1
            agree = a.label == b.label
            found.append(float(agree))
            if task == "classify":
                pair.same_label += agree
                self.labels.labels(*key, "yes" if agree else "no").inc()
            score = _score_of(b, a.label, shadow.encoder.labels)
            if score is not None:
                difference = abs(a.score - score)
                pair.score_difference_sum += difference
                self.score_difference.labels(*key).observe(difference)
        if task == "rerank":
            rho = _spearman([a.score for a in firsts], [b.score for b in seconds])
            found = [rho] * len(firsts)
            if rho is not None:
                pair.rankings += 1
                pair.rank_correlation_sum += rho
                self.rank_correlation.labels(*key).observe(rho)
        return found

    def forget(self, served: Served) -> None:
        """Drop the pairs of an unloaded version from the dashboard."""
        for key in [k for k in self.pairs if k[0] == served.name and served.version in k[1:]]:
            del self.pairs[key]

    async def aclose(self) -> None:
        """Cancel the mirrored work (the server is stopping): it answers no one."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _cosine(a: Output, b: Output) -> float | None:
    if isinstance(a, SparseVector) and isinstance(b, SparseVector):
        return _sparse_cosine(a, b)
    if not (isinstance(a, list) and isinstance(b, list)) or len(a) != len(b):
        return None  # other dimensions: not comparable
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / norms if norms > 0 else None


def _sparse_cosine(a: SparseVector, b: SparseVector) -> float | None:
    x = {int(p["index"]): p["value"] for p in a.pairs()}
    y = {int(p["index"]): p["value"] for p in b.pairs()}
    norms = math.sqrt(sum(v * v for v in x.values()) * sum(v * v for v in y.values()))
    return sum(v * y.get(i, 0.0) for i, v in x.items()) / norms if norms > 0 else None


def _score_of(answer: Classification, label: str, labels: Sequence[str]) -> float | None:
    """The shadow's score for `label` (its top score for a one-output model)."""
    if answer.label == label:
        return answer.score
    if label in labels:
        return answer.scores[list(labels).index(label)]
    return None


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties broken by order); None when a side is constant
    or there are fewer than two."""
    if len(a) < 2:
        return None
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    if np.ptp(np.asarray(a)) == 0 or np.ptp(np.asarray(b)) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])
