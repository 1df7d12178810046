"""torch.compile with dynamic shapes, and the state that proves no request recompiles."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from batcher.models.options import CompileMode

F = TypeVar("F", bound=Callable[..., Any])

Stance = Literal["default", "eager_on_recompile", "fail_on_recompile"]


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def _size_oblivious() -> Iterator[None]:
    # Without this, dynamo specialises sizes 0 and 1, so a batch of one would cost a second
    # graph (about 25 s more warm-up on a small CPU). The flag is private; without it we
    # only lose that saving.
    try:
        from torch.fx.experimental import _config as fx_config

        patch = fx_config.patch(backed_size_oblivious=True)  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        patch = contextlib.nullcontext()
    with patch:
        yield


@dataclass
class CompileState:
    """What `/model` reports about compilation. After warm-up the stance turns to
    `eager_on_recompile`: a shape no warm-up foresaw runs eager instead of stalling every
    request behind a compile."""

    requested: bool
    mode: CompileMode = "default"
    """`reduce-overhead`: CUDA graphs of the warmed shapes (inductor records one per
    shape on CUDA, and compiles as `default` does elsewhere)."""
    enabled: bool = False
    error: str | None = None
    graphs_at_warm_up: int | None = None
    stance: Stance = "default"
    after_warm_up: Stance = "eager_on_recompile"

    def fail(self, exc: Exception) -> None:
        self.enabled = False
        self.error = f"{type(exc).__name__}: {exc}"

    def finish_warm_up(self) -> None:
        self.graphs_at_warm_up = graphs_compiled()
        self.stance = self.after_warm_up

    @contextlib.contextmanager
    def warming_more(self) -> Iterator[None]:
        """Shapes warmed after warm-up (a live rise of the batch limit): compiled on
        purpose, with the default stance, and not counted as request recompiles."""
        before, stance = graphs_compiled(), self.stance
        self.stance = "default"
        try:
            yield
        finally:
            self.stance = stance
            if self.graphs_at_warm_up is not None:
                self.graphs_at_warm_up += graphs_compiled() - before

    @property
    def graphs_since_warm_up(self) -> int:
        if self.graphs_at_warm_up is None:
            return 0
        return graphs_compiled() - self.graphs_at_warm_up

    def describe(self) -> dict[str, object]:
        return {
            "requested": self.requested,
            "mode": self.mode,
            "enabled": self.enabled,
            "error": self.error,
            "graphs_since_warm_up": self.graphs_since_warm_up,
        }

    def __str__(self) -> str:
        if self.enabled:
            mode = "" if self.mode == "default" else f", mode {self.mode}"
            return f"compiled, dynamic shapes{mode}"
        return f"eager ({self.error})" if self.error else "eager"


def compile_forward(forward: F, state: CompileState) -> F:
    """`torch.compile(forward, dynamic=True)` in `state.mode`; compiling happens lazily at
    the first call, which the caller makes inside warm-up (under `_size_oblivious`)."""
    mode = None if state.mode == "default" else state.mode
    compiled = torch.compile(forward, dynamic=True, mode=mode)
    state.enabled = True

    def call(*args: Any, **kwargs: Any) -> Any:
        if state.graphs_at_warm_up is None:
            with _size_oblivious():
                return compiled(*args, **kwargs)
        return compiled(*args, **kwargs)

    return call  # type: ignore[return-value]
