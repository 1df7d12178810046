"""Typed engine errors; the server maps each one to an HTTP status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises to a caller."""


class QueueFull(EngineError):
    """The bounded queue has no room; raised at once by `submit` (HTTP 429)."""

    def __init__(self, queue_size: int, max_queue_size: int, tenant: str | None = None) -> None:
        if tenant is None:
            message = (f"queue is full ({queue_size} of {max_queue_size} items waiting); "
                       "retry shortly or raise --max-queue-size")  # fmt: skip
        else:
            message = (f"queue is nearly full ({queue_size} of {max_queue_size} items "
                       f"waiting) and tenant {tenant!r} holds more than its share of it; "
                       "its last tenth is kept for the other tenants: retry shortly")  # fmt: skip
        super().__init__(message)
        self.queue_size = queue_size
        self.max_queue_size = max_queue_size
        self.tenant = tenant

    def __reduce__(self) -> tuple[type[QueueFull], tuple[int, int, str | None]]:
        return type(self), (self.queue_size, self.max_queue_size, self.tenant)  # across processes


class DeadlineUnreachable(EngineError):
    """At the rate the devices drain the queue, the item would wait past its deadline:
    refused at once (HTTP 429) instead of answered 504 after waiting in vain."""

    def __init__(self, expected_wait_s: float, allowed_s: float) -> None:
        super().__init__(
            f"the queue would take about {expected_wait_s:.1f} s to reach this request; its "
            f"deadline is in {allowed_s:.1f} s. Retry shortly or elsewhere"
        )
        self.expected_wait_s = expected_wait_s
        self.allowed_s = allowed_s

    def __reduce__(self) -> tuple[type[DeadlineUnreachable], tuple[float, float]]:
        return type(self), (self.expected_wait_s, self.allowed_s)


class EngineClosed(EngineError):
    """The engine is not running or is draining; nothing new is admitted (HTTP 503)."""


class DeadlineExceeded(EngineError):
    """The item's deadline passed before it was computed (HTTP 504)."""


class ItemTooLarge(EngineError):
    """The item alone is over `max_batch_tokens`, so no batch can ever hold it (HTTP 422)."""

    def __init__(self, cost: int, max_batch_tokens: int) -> None:
        super().__init__(
            f"input has {cost} padded tokens; a batch holds at most {max_batch_tokens} "
            "(--max-batch-tokens)"
        )
        self.cost = cost
        self.max_batch_tokens = max_batch_tokens

    def __reduce__(self) -> tuple[type[ItemTooLarge], tuple[int, int]]:
        return type(self), (self.cost, self.max_batch_tokens)


class InferenceFailed(EngineError):
    """The model raised for this item, alone in its batch (HTTP 500).

    The model's own exception is chained as ``__cause__``.
    """


class DeviceOutOfMemory(Exception):
    """Raised by a model when a batch does not fit in device memory.

    Not an `EngineError`: models raise it, the engine catches it, splits the batch and
    lowers its padded-token cap so that later batches fit (`Engine.memory_cap`).
    """
