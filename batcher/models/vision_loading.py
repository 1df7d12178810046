"""Finding and loading an image model: an image classifier, CLIP or SigLIP (in
transformers' layout or sentence-transformers' CLIP layout), its image processor (the
Pillow backend) and, for CLIP-like models, its text tower's tokenizer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from batcher.models.description import UnsupportedModel, class_name, read_json
from batcher.models.devices import pick_device
from batcher.models.encoder import EncoderSpec
from batcher.models.errors import ModelLoadError
from batcher.models.heads import score_activation
from batcher.models.options import LoadOptions, Task, default_source
from batcher.models.pixels import ImageSpec, VisionKind
from batcher.models.precision import Precision, plan

logger = logging.getLogger("batcher.models")

EMBEDDERS = {"clip": "clip", "siglip": "siglip"}
"""model_type -> kind, for the image-text models served exactly."""


@dataclass(frozen=True, slots=True)
class Found:
    """Where an image model's transformers files are, and what its layout declares."""

    kind: VisionKind
    folder: Path
    normalize: bool | None
    """sentence-transformers' layout: whether a Normalize module follows; None: none."""


def find_vision(root: Path) -> Found | None:
    """The image model in `root` (a classifier, CLIP or SigLIP, in transformers' layout
    or sentence-transformers' CLIP layout), or None for a text model. Raises
    ModelLoadError for an image model that cannot be served exactly."""
    folder, normalize = root, None
    try:
        modules = read_json(root / "modules.json")
    except UnsupportedModel as exc:
        raise ModelLoadError(str(exc)) from None
    if isinstance(modules, list) and modules:
        first = modules[0]
        try:
            name = class_name(first)
        except UnsupportedModel:
            return None
        folder = root / str(first.get("path", ""))
        if name not in ("CLIPModel", "Transformer") or _kind(folder) not in ("clip", "siglip"):
            return None
        rest = [class_name(entry) for entry in modules[1:]]
        if any(module != "Normalize" for module in rest):
            raise ModelLoadError(
                f"cannot serve the image model in {root.name!r}: modules after its "
                f"{name} ({', '.join(rest)}) are not served; only Normalize is"
            )
        normalize = bool(rest)
    kind = _kind(folder)
    return None if kind is None else Found(kind, folder, normalize)


def _kind(folder: Path) -> VisionKind | None:
    try:
        config = read_json(folder / "config.json")
    except UnsupportedModel as exc:
        raise ModelLoadError(str(exc)) from None
    if not isinstance(config, dict):
        return None
    model_type = str(config.get("model_type", ""))
    architectures = [str(a) for a in config.get("architectures") or []]
    if model_type in EMBEDDERS:
        return cast("VisionKind", EMBEDDERS[model_type])
    if any(a.endswith("ForImageClassification") for a in architectures):
        return "classifier"
    pictures = any(key in config for key in ("num_channels", "image_size", "vision_config"))
    if pictures or model_type.startswith(("clip", "siglip")):
        raise ModelLoadError(
            f"{folder.name or 'the model'} is a {model_type} model ({', '.join(architectures)}), "
            "which is not served: image classifiers (…ForImageClassification) and CLIP and "
            "SigLIP (image and text embeddings) are"
        )
    return None


def image_processor(folder: str | Path) -> Any:
    """The model's image processor, in its Pillow backend: the one every installation
    has (transformers picks torchvision's when installed, whose resize differs)."""
    import transformers
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    return AutoImageProcessor.from_pretrained(str(folder), use_fast=False)  # the Pillow one


def pil_processor_class(family: str) -> Any:
    """transformers' Pillow image processor of `family` ("ViT", "CLIP", "Siglip"):
    `ViTImageProcessorPil` in transformers 5, the slow `ViTImageProcessor` in 4."""
    import transformers

    return getattr(transformers, f"{family}ImageProcessorPil", None) or getattr(
        transformers, f"{family}ImageProcessor"
    )


