"""Text models behind the engine: collate a batch of token ids (`Encoded`, made by the
model's `TextEncoder` on the HTTP side) into padded tensors, run one forward pass, and
split the outputs back, finished per item (`batcher.models.heads`), once per batch."""

from __future__ import annotations

import copy
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch

from batcher.errors import DeviceOutOfMemory
from batcher.models.compiling import CompileState, compile_forward
from batcher.models.description import Dense
from batcher.models.encoder import TextEncoder
from batcher.models.errors import ModelLoadError
from batcher.models.forwards import Forward, Inputs, encoder_spec, forward_of
from batcher.models.heads import finish_embeddings, sparse_rows
from batcher.models.inputs import Encoded
from batcher.models.loading import Loaded, load
from batcher.models.options import CompileMode, LoadOptions, Task
from batcher.models.outputs import Classification, Output, TokenVectors
from batcher.models.precision import Precision, judge
from batcher.models.probe import PROBE_TEXTS
from batcher.models.quantize import MAX_CALIBRATION_TEXTS
from batcher.padding import bucket_length

logger = logging.getLogger("batcher.models")


WarmStep = Callable[[int, int, str], None]
"""Told of each warm-up shape before it runs: (step, steps, what)."""


@dataclass(frozen=True, slots=True)
class HostBatch:
    """A batch's padded inputs on the host (`TextModel.prepare`), before the device."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    pool_mask: torch.Tensor | None
    """The tokens to pool, where it differs from `attention_mask` (a prompt not pooled)."""


class TextModel:
    """A loaded text model that implements `batcher.Model[Encoded, Output]`: `predict`
    runs on the device worker thread. Its `encoder` turns inputs into `Encoded` items."""

    def __init__(
        self,
        loaded: Loaded,
        *,
        compile: bool = True,
        compile_mode: CompileMode = "default",
        collate_ahead: bool | None = None,
    ) -> None:
        self.loaded = loaded
        self.name = loaded.name
        self.task: Task = loaded.task
        self.labels = loaded.labels
        self.max_tokens = loaded.max_tokens
        self.device = loaded.device
        self.description = loaded.description
        self.dimension = loaded.description.embedding_dimension if self.task == "embed" else None
        self.encoder = TextEncoder(encoder_spec(loaded))
        """The model's tokenizer and input rules; the HTTP side's copy of it encodes requests."""
        self._pad_id = int(loaded.tokenizer.pad_token_id or 0)
        self._type_ids = self.encoder.spec.type_ids
        self._prompt_pooled = self.encoder.spec.prompt_pooled
        self._eager: Forward = forward_of(loaded)
        self._forward: Forward = self._eager
        self.compile_state = CompileState(requested=compile, mode=compile_mode)
        self._collate_ahead = collate_ahead
        self.warmed = False
        self.packed_outputs = False
        """Embeddings as float32 bytes (`batcher.models.wire`), for an engine process."""

    @property
    def precision(self) -> Precision:
        return self.loaded.precision

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.dtype

    @classmethod
    def load(cls, options: LoadOptions) -> TextModel:
        """Load `options`' model; with `dtype="auto"` on a CPU with native bfloat16,
        probe bfloat16 against float32 first and keep the one the probe allows."""
        ahead = {"auto": None, "on": True, "off": False}[options.collate_ahead]
        model = cls(
            load(options),
            compile=options.compile,
            compile_mode=options.compile_mode,
            collate_ahead=ahead,
        )
        if model.loaded.probe_dtype is not None:
            model._probe_precision(model.loaded.probe_dtype, options.min_accuracy)
        if model.task == "embed":
            model._calibrate(options.calibration_file)
        return model

    def _calibrate(self, path: str | None) -> None:
        """Compute the raw outputs of the calibration texts (`batcher.models.quantize`),
        in the precision the model serves in, and give them to the encoder: the probe
        texts, or the first `MAX_CALIBRATION_TEXTS` non-blank lines of `path`."""
        texts = list(PROBE_TEXTS)
        source = f"built-in ({len(texts)} texts)"
        if path is not None:
            try:
                with open(path, encoding="utf-8") as file:
                    lines = (line.strip() for line in file)
                    texts = list(itertools.islice(filter(None, lines), MAX_CALIBRATION_TEXTS))
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelLoadError(f"--calibration-file {path}: {exc}") from None
            if not texts:
                raise ModelLoadError(f"--calibration-file {path} has no text")
            source = f"{os.path.basename(path)} ({len(texts)} texts)"
        raw = self._outputs(self._eager, self.encoder.encode_many(texts))
        spec = replace(self.encoder.spec, calibration=raw.numpy().astype("<f4").tobytes(),
                       calibration_source=source)  # fmt: skip
        self.encoder = TextEncoder(spec)

    def _probe_precision(self, dtype: torch.dtype, min_accuracy: float) -> Precision:
        """Run the probe inputs in the current (float32) weights and in a `dtype` copy,
        eager, and keep the copy only if every output agrees within `min_accuracy`
        (`batcher.models.precision.judge`). Before warm-up only."""
        assert not self.warmed, "the precision is settled before warm-up; this is a bug"
        started = time.perf_counter()
        items = self._probe_items()
        reference = self._outputs(self._eager, items)
        lower: Any = copy.deepcopy(self.loaded.model)
        lower.to(dtype)
        candidate = self._outputs(forward_of(replace(self.loaded, model=lower)), items)
        precision = judge(reference, candidate, dtype, min_accuracy)
        if precision.dtype == dtype:
            self.loaded = replace(self.loaded, model=lower, precision=precision, probe_dtype=None)
        else:
            self.loaded = replace(self.loaded, precision=precision, probe_dtype=None)
        del lower
        self._eager = self._forward = forward_of(self.loaded)
        log = logger.info if precision.dtype == dtype else logger.warning
        log("precision %s (probe %.1fs): %s", precision.name, time.perf_counter() - started,
            precision.reason)  # fmt: skip
        return precision

    def _probe_items(self) -> list[Encoded]:
        texts = list(PROBE_TEXTS)
        if self.task == "rerank":
            return self.encoder.encode_many(texts, texts[1:] + texts[:1])
        return self.encoder.encode_many(texts)

    def _outputs(self, forward: Forward, items: Sequence[Encoded], chunk: int = 8) -> torch.Tensor:
        """`forward`'s raw outputs (pooled vectors, logits) for `items`, in float32."""
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(items), chunk):
                inputs, pool_mask = self.collate(items[start : start + chunk])
                outputs.append(forward(inputs, pool_mask)[0].float().cpu())
        return torch.cat(outputs)

    # -- on the event loop ---------------------------------------------------------------

    def cost(self, item: Encoded) -> int:
        return len(item.ids)

    # -- on the device worker -------------------------------------------------------------

    def prepare(self, items: Sequence[Encoded]) -> HostBatch:
        """The batch's inputs on the host: padded to a bucket, in pinned memory when the
        model runs on CUDA (so that the copies to the device need not wait). Touches no
        device: the engine may call it on the collate thread while the device thread
        runs the batch before (`collates_ahead`)."""
        rows, pinned = len(items), self.device.type == "cuda"
        length = bucket_length(max(len(item.ids) for item in items), cap=self.max_tokens)

        def buffer(fill: int) -> tuple[torch.Tensor, np.ndarray[Any, Any]]:
            if not pinned:  # numpy's allocation is the cheaper one (13 against 31 µs)
                array = np.full((rows, length), fill, dtype=np.int64)
                return torch.from_numpy(array), array
            tensor = torch.full((rows, length), fill, dtype=torch.int64, pin_memory=True)
            return tensor, tensor.numpy()

        ids, ids_view = buffer(self._pad_id)
        mask, mask_view = buffer(0)
        types, types_view = buffer(0) if self._type_ids else (None, None)
        pool, pool_view = buffer(0) if not self._prompt_pooled else (None, None)
        for row, item in enumerate(items):
            n = len(item.ids)
            ids_view[row, :n] = item.ids
            mask_view[row, :n] = 1
            if types_view is not None and item.type_ids is not None:
                types_view[row, : len(item.type_ids)] = item.type_ids
            if pool_view is not None:
                pool_view[row, item.prompt_tokens : n] = 1
        return HostBatch(ids, mask, types, pool)

    def collate(self, items: Sequence[Encoded]) -> tuple[Inputs, torch.Tensor]:
        """The model's inputs as padded tensors on the device (length rounded up to a
        bucket), and the mask of the tokens to pool."""
        return self._to_device(self.prepare(items))

    def _to_device(self, host: HostBatch) -> tuple[Inputs, torch.Tensor]:
        """The prepared inputs on the model's device; from pinned memory, the copies are
        queued behind the running kernels and the thread goes on at once."""
        device, non_blocking = self.device, self.device.type == "cuda"
        inputs = {
            "input_ids": host.input_ids.to(device, non_blocking=non_blocking),
            "attention_mask": host.attention_mask.to(device, non_blocking=non_blocking),
        }
        if host.token_type_ids is not None:
            inputs["token_type_ids"] = host.token_type_ids.to(device, non_blocking=non_blocking)
        if host.pool_mask is None:
            return inputs, inputs["attention_mask"]
        return inputs, host.pool_mask.to(device, non_blocking=non_blocking)

    @property
    def collates_ahead(self) -> bool:
        """Whether the engine prepares a batch while the one before still computes: set
        by `--collate-ahead`; by default on CUDA, where the device thread mostly waits
        for the kernels, not on a CPU, where the forward pass has the cores."""
        return self.device.type == "cuda" if self._collate_ahead is None else self._collate_ahead

    def predict(self, items: Sequence[Encoded]) -> list[Output]:
        """One forward pass for the whole batch; one host copy per batch, and one `tolist`
        per batch (per group of items with the same options)."""
        return self.predict_prepared(items, self.prepare(items))

    def predict_prepared(self, items: Sequence[Encoded], prepared: object) -> list[Output]:
        """`predict(items)` from `prepare(items)`'s result, made ahead on another thread."""
        assert isinstance(prepared, HostBatch), "prepared by another model; this is a bug"
        out_of_memory = False
        try:
            inputs, pool_mask = self._to_device(prepared)
            with torch.inference_mode(), torch.compiler.set_stance(self.compile_state.stance):
                out, hidden = self._forward(inputs, pool_mask)
        except torch.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:
            # Raised outside the handler, so that no traceback keeps the failed pass's
            # tensors alive; the engine splits the batch and retries the halves.
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise DeviceOutOfMemory(f"a batch of {len(items)} did not fit on {self.device}")
        if self.task == "sparse":
            return cast("list[Output]", sparse_rows(out, [i.top_k for i in items]))
        host = out.cpu()
        if self.task == "embed":
            dims, norms = [i.dimensions for i in items], [i.normalize for i in items]
            # Packed (for an engine process), each embedding is bytes until the
            # front-end unpacks it (`batcher.models.wire`).
            finished = cast(
                "list[Output]", finish_embeddings(host, dims, norms, self.packed_outputs)
            )
            if hidden is not None and any(i.tokens for i in items):
                self._token_vectors(items, hidden, finished)
            return finished
        return self._classifications(host, [i.raw_scores for i in items])

    def _token_vectors(
        self, items: Sequence[Encoded], hidden: torch.Tensor, out: list[Output]
    ) -> None:
        """The items that asked for token vectors get their rows of `hidden` (real tokens
        only), in place of the pooled vector: one host copy of those rows."""
        rows = [row for row, item in enumerate(items) if item.tokens]
        host = hidden[rows].float().cpu().numpy().astype("<f4", copy=False)
        dimension = host.shape[-1]
        for matrix, row in zip(host, rows, strict=True):
            length = len(items[row].ids)
            out[row] = TokenVectors(matrix[:length].tobytes(), dimension)

    def _classifications(self, logits: torch.Tensor, raw: Sequence[bool]) -> list[Output]:
        """One `tolist` of the logits and one of the activated scores, each only when
        some item asked for it."""
        assert self.loaded.score is not None, "a classifier needs its activation; this is a bug"
        best = logits.argmax(dim=-1).tolist()
        logit_rows = logits.tolist() if any(raw) else []
        score_rows = self.loaded.score(logits).tolist() if not all(raw) else []
        out: list[Output] = []
        for row, (label, is_raw) in enumerate(zip(best, raw, strict=True)):
            scores = logit_rows[row] if is_raw else score_rows[row]
            out.append(Classification(self.labels[label], scores[label], scores))
        return out

    def warm_up(self, max_batch_size: int, on_step: WarmStep | None = None) -> None:
        """Compile (when asked) and run every kind of shape that can occur, so that no
        request ever triggers a compile. Falls back to eager, with a warning, if
        compiling fails. Called again with a larger `max_batch_size` (a live change of
        the limit), it runs the new shapes only, compiling what they need now rather than
        when a request meets them. `on_step(step, steps, what)` hears of each shape
        before it runs (on this thread), and each is logged with the time so far."""
        if self.warmed:
            self._warm_more(max_batch_size)
            return
        started = time.perf_counter()
        try:
            if self.compile_state.requested:
                self._forward = compile_forward(self._eager, self.compile_state)
            self._run_shapes(max_batch_size, on_step, started)
        except Exception as exc:
            if self._forward is self._eager:
                raise
            logger.warning("torch.compile failed (%s: %s); running eager", type(exc).__name__, exc)
            self.compile_state.fail(exc)
            self._forward = self._eager
            self._run_shapes(max_batch_size, on_step, started)
        self.compile_state.finish_warm_up()
        self.warmed = True
        logger.info("warm-up done in %.1fs (%s)", time.perf_counter() - started, self.compile_state)

    def _warm_more(self, max_batch_size: int) -> None:
        with self.compile_state.warming_more():
            self._run_shapes(max_batch_size)
        logger.info("warmed batches of up to %d", max_batch_size)

    def _run_shapes(
        self, max_batch_size: int, on_step: WarmStep | None = None, started: float | None = None
    ) -> None:
        # With dynamic shapes one graph serves every (batch, length); these calls make any
        # specialisation (batch of 1, the longest bucket) happen now rather than later.
        sizes = sorted({2, 1, max_batch_size})
        lengths = sorted({16, 8, self.max_tokens})
        shapes = [(size, length) for size in sizes for length in lengths]
        for step, (size, length) in enumerate(shapes, start=1):
            what = f"batch {size} x {length} tokens"
            if on_step is not None:
                on_step(step, len(shapes), what)
            if started is not None:
                elapsed = time.perf_counter() - started
                logger.info("warm-up %d/%d: %s, %.1fs so far", step, len(shapes), what, elapsed)
            items = [Encoded([self._pad_id + 1] * length, False)] * size
            self.predict(items)

    def describe(self) -> dict[str, object]:
        """What `/model` shows: the task, and how outputs are computed."""
        described: dict[str, object] = {
            "name": self.name,
            "task": self.task,
            "device": str(self.device),
            "dtype": self.precision.name,
            "precision": self.precision.describe(),
            "max_tokens": self.max_tokens,
            "labels": list(self.labels),
            "compile": self.compile_state.describe(),
            "collate_ahead": self.collates_ahead,
            "description": self.description.kind,
        }
        if self.task == "embed":
            d = self.description
            assert d.pooling is not None
            described |= {
                "pooling": list(d.pooling.modes),
                "pooling_includes_prompt": d.pooling.include_prompt,
                "dense": [
                    {"in": s.in_features, "out": s.out_features, "activation": s.activation}
                    for s in d.steps
                    if isinstance(s, Dense)
                ],
                "normalize": d.normalize,
                "dimension": self.dimension,
                "prompts": dict(d.prompts),
                "default_prompt_name": d.default_prompt_name,
                "calibration": None
                if self.encoder.calibration is None
                else self.encoder.calibration.source,
            }
        elif self.task == "sparse":
            splade_ = self.description.splade
            assert splade_ is not None
            described |= {
                "pooling": ["splade"],
                "splade": {"pooling": splade_.pooling, "activation": splade_.activation},
                "dimension": int(self.loaded.model.config.vocab_size),
                "prompts": dict(self.description.prompts),
                "default_prompt_name": self.description.default_prompt_name,
            }
        else:
            described |= {"head_activation": self.loaded.activation, "text_pairs": True}
        return described
