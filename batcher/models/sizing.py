"""What a model will hold in memory once served, read from its files before it loads:
its weights at the served precision (the tensor shapes in its safetensors headers) and
the activations of its largest batch (from its config). The server adds up the models
it is asked to serve against the device's memory and refuses a set that cannot fit.

The activation figure is an upper bound for one encoder layer at a time, which is what
inference holds: the hidden states in and out, the feed-forward's inner states and the
attention scores, for `max_batch_size` inputs of the model's longest length; for a sparse
model, also its logits over the whole vocabulary.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from batcher.models.options import DtypeOption, LoadOptions, default_source

GiB = 2**30


@dataclass(frozen=True, slots=True)
class Footprint:
    """One model's memory once served, in bytes."""

    weights_bytes: int
    activation_bytes: int
    batch: int
    tokens: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    def describe(self) -> str:
        return (
            f"{self.total_bytes / GiB:.2f} GiB (weights {self.weights_bytes / GiB:.2f} + "
            f"activations of {self.batch} x {self.tokens} tokens "
            f"{self.activation_bytes / GiB:.2f})"
        )


def value_bytes(dtype: DtypeOption, device: str) -> int:
    """Bytes per value at the precision the server will choose: float16 on CUDA when
    `auto`; float32 elsewhere (the bfloat16 probe may halve it, not counted on)."""
    if dtype == "auto":
        return 2 if device.startswith("cuda") else 4
    return 4 if dtype == "float32" else 2


def model_dir(source: str | None) -> Path | None:
    """The local directory of a model source; None for a hub id (not looked up here)."""
    path = Path(source if source is not None else default_source()).expanduser()
    return path if (path / "config.json").is_file() else None


def parameters(directory: Path) -> int | None:
    """Values in the model's safetensors files (their headers only); None when it has none."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    count = 0
    for file in files:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            size = 1
            for dim in tensor["shape"]:
                size *= dim
            count += size
    return count


def footprint(options: LoadOptions, max_batch_size: int, device: str) -> Footprint | None:
    """`options`' model as served on `device` with batches of up to `max_batch_size`;
    None when its files are not local (a hub id) or its config lacks the sizes."""
    directory = model_dir(options.source)
    if directory is None:
        return None
    config = json.loads((directory / "config.json").read_text())
    hidden = config.get("hidden_size") or config.get("d_model")
    if not isinstance(hidden, int):
        return None
    inner = config.get("intermediate_size") or 4 * hidden
    heads = config.get("num_attention_heads") or 1
    tokens = options.max_tokens or _longest(directory, config)
    count = parameters(directory)
    if count is None:
        return None
    size = value_bytes(options.dtype, device)
    per_token = 3 * hidden + inner + heads * tokens
    if _is_sparse(directory):
        # A sparse (SPLADE) model: its logits over the vocabulary at every token, in the
        # model's precision, and their float32 weights before the pooling.
        vocab = int(config.get("vocab_size") or 0)
        per_token += vocab + vocab * 4 // size
    return Footprint(count * size, max_batch_size * tokens * per_token * size,
                     max_batch_size, tokens)  # fmt: skip


def _is_sparse(directory: Path) -> bool:
    """A SparseEncoder, by its sentence-transformers config (not by its architecture: many
    dense models are saved as `...ForMaskedLM`)."""
    declared = directory / "config_sentence_transformers.json"
    try:
        return bool(json.loads(declared.read_text()).get("model_type") == "SparseEncoder")
    except (OSError, ValueError):
        return False


def _longest(directory: Path, config: dict[str, object]) -> int:
    """The longest input the model is served with: sentence-transformers' max_seq_length
    where it declares one, else its position embeddings (at most 8,192)."""
    for name in ("sentence_bert_config.json", "sentence_xlnet_config.json"):
        declared = directory / name
        if declared.is_file():
            length = json.loads(declared.read_text()).get("max_seq_length")
            if isinstance(length, int):
                return length
    positions = config.get("max_position_embeddings")
    return min(positions if isinstance(positions, int) else 512, 8192)


def device_memory(device: str) -> int | None:
    """Bytes the device has: a CUDA device's total memory; on a CPU, the machine's
    memory within this process's cgroup limit; None where unknown (MPS)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    if device not in ("cpu", "auto"):
        return None
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return physical
    return min(physical, int(limit)) if limit.isdigit() else physical


def free_memory(device: str) -> int | None:
    """Bytes the device can still give: a CUDA device's free memory (the driver's
    figure, less what other processes hold); on a CPU, what the kernel counts as
    available (`MemAvailable`); None where unknown."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if device not in ("cpu", "auto"):
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def resolve_device(device: str) -> str:
    """`auto` as the server resolves it between CUDA and the CPU (MPS is not sized)."""
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"
