"""The math that turns a transformer's outputs into what the model's description says:
pooling, Dense and inner Normalize modules (inside the compiled forward pass), then, once
per batch on the host, each item's own options (`dimensions`, `normalize`, raw or
activated scores).

The reference is sentence-transformers (`Pooling`, `Dense`, `Normalize`, `CrossEncoder`)
and transformers' classification heads; `tests/batcher/models/test_reference.py` compares
against them. Pooling reads the masks only, never the padding side, so that an item's
vector does not depend on what it was batched with.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batcher.models.description import Dense, Pooling, PoolingMode, Splade, Step
from batcher.models.outputs import SparseVector, sparse_vector


def activation_module(dotted: str) -> nn.Module:
    """`torch.nn.modules.activation.Tanh` -> `nn.Tanh()`, as sentence-transformers builds
    it. Raises ValueError for anything but a torch.nn module class."""
    module_name, _, class_name = dotted.rpartition(".")
    if not module_name.startswith("torch.nn"):
        raise ValueError(f"{dotted!r} is not a torch.nn activation")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise ValueError(f"{dotted!r} does not exist in this torch") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{dotted!r} is not a torch.nn module class")
    module: nn.Module = cls()
    return module


def pool(
    hidden: Tensor, attention_mask: Tensor, pool_mask: Tensor, modes: Sequence[PoolingMode]
) -> Tensor:
    """One vector per row of `hidden` [batch, length, dim], the modes concatenated.

    `attention_mask` marks real tokens; `pool_mask` the tokens to pool (the real ones minus
    any prompt the model leaves out). Computed in float32 whatever the model's dtype."""
    hidden = hidden.float()
    mask = pool_mask.unsqueeze(-1).to(hidden.dtype)
    vectors: list[Tensor] = []
    for mode in modes:
        if mode == "cls":
            # The first pooled token: position 0 unless a prompt is left out.
            first = pool_mask.to(torch.int32).argmax(dim=1)
            vectors.append(_gather(hidden, first))
        elif mode == "max":
            vectors.append(hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            summed = (hidden * mask).sum(dim=1)
            count = mask.sum(dim=1).clamp(min=1e-9)
            vectors.append(summed / (count if mode == "mean" else count.sqrt()))
        elif mode == "weightedmean":
            # Weights 1, 2, ... from the first real token (left padding shifts them).
            positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device)
            offset = attention_mask.to(torch.int32).argmax(dim=1, keepdim=True)
            weights = (positions.unsqueeze(0) - offset).unsqueeze(-1).to(hidden.dtype) * mask
            summed = (hidden * weights).sum(dim=1)
            vectors.append(summed / weights.sum(dim=1).clamp(min=1e-9))
        elif mode == "lasttoken":
            # The last real token, wherever the padding is.
            length = pool_mask.shape[1]
            found, from_end = pool_mask.flip(1).max(dim=1)
            from_end = torch.where(found == 0, length - 1, from_end)
            vectors.append(_gather(hidden, length - 1 - from_end))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}; this is a bug")
    return torch.cat(vectors, dim=-1)


def _gather(hidden: Tensor, index: Tensor) -> Tensor:
    picked = index.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return torch.gather(hidden, 1, picked).squeeze(1)


class DenseLayer(nn.Module):
    """sentence-transformers' `Dense`: activation(linear(x)), plus the input when residual."""

    def __init__(self, spec: Dense, weights: dict[str, Tensor]) -> None:
        super().__init__()
        self.linear = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
        self.activation = activation_module(spec.activation)
        self.residual: nn.Module | None = None
        if spec.use_residual:
            same = spec.in_features == spec.out_features
            self.residual = (
                nn.Identity() if same else nn.Linear(spec.in_features, spec.out_features, False)
            )
        state = {k: v.float() for k, v in weights.items()}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the Dense module {spec.path!r} has weights {sorted(weights)}; expected "
                f"{sorted(self.state_dict())}"
            )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.activation(self.linear(x))
        if self.residual is not None:
            out = out + self.residual(x)
        return out