def probe_pictures() -> list[Any]:
    """Images of many sizes and contents (gradients, noise, flat colour, stripes): what
    the precision probe and the load-time check of the processor's shape run."""
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(224, 224), (640, 480), (97, 311), (1024, 768), (32, 32), (300, 200),
             (480, 640), (256, 256), (1280, 720), (64, 400), (500, 500), (128, 96)]  # fmt: skip
    pictures = []
    for i, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                         (x + y) * 127 // max(w + h - 2, 1)], axis=-1)  # fmt: skip
        if i % 2:
            base = base + rng.integers(-60, 60, size=base.shape)
        if i == 4:
            base = np.where((x // 4) % 2 == 0, 255, 0)[..., None].repeat(3, axis=-1)
        pictures.append(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB"))
    return pictures


@dataclass(frozen=True, slots=True)
class LoadedVision:
    name: str
    task: Task
    kind: VisionKind
    model: Any
    device: torch.device
    precision: Precision
    spec: ImageSpec
    processor: Any
    text_length: int = 0
    """clip/siglip: the text tower's fixed length, every text padded to it."""
    pad_id: int = 0
    activation: str = ""
    score: Callable[[torch.Tensor], torch.Tensor] | None = None
    probe_dtype: torch.dtype | None = None


def _patches(config: Any, shape: tuple[int, int, int]) -> int:
    vision = getattr(config, "vision_config", None) or config
    patch = getattr(vision, "patch_size", None)
    side = patch if isinstance(patch, int) and patch > 0 else 16
    return (shape[1] // side) * (shape[2] // side) + 1


def load_vision(options: LoadOptions, found: Found) -> LoadedVision:
    """Load an image model (safetensors only) and its processor; check that the
    processor makes one shape. Raises ModelLoadError."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoTokenizer

    source = options.source or default_source()
    device = pick_device(options.device)
    precision, probe_dtype = plan(options.dtype, device)
    task: Task = "classify" if found.kind == "classifier" else "embed"
    if options.task not in ("auto", task):
        raise ModelLoadError(f"task {options.task!r} does not fit this model: it is an image "
                             f"{'classifier' if task == 'classify' else 'embedding model'} "
                             "(leave --task auto)")  # fmt: skip
    folder, remote = str(found.folder), options.trust_remote_code
    name = options.name or source
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
        auto = AutoModelForImageClassification if task == "classify" else AutoModel
        model = auto.from_pretrained(folder, use_safetensors=True, trust_remote_code=remote,
                                     dtype=precision.dtype)  # fmt: skip
        processor = image_processor(folder)
        tokenizer = None
        if task == "embed":
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
            if tokenizer is None:
                raise OSError("no tokenizer files")
    except (OSError, ValueError, ImportError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {source!r}: {reason}") from exc
    model.eval().requires_grad_(False).to(device)
    try:
        shapes = {tuple(a.shape) for a in _processed(processor, probe_pictures())}
    except ValueError:  # numpy could not stack them: they differ
        shapes = {tuple(np.asarray(a).shape) for a in processor(probe_pictures())["pixel_values"]}
    if len(shapes) != 1:
        raise ModelLoadError(f"cannot serve model {source!r}: its image processor makes "
                             f"pictures of several sizes ({sorted(shapes)}); a batch is one "
                             "fixed-shape tensor")  # fmt: skip
    [shape] = shapes
    image_shape = cast("tuple[int, int, int]", shape)
    if task == "classify":
        labels = tuple(str(config.id2label[i]) for i in range(len(config.id2label)))
        activation, score = score_activation(config, None)
        spec = ImageSpec(name, task, found.kind, image_shape, _patches(config, image_shape),
                         labels=labels)  # fmt: skip
        logger.info("loaded %s for classify on %s (%s), images %s, %s head", name, device,
                    precision.name, image_shape, activation)  # fmt: skip
        return LoadedVision(
            name, task, found.kind, model, device, precision, spec, processor,
            activation=activation, score=score, probe_dtype=probe_dtype,
        )  # fmt: skip
    normalize = True if found.normalize is None else found.normalize
    dimension = int(config.projection_dim) if found.kind == "clip" else int(
        config.text_config.hidden_size)  # fmt: skip
    length = int(config.text_config.max_position_embeddings)
    assert tokenizer is not None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"model {source!r} has no fast (Rust) tokenizer for its texts")
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    text = EncoderSpec(
        name=name, task="embed", tokenizer_json=tokenizer.backend_tokenizer.to_str(),
        max_tokens=length, special_ids=frozenset(tokenizer.all_special_ids),
        normalize=normalize, dimension=dimension,
    )  # fmt: skip
    spec = ImageSpec(name, task, found.kind, image_shape, _patches(config, image_shape),
                     normalize=normalize, dimension=dimension, text=text)  # fmt: skip
    logger.info("loaded %s (%s) for image and text embeddings on %s (%s), images %s, texts "
                "of %d tokens", name, found.kind, device, precision.name, image_shape,
                length)  # fmt: skip
    return LoadedVision(name, task, found.kind, model, device, precision, spec, processor,
                        text_length=length, pad_id=pad_id, probe_dtype=probe_dtype)  # fmt: skip


def _processed(processor: Any, pictures: Sequence[Any]) -> np.ndarray[Any, Any]:
    return np.asarray(processor(images=list(pictures), return_tensors="np")["pixel_values"])
