"""Finding and loading a Hugging Face model: source, task, device, dtype."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from batcher.models.description import (
    PLAIN,
    Dense,
    Description,
    Pooling,
    Step,
    UnsupportedModel,
)
from batcher.models.devices import pick_device
from batcher.models.errors import ModelLoadError
from batcher.models.heads import EmbeddingHead, score_activation
from batcher.models.options import (
    DEFAULT_HUB_ID,
    LoadOptions,
    Task,
    TaskOption,
    default_source,
)
from batcher.models.precision import Precision, plan
from batcher.models.reading import read
from batcher.models.static_sparse import StaticQuery

logger = logging.getLogger("batcher.models")


@dataclass(frozen=True, slots=True)
class Loaded:
    """A model on its device, eval mode, with what the adapter needs to know."""

    name: str
    task: Task
    model: PreTrainedModel
    tokenizer: Any
    device: torch.device
    precision: Precision
    """The dtype the weights are in, and why."""
    max_tokens: int
    labels: tuple[str, ...]
    description: Description
    """What the model's files declare (PLAIN when they declare nothing)."""
    head: EmbeddingHead | None = None
    """embed: pooling and the modules after it, on the device."""
    activation: str = ""
    """classify/rerank: the head's activation, by name."""
    score: Callable[[torch.Tensor], torch.Tensor] | None = None
    """classify/rerank: logits -> scores."""
    probe_dtype: torch.dtype | None = None
    """A lower precision to probe against this float32 load (`--dtype auto` on a CPU
    with native bfloat16); the adapter runs the probe."""
    static_query: StaticQuery | None = None
    """sparse, inference-free: what queries take instead of the model."""

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype


def _static_query(folder: Path) -> StaticQuery:
    import json

    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if not weights.is_file() or not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(
            f"the SparseStaticEmbedding in {folder.name!r} needs model.safetensors and "
            "tokenizer.json (microbatch loads safetensors and fast tokenizers only)"
        )
    weight = load_file(weights).get("weight")
    if weight is None or weight.dim() != 1:
        raise ModelLoadError(f"{folder.name}/model.safetensors holds no 1-d 'weight'")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    limit = config.get("model_max_length")
    return StaticQuery(
        weight.float().numpy().astype("<f4").tobytes(),
        (folder / "tokenizer.json").read_text(encoding="utf-8"),
        int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else 512,
    )


def disable_progress_bars() -> None:
    """No loading and download progress bars from transformers (they garble server logs)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _has_head(config: Any, description: Description) -> bool:
    architectures = list(getattr(config, "architectures", None) or [])
    return description.kind == "cross-encoder" or any(
        a.endswith("ForSequenceClassification") for a in architectures
    )


def resolve_task(option: TaskOption, config: Any, description: Description = PLAIN) -> Task:
    """The task follows the model unless given: a SentenceTransformer embeds; a
    sequence-classification model (a CrossEncoder among them) with one output reranks,
    with several it classifies; anything else embeds. Asking for a task the model has no
    head for fails."""
    has_head = _has_head(config, description)
    labels = int(getattr(config, "num_labels", 0) or 0)
    sparse = description.kind == "sparse-encoder"
    if option == "auto" and sparse:
        return "sparse"
    if (option == "sparse") != sparse:
        what = "a SparseEncoder (SPLADE)" if sparse else "not a SparseEncoder"
        raise ModelLoadError(
            f"task {option!r} does not fit this model: it is {what} (leave --task auto)"
        )
    if option == "auto":
        if description.kind == "sentence-transformers" or not has_head:
            return "embed"
        return "rerank" if labels == 1 else "classify"
    if option in ("classify", "rerank") and not has_head:
        architectures = list(getattr(config, "architectures", None) or [])
        raise ModelLoadError(
            f"task {option!r} needs a sequence-classification model (a cross-encoder); "
            f"this one is {architectures or 'of unknown architecture'} (use --task embed)"
        )
    if option == "rerank" and labels != 1:
        raise ModelLoadError(
            f"task 'rerank' needs a model with one output score (a cross-encoder); this one "
            f"has {labels} labels (use --task classify, which also takes text pairs)"
        )
    return option


def _max_tokens(description: Description, tokenizer: Any, config: Any, asked: int | None) -> int:
    """sentence-transformers' limit: `max_seq_length` when the model declares one, else
    the tokenizer's `model_max_length`; never past the position embeddings."""
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    model_max = getattr(tokenizer, "model_max_length", None)
    if description.max_seq_length is not None:
        limits.append(description.max_seq_length)
    elif isinstance(model_max, int) and model_max < 1_000_000:
        limits.append(model_max)
    ceiling = min(limits) if limits else 512
    if asked is None:
        return ceiling
    if not 1 <= asked <= ceiling:
        raise ModelLoadError(f"max_tokens must be between 1 and {ceiling}, got {asked}")
    return asked


DESCRIPTION_FILES = ["*.json", "*Dense*/*.safetensors"]


