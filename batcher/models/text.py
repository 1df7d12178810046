"""Text models behind the engine: tokenize one input, collate a batch into one padded
tensor, run one forward pass, and split the outputs back, once per batch."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from batcher.errors import DeviceOutOfMemory
from batcher.models.compiling import CompileState, compile_forward
from batcher.models.loading import Loaded, LoadOptions, Task, load
from batcher.padding import bucket_length

logger = logging.getLogger("batcher.models")


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized input: token ids with special tokens, truncated to the model's limit."""

    ids: list[int]
    truncated: bool


@dataclass(frozen=True, slots=True)
class Classification:
    label: str
    score: float
    probs: list[float]
    """Every class's probability, in the order of `TextModel.labels`."""


Output = list[float] | Classification

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _embed_forward(model: Any) -> Forward:
    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        mean = summed / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(mean.float(), p=2.0, dim=-1)

    return forward


def _classify_forward(model: Any) -> Forward:
    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return torch.softmax(logits.float(), dim=-1)

    return forward


class TextModel:
    """A loaded text model that implements `batcher.Model[Encoded, Output]`.

    `encode` is cheap and runs at submit; `predict` runs on the device worker thread.
    """

    def __init__(self, loaded: Loaded, *, compile: bool = True) -> None:
        self.loaded = loaded
        self.name = loaded.name
        self.task: Task = loaded.task
        self.labels = loaded.labels
        self.max_tokens = loaded.max_tokens
        self.device = loaded.device
        self.dtype = loaded.dtype
        self._tokenizer = loaded.tokenizer.backend_tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=loaded.max_tokens)
        self._pad_id = int(loaded.tokenizer.pad_token_id or 0)
        make = _classify_forward if self.task == "classify" else _embed_forward
        self._eager: Forward = make(loaded.model)
        self._forward: Forward = self._eager
        self.compile_state = CompileState(requested=compile)
        self.warmed = False

    @classmethod
    def load(cls, options: LoadOptions) -> TextModel:
        return cls(load(options), compile=options.compile)

    # -- on the event loop ---------------------------------------------------------------

    def encode(self, text: str) -> Encoded:
        encoding = self._tokenizer.encode(text)
        return Encoded(encoding.ids, bool(encoding.overflowing))

    def encode_many(self, texts: Sequence[str]) -> list[Encoded]:
        encodings = self._tokenizer.encode_batch(list(texts))
        return [Encoded(e.ids, bool(e.overflowing)) for e in encodings]

    def cost(self, item: Encoded) -> int:
        return len(item.ids)

    # -- on the device worker -------------------------------------------------------------

    def collate(self, items: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded tensor of ids and its attention mask, length rounded up to a bucket."""
        length = bucket_length(max(len(item.ids) for item in items), cap=self.max_tokens)
        ids = np.full((len(items), length), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(items), length), dtype=np.int64)
        for row, item in enumerate(items):
            ids[row, : len(item.ids)] = item.ids
            mask[row, : len(item.ids)] = 1
        return self._to_device(ids), self._to_device(mask)

    def _to_device(self, array: np.ndarray[Any, Any]) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def predict(self, items: Sequence[Encoded]) -> list[Output]:
        """One forward pass for the whole batch; one host copy and one `tolist` per batch."""
        out_of_memory = False
        try:
            input_ids, attention_mask = self.collate(items)
            with torch.inference_mode(), torch.compiler.set_stance(self.compile_state.stance):
                out = self._forward(input_ids, attention_mask)
        except torch.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:
            # Raised outside the handler, so that no traceback keeps the failed pass's
            # tensors alive; the engine splits the batch and retries the halves.
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise DeviceOutOfMemory(f"a batch of {len(items)} did not fit on {self.device}")
        if self.task == "embed":
            embeddings: list[Output] = out.cpu().tolist()
            return embeddings
        probs = out.cpu()
        scores, indices = probs.max(dim=-1)
        return [
            Classification(self.labels[i], s, p)
            for i, s, p in zip(indices.tolist(), scores.tolist(), probs.tolist(), strict=True)
        ]

    def warm_up(self, max_batch_size: int) -> None:
        """Compile (when asked) and run every kind of shape that can occur, so that no
        request ever triggers a compile. Falls back to eager, with a warning, if
        compiling fails."""
        started = time.perf_counter()
        try:
            if self.compile_state.requested:
                self._forward = compile_forward(self._eager, self.compile_state)
            self._run_shapes(max_batch_size)
        except Exception as exc:
            if self._forward is self._eager:
                raise
            logger.warning("torch.compile failed (%s: %s); running eager", type(exc).__name__, exc)
            self.compile_state.fail(exc)
            self._forward = self._eager
            self._run_shapes(max_batch_size)
        self.compile_state.finish_warm_up()
        self.warmed = True
        logger.info("warm-up done in %.1fs (%s)", time.perf_counter() - started, self.compile_state)

    def _run_shapes(self, max_batch_size: int) -> None:
        # With dynamic shapes one graph serves every (batch, length); these calls make any
        # specialisation (batch of 1, the longest bucket) happen now rather than later.
        sizes = sorted({2, 1, max_batch_size})
        lengths = sorted({16, 8, self.max_tokens})
        for size in sizes:
            for length in lengths:
                items = [Encoded([self._pad_id + 1] * length, False)] * size
                self.predict(items)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "task": self.task,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_tokens": self.max_tokens,
            "labels": list(self.labels),
            "compile": self.compile_state.describe(),
        }