class _Normalize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2.0, dim=-1)


class EmbeddingHead(nn.Module):
    """Pooling, then the modules that follow it (a trailing Normalize is left to
    `finish_embeddings`, since a request may turn it off or truncate first)."""

    def __init__(self, pooling: Pooling, steps: Sequence[tuple[Step, dict[str, Tensor]]]) -> None:
        super().__init__()
        self.modes = pooling.modes
        self.steps = nn.ModuleList(
            DenseLayer(step, weights) if isinstance(step, Dense) else _Normalize()
            for step, weights in steps
        )

    def forward(self, hidden: Tensor, attention_mask: Tensor, pool_mask: Tensor) -> Tensor:
        x = pool(hidden, attention_mask, pool_mask, self.modes)
        for step in self.steps:
            x = step(x)
        return x


def splade(logits: Tensor, attention_mask: Tensor, spec: Splade) -> Tensor:
    """sentence-transformers' `SpladePooling`: one weight per vocabulary entry, the max
    (or sum) over the real tokens of log(1 + relu(logit)) (`log1p_relu`: its log1p
    again), in float32. Padding rows are zeroed before the activation, as there."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    weights = (logits.float() * mask).relu().log1p()
    if spec.activation == "log1p_relu":
        weights = weights.log1p()
    return weights.amax(dim=1) if spec.pooling == "max" else weights.sum(dim=1)


def sparse_rows(weights: Tensor, top_k: Sequence[int | None]) -> list[SparseVector]:
    """Each row's nonzero weights by vocabulary index (ascending), the `top_k` largest
    kept where asked (sentence-transformers' `max_active_dims`); one host copy."""
    host = weights.float().cpu().numpy()
    out = []
    for row, k in zip(host, top_k, strict=True):
        indices = np.flatnonzero(row)
        out.append(sparse_vector(indices, row[indices], k))
    return out


K = TypeVar("K", bound=Hashable)


def by_group(keys: Sequence[K]) -> dict[K, list[int]]:
    """Row indices per distinct key, in first-seen order (usually one group)."""
    groups: dict[K, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    return groups


def finish_embeddings(
    vectors: Tensor,
    dimensions: Sequence[int | None],
    normalize: Sequence[bool],
    packed: bool = False,
) -> list[list[float]] | list[bytes]:
    """Each row cut to its `dimensions` (Matryoshka: the first N), then L2-normalised if
    asked, as `SentenceTransformer.encode(truncate_dim=N, normalize_embeddings=...)` does.
    One `tolist` per group of rows with the same options; `packed`: each row as the bytes
    of its float32 values instead (for another process: `batcher.models.wire`)."""
    vectors = vectors.float()
    out: list[Any] = [None] * vectors.shape[0]
    for (dims, norm), rows in by_group(list(zip(dimensions, normalize, strict=True))).items():
        part = vectors if len(rows) == len(out) else vectors[rows]
        if dims is not None:
            part = part[:, :dims]
        if norm:
            part = F.normalize(part, p=2.0, dim=-1)
        if packed:
            host = part.contiguous().numpy().astype("<f4", copy=False)
            values: list[Any] = [r.tobytes() for r in host]
        else:
            values = part.tolist()
        for row, value in zip(rows, values, strict=True):
            out[row] = value
    return out


def score_activation(config: Any, declared: str | None) -> tuple[str, Callable[[Tensor], Tensor]]:
    """The activation of a classification head and its name.

    One output: the CrossEncoder's declared `activation_fn`, else a sigmoid (what
    `CrossEncoder.predict` and transformers' pipeline both apply). Several:
    `multi_label_classification` -> a sigmoid per label; otherwise a softmax."""
    if int(config.num_labels) == 1:
        if declared is not None:
            return declared, activation_module(declared)
        return "sigmoid", torch.sigmoid
    if getattr(config, "problem_type", None) == "multi_label_classification":
        return "sigmoid", torch.sigmoid
    return "softmax", lambda logits: torch.softmax(logits, dim=-1)
