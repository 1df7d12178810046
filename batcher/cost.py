"""What a batch costs on this device, learned from the batches it ran.

The fit is `seconds ≈ overhead_s + per_token_s * padded tokens`, by least squares over
recent batches (older ones decay). On a GPU the overhead dominates, so full batches pay;
on a CPU the per-token term does, so a tight batch of similar lengths beats a full one
that is mostly padding. The policy uses the fit to size batches
(`batch_sizing="learned"`); `DrainRate`, how fast the queue empties, serves admission;
`MemoryCap`, the padded tokens that fit the device, bounds every batch after an
out-of-memory error.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LinearCost:
    overhead_s: float
    per_token_s: float

    def seconds(self, padded_tokens: int) -> float:
        return self.overhead_s + self.per_token_s * padded_tokens


@dataclass
class CostModel:
    """Online weighted least squares; `estimate` is None until the fit can be trusted."""

    decay: float = 0.99
    """Weight kept by past batches at each new one (about the last 100 count)."""
    min_batches: int = 8
    _n: float = 0.0
    _seen: int = 0
    _sx: float = 0.0
    _sy: float = 0.0
    _sxx: float = 0.0
    _sxy: float = 0.0

    def observe(self, padded_tokens: int, seconds: float) -> None:
        d, x = self.decay, float(padded_tokens)
        self._n = self._n * d + 1.0
        self._sx = self._sx * d + x
        self._sy = self._sy * d + seconds
        self._sxx = self._sxx * d + x * x
        self._sxy = self._sxy * d + x * seconds
        self._seen += 1

    def estimate(self) -> LinearCost | None:
        if self._seen < self.min_batches:
            return None
        spread = self._n * self._sxx - self._sx * self._sx
        if spread <= 1e-9 * max(1.0, self._sxx * self._n):  # every batch the same size
            return None
        slope = max(0.0, (self._n * self._sxy - self._sx * self._sy) / spread)
        intercept = max(0.0, (self._sy - slope * self._sx) / self._n)
        return LinearCost(intercept, slope)


@dataclass
class DrainRate:
    """Items per device-second, over recent batches (older ones decay): how fast one
    replica empties the queue, for deadline-aware admission."""

    decay: float = 0.9
    """Weight kept by past batches at each new one (about the last ten count)."""
    min_batches: int = 8
    """Batches seen before the rate is trusted."""
    _items: float = 0.0
    _seconds: float = 0.0
    _seen: int = 0

    def observe(self, items: int, seconds: float) -> None:
        self._items = self.decay * self._items + items
        self._seconds = self.decay * self._seconds + seconds
        self._seen += 1

    def per_replica(self) -> float | None:
        """Items per second while busy, or None until enough batches ran."""
        if self._seen < self.min_batches or self._seconds <= 0:
            return None
        return self._items / self._seconds


@dataclass
class MemoryCap:
    """Padded tokens per batch that fit the device, learned from out-of-memory errors;
    `tokens` is None until one. The policy merges it into the token budget
    (`policy.batch_limits`)."""

    tokens: int | None = None

    def after_oom(self, items: int, padded_tokens: int) -> None:
        """A batch of `items` holding `padded_tokens` ran out of memory: later batches
        hold at most half as many (a single item teaches nothing about batches)."""
        if items > 1:
            cap = padded_tokens // 2
            if self.tokens is None or cap < self.tokens:
                self.tokens = cap

    def forget(self) -> None:
        """New limits were set: let them be tried."""
        self.tokens = None
