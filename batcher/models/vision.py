"""Image models behind the engine: an image classifier (`AutoModelForImageClassification`:
ViT, ConvNeXt, ResNet, ...) and the models that embed images and texts in one space (CLIP,
SigLIP; in transformers' layout or sentence-transformers' CLIP layout).

A batch of images is one `[B, 3, H, W]` tensor: the processor makes every image the same
size (checked at load), so nothing is padded and the batch size is the only dimension
that varies (one graph, dynamic in it). A CLIP-like model's texts go through its text
tower in the same batches, padded to the tower's fixed length as the reference pads them
(SigLIP: `padding="max_length"` with no mask, as it was trained). What an output *is*
comes from the reference: `pipeline("image-classification")`'s scores, and
`get_image_features` / `get_text_features` (which sentence-transformers' CLIP returns)."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from batcher.errors import DeviceOutOfMemory
from batcher.models.compiling import CompileState, compile_forward
from batcher.models.errors import ModelLoadError
from batcher.models.heads import finish_embeddings
from batcher.models.inputs import Encoded
from batcher.models.options import CompileMode, LoadOptions, default_source
from batcher.models.outputs import Classification, Output
from batcher.models.pixels import ImageEncoder, Pixels
from batcher.models.precision import Precision, judge
from batcher.models.probe import PROBE_TEXTS
from batcher.models.vision_loading import (
    Found,
    LoadedVision,
    find_vision,
    load_vision,
    probe_pictures,
)

logger = logging.getLogger("batcher.models")


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns an output with the projected features as `pooler_output`.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


Forwards = dict[str, Callable[..., torch.Tensor]]


def _forwards(loaded: LoadedVision) -> Forwards:
    model = loaded.model
    if loaded.task == "classify":
        return {"image": lambda pixels: model(pixel_values=pixels).logits}
    forwards: Forwards = {
        "image": lambda pixels: _features(model.get_image_features(pixel_values=pixels))
    }
    if loaded.kind == "siglip":  # trained on texts padded to the length, with no mask
        forwards["text"] = lambda ids: _features(model.get_text_features(input_ids=ids))
    else:
        forwards["text"] = lambda ids, mask: _features(
            model.get_text_features(input_ids=ids, attention_mask=mask)
        )
    return forwards


class VisionModel:
    """A loaded image model that implements `batcher.Model[Pixels | Encoded, Output]`
    (`predict` runs on the device worker thread); its `encoder` makes the items."""

    def __init__(
        self,
        loaded: LoadedVision,
        *,
        compile: bool = True,
        compile_mode: CompileMode = "default",
    ) -> None:
        self.loaded = loaded
        self.name = loaded.name
        self.task = loaded.task
        self.device = loaded.device
        self.encoder = ImageEncoder(loaded.spec, loaded.processor)
        self._eager = _forwards(loaded)
        self._forward = self._eager
        self.compile_state = CompileState(requested=compile, mode=compile_mode)
        self.warmed = False
        self.packed_outputs = False
        """Embeddings as float32 bytes (`batcher.models.wire`), for an engine process."""

    @property
    def precision(self) -> Precision:
        return self.loaded.precision

    @classmethod
    def load(cls, options: LoadOptions, found: Found) -> VisionModel:
        model = cls(load_vision(options, found), compile=options.compile,
                    compile_mode=options.compile_mode)  # fmt: skip
        if model.loaded.probe_dtype is not None:
            model._probe_precision(model.loaded.probe_dtype, options.min_accuracy)
        return model

    def _probe_precision(self, dtype: torch.dtype, min_accuracy: float) -> None:
        """As `TextModel`'s probe: the probe images (and texts) in float32 and in a
        `dtype` copy, eager; the copy is kept only if every output agrees."""
        started = time.perf_counter()
        items = self._probe_items()
        reference = self._outputs(self._eager, items)
        lower = copy.deepcopy(self.loaded.model).to(dtype)
        candidate = self._outputs(_forwards(replace(self.loaded, model=lower)), items)
        precision = judge(reference, candidate, dtype, min_accuracy)
        kept = precision.dtype == dtype
        model = lower if kept else self.loaded.model
        self.loaded = replace(self.loaded, model=model, precision=precision, probe_dtype=None)
        self._eager = self._forward = _forwards(self.loaded)
        (logger.info if kept else logger.warning)(
            "precision %s (probe %.1fs): %s", precision.name, time.perf_counter() - started,
            precision.reason,
        )  # fmt: skip

    def _probe_items(self) -> list[Pixels | Encoded]:
        items: list[Pixels | Encoded] = []
        for pixels in self.encoder.pixel_values(probe_pictures()):
            data = np.ascontiguousarray(pixels, dtype="<f4").tobytes()
            items.append(Pixels(data, self.loaded.spec.image_shape, b"", 0))
        if self.encoder.text is not None:
            items += self.encoder.text.encode_many(list(PROBE_TEXTS))
        return items

    def _outputs(self, forwards: Forwards, items: Sequence[Pixels | Encoded]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([self._raw(forwards, items[i : i + 8]).float().cpu()
                              for i in range(0, len(items), 8)])  # fmt: skip

    # -- on the event loop ---------------------------------------------------------------

    def cost(self, item: Pixels | Encoded) -> int:
        return item.n_tokens

    # -- on the device worker -------------------------------------------------------------

    def _pixels(self, items: Sequence[Pixels]) -> torch.Tensor:
        array = np.stack([item.array() for item in items])
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        dtype = self.loaded.precision.dtype
        return tensor.to(self.device, non_blocking=self.device.type == "cuda").to(dtype)

    def _texts(self, items: Sequence[Encoded]) -> list[torch.Tensor]:
        length, rows = self.loaded.text_length, len(items)
        ids = np.full((rows, length), self.loaded.pad_id, dtype=np.int64)
        mask = np.zeros((rows, length), dtype=np.int64)
        for row, item in enumerate(items):
            ids[row, : len(item.ids)] = item.ids
            mask[row, : len(item.ids)] = 1
        tensors = [torch.from_numpy(ids).to(self.device)]
        if self.loaded.kind != "siglip":
            tensors.append(torch.from_numpy(mask).to(self.device))
        return tensors

    def _raw(self, forwards: Forwards, items: Sequence[Pixels | Encoded]) -> torch.Tensor:
        """The raw outputs (logits, features) of `items`, images and texts, in order."""
        images = [i for i, item in enumerate(items) if isinstance(item, Pixels)]
        texts = [i for i, item in enumerate(items) if not isinstance(item, Pixels)]
        parts: list[tuple[list[int], torch.Tensor]] = []
        if images:
            pixels = self._pixels([cast("Pixels", items[i]) for i in images])
            parts.append((images, forwards["image"](pixels)))
        if texts:
            tensors = self._texts([cast("Encoded", items[i]) for i in texts])
            parts.append((texts, forwards["text"](*tensors)))
        if len(parts) == 1:
            return parts[0][1]
        out = torch.empty((len(items), parts[0][1].shape[-1]), dtype=parts[0][1].dtype,
                          device=parts[0][1].device)  # fmt: skip
        for rows, values in parts:
            out[rows] = values
        return out

    def predict(self, items: Sequence[Pixels | Encoded]) -> list[Output]:
        """One forward pass for the batch's images (one `[B, 3, H, W]` tensor) and one
        for its texts; one host copy and one `tolist` per batch."""
        out_of_memory = False
        try:
            with torch.inference_mode(), torch.compiler.set_stance(self.compile_state.stance):
                raw = self._raw(self._forward, items)
        except torch.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise DeviceOutOfMemory(f"a batch of {len(items)} did not fit on {self.device}")
        host = raw.float().cpu()
        if self.task == "embed":
            dims, norms = [i.dimensions for i in items], [i.normalize for i in items]
            return cast("list[Output]", finish_embeddings(host, dims, norms, self.packed_outputs))
        assert self.loaded.score is not None
        labels = self.loaded.spec.labels
        best = host.argmax(dim=-1).tolist()
        raw_rows = [i.raw_scores for i in items]
        logit_rows = host.tolist() if any(raw_rows) else []
        score_rows = self.loaded.score(host).tolist() if not all(raw_rows) else []
        out: list[Output] = []
        for row, (label, is_raw) in enumerate(zip(best, raw_rows, strict=True)):
            scores = logit_rows[row] if is_raw else score_rows[row]
            out.append(Classification(labels[label], scores[label], scores))
        return out

    def warm_up(
        self, max_batch_size: int, on_step: Callable[[int, int, str], None] | None = None
    ) -> None:
        """Compile (when asked) and run batches of 1, 2 and `max_batch_size` images (and
        texts), so that no request compiles; falls back to eager on a compile failure."""
        started = time.perf_counter()
        if self.warmed:
            with self.compile_state.warming_more():
                self._run_shapes(max_batch_size, None)
            return
        try:
            if self.compile_state.requested:
                self._forward = {k: compile_forward(f, self.compile_state)
                                 for k, f in self._eager.items()}  # fmt: skip
            self._run_shapes(max_batch_size, on_step)
        except Exception as exc:
            if self._forward is self._eager:
                raise
            logger.warning("torch.compile failed (%s: %s); running eager", type(exc).__name__, exc)
            self.compile_state.fail(exc)
            self._forward = self._eager
            self._run_shapes(max_batch_size, on_step)
        self.compile_state.finish_warm_up()
        self.warmed = True
        logger.info("warm-up done in %.1fs (%s)", time.perf_counter() - started, self.compile_state)

    def _run_shapes(
        self, max_batch_size: int, on_step: Callable[[int, int, str], None] | None
    ) -> None:
        spec = self.loaded.spec
        image = Pixels(np.zeros(spec.image_shape, dtype="<f4").tobytes(), spec.image_shape, b"", 0)
        kinds: list[tuple[str, Pixels | Encoded]] = [("images", image)]
        if self.encoder.text is not None:
            kinds.append(("texts", Encoded([self.loaded.pad_id + 1], False)))
        shapes = [(kind, item, size) for kind, item in kinds
                  for size in sorted({1, 2, max_batch_size})]  # fmt: skip
        for step, (kind, item, size) in enumerate(shapes, start=1):
            if on_step is not None:
                on_step(step, len(shapes), f"batch of {size} {kind}")
            self.predict([item] * size)

    def describe(self) -> dict[str, object]:
        spec = self.loaded.spec
        described: dict[str, object] = {
            "name": self.name,
            "task": self.task,
            "modalities": list(self.encoder.modalities),
            "architecture": spec.kind,
            "device": str(self.device),
            "dtype": self.precision.name,
            "precision": self.precision.describe(),
            "image_shape": list(spec.image_shape),
            "max_tokens": self.encoder.max_tokens,
            "labels": list(spec.labels),
            "compile": self.compile_state.describe(),
            "collate_ahead": False,
            "description": "transformers",
        }
        if self.task == "embed":
            described |= {"normalize": spec.normalize, "dimension": spec.dimension,
                          "prompts": {}, "default_prompt_name": None}  # fmt: skip
        else:
            described |= {"head_activation": self.loaded.activation, "text_pairs": False}
        return described


def load_model(options: LoadOptions) -> Any:
    """The model `options` name: a `VisionModel` for an image model, else a `TextModel`.
    Raises ModelLoadError."""
    from batcher.models.loading import _files
    from batcher.models.text import TextModel

    source = options.source or default_source()
    root = _files(source)
    found = find_vision(root) if root is not None else None
    if found is None or root is None:
        return TextModel.load(options)
    if not Path(source).is_dir():  # a hub id: its files come whole from the hub's cache
        from huggingface_hub import snapshot_download

        try:
            whole = Path(snapshot_download(source))
        except Exception as exc:
            raise ModelLoadError(f"cannot load model {source!r}: {exc}") from exc
        found = Found(found.kind, whole / found.folder.relative_to(root), found.normalize)
    return VisionModel.load(options, found)