def _files(source: str) -> Path | None:
    """A local directory with the model's description files: `source` itself, or the
    hub snapshot of its JSON files and Dense weights (None when they cannot be had)."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=DESCRIPTION_FILES))
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {source!r}: {exc}") from exc


def _lower_case(tokenizer: Any) -> None:
    """`do_lower_case: true`: lowercase before tokenizing, as sentence-transformers does
    (a Lowercase normalizer in front, unless there is one)."""
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    current: Any = backend.normalizer
    if isinstance(current, normalizers.Lowercase):
        return
    if isinstance(current, normalizers.Sequence):
        parts: list[Any] = list(current)  # type: ignore[call-overload]
        if any(isinstance(n, normalizers.Lowercase) for n in parts):
            return
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *parts])
    elif current is None:
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase()])
    else:
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), current])


def _head(root: Path, description: Description, device: torch.device) -> EmbeddingHead:
    """Pooling and the Dense modules, their weights read from safetensors."""
    from safetensors.torch import load_file

    assert description.pooling is not None
    steps: list[tuple[Step, dict[str, torch.Tensor]]] = []
    for step in description.steps:
        weights: dict[str, torch.Tensor] = {}
        if isinstance(step, Dense):
            path = root / step.path / "model.safetensors"
            if not path.is_file():
                raise ModelLoadError(
                    f"the Dense module {step.path!r} has no model.safetensors; microbatch "
                    "loads safetensors only (convert it, e.g. by loading the model with "
                    "sentence-transformers and saving it again)"
                )
            weights = load_file(path)
        steps.append((step, weights))
    try:
        head = EmbeddingHead(description.pooling, steps)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    return head.eval().requires_grad_(False).to(device)


def _describe(source: str, task: TaskOption) -> tuple[Path | None, Description]:
    root = _files(source)
    try:
        description = read(root)
    except UnsupportedModel as exc:
        raise ModelLoadError(f"cannot serve model {source!r}: {exc}") from None
    if task == "embed" and description.kind == "cross-encoder":
        # The encoder under a cross-encoder's head, mean-pooled like any plain model.
        description = PLAIN
    return root, description


def load(options: LoadOptions) -> Loaded:
    """Load tokenizer and weights (safetensors only) and read what the model declares.
    Raises ModelLoadError."""
    source = options.source or default_source()
    device = pick_device(options.device)
    precision, probe_dtype = plan(options.dtype, device)
    dtype = precision.dtype
    shown = precision.name
    if probe_dtype is not None:
        shown += f", probing {str(probe_dtype).removeprefix('torch.')}"
    remote = options.trust_remote_code
    root, description = _describe(source, options.task)
    # A local directory is read from the transformer's folder; a hub id from its subfolder.
    local = Path(source).is_dir()
    where = str(Path(source) / description.transformer_path) if local else source
    subfolder = "" if local else description.transformer_path
    try:
        config = AutoConfig.from_pretrained(where, subfolder=subfolder, trust_remote_code=remote)
        task = resolve_task(options.task, config, description)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                where, subfolder=subfolder, trust_remote_code=remote
            )
        except TypeError as exc:
            # transformers 4.x, with protobuf installed, reports a missing vocabulary
            # file as a TypeError from its slow tokenizer (os.path.isfile(None)).
            raise ModelLoadError(
                f"cannot load model {source!r}: no tokenizer files could be read ({exc})"
            ) from exc
        auto = {"embed": AutoModel, "sparse": AutoModelForMaskedLM}.get(
            task, AutoModelForSequenceClassification
        )
        model = auto.from_pretrained(
            where, subfolder=subfolder, use_safetensors=True, trust_remote_code=remote,
            dtype=dtype,
        )  # fmt: skip
    except ModelLoadError:
        raise
    except (OSError, ValueError, ImportError) as exc:
        # Only the first line: transformers' messages run on with installation advice.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {source!r}: {reason}") from exc
    if not getattr(tokenizer, "is_fast", True):
        raise ModelLoadError(f"model {source!r} has no fast (Rust) tokenizer")
    if description.do_lower_case:
        _lower_case(tokenizer)
    model.eval().requires_grad_(False)
    model.to(device)
    name = options.name or (DEFAULT_HUB_ID if source == default_source() else source)
    max_tokens = _max_tokens(description, tokenizer, config, options.max_tokens)
    if task == "embed":
        if description.kind == "transformers":
            logger.info(
                "%s declares no sentence-transformers modules (no modules.json): serving mean "
                "pooling + L2 normalisation",
                name,
            )
            description = replace(
                PLAIN,
                pooling=Pooling(modes=("mean",), embedding_dimension=int(config.hidden_size)),
                normalize=True,
            )
        head = _head(root or Path(where), description, device)
        logger.info("loaded %s for embed on %s (%s): %s", name, device, shown, description)
        return Loaded(
            name, task, model, tokenizer, device, precision, max_tokens, (), description,
            head=head, probe_dtype=probe_dtype,
        )  # fmt: skip
    if task == "sparse":
        static = None
        if description.static_query is not None:
            static = _static_query((root or Path(source)) / description.static_query)
        logger.info("loaded %s for sparse on %s (%s): %s", name, device, shown, description)
        return Loaded(
            name, task, model, tokenizer, device, precision, max_tokens, (), description,
            probe_dtype=probe_dtype, static_query=static,
        )  # fmt: skip
    id2label = config.id2label
    labels = tuple(str(id2label[i]) for i in range(len(id2label)))
    try:
        activation, score = score_activation(config, description.activation)
    except ValueError as exc:
        raise ModelLoadError(f"cannot serve model {source!r}: {exc}") from None
    logger.info("loaded %s for %s on %s (%s), %s head", name, task, device, shown, activation)
    return Loaded(
        name,
        task,
        model,
        tokenizer,
        device,
        precision,
        max_tokens,
        labels,
        description,
        activation=activation,
        score=score,
        probe_dtype=probe_dtype,
    )
