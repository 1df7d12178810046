"""What a sentence-transformers SparseEncoder declares: a masked-language model and its
`SpladePooling`, or the inference-free layout, a Router whose queries take a
`SparseStaticEmbedding` (a weight per vocabulary entry, no model) and whose documents the
other two. Pure file reading, as `batcher.models.description`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batcher.models.description import (
    Description,
    Splade,
    UnsupportedModel,
    class_name,
    prompts_of,
    read_json,
    transformer_of,
)

SPLADE_POOLINGS = ("max", "sum")
SPLADE_ACTIVATIONS = ("relu", "log1p_relu")


def sparse_encoder(
    root: Path, modules: list[dict[str, Any]], st_config: Mapping[str, Any]
) -> Description:
    """A SparseEncoder of one masked-language model and its `SpladePooling`, or the
    inference-free layout: a Router whose documents take those two and whose queries a
    `SparseStaticEmbedding`. Sparse auto-encoders (CSR) and other routes are refused."""
    names = [class_name(m) for m in modules]
    static_query = None
    if names == ["Router"]:
        modules, static_query = _routes(root, str(modules[0].get("path", "")))
        names = [class_name(m) for m in modules]
    if names[:1] not in (["Transformer"], ["MLMTransformer"]) or names[1:] != ["SpladePooling"]:
        shown = ", ".join(names) or "no modules.json"
        raise UnsupportedModel(
            f"this SparseEncoder is made of {shown}; microbatch serves SparseEncoders of a "
            "masked-language-model Transformer and SpladePooling (and inference-free "
            "Routers of those and a SparseStaticEmbedding; not sparse auto-encoders)"
        )
    transformer = transformer_of(root, modules[0], task="fill-mask")
    path = str(modules[1].get("path", ""))
    config = read_json(root / path / "config.json") or {}
    pooling = config.get("pooling_strategy", "max")
    activation = config.get("activation_function", "relu")
    if pooling not in SPLADE_POOLINGS or activation not in SPLADE_ACTIVATIONS:
        raise UnsupportedModel(
            f"SpladePooling with {pooling!r} pooling and {activation!r} activation; "
            f"microbatch computes {', '.join(SPLADE_POOLINGS)} of "
            f"{', '.join(SPLADE_ACTIVATIONS)}"
        )
    prompts, default_prompt_name = prompts_of(st_config)
    return Description(
        kind="sparse-encoder",
        transformer_path=transformer.path,
        max_seq_length=transformer.max_seq_length,
        do_lower_case=transformer.do_lower_case,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        splade=Splade(pooling, activation),
        static_query=static_query,
    )


def _routes(root: Path, path: str) -> tuple[list[dict[str, Any]], str]:
    """An inference-free Router's document modules (as modules.json entries, their
    folders relative to the root) and its query module's folder. Its default route (what
    a request that names none takes) must be the documents'."""
    config = read_json(root / path / "router_config.json") or {}
    types, structure = config.get("types") or {}, config.get("structure") or {}
    parameters = config.get("parameters") or {}
    query, document = structure.get("query") or [], structure.get("document") or []
    static = [types.get(q, "").rsplit(".", 1)[-1] for q in query]
    if set(structure) != {"query", "document"} or static != ["SparseStaticEmbedding"]:
        raise UnsupportedModel(
            f"this Router routes {sorted(structure)} through {static or 'nothing'} for "
            "queries; microbatch serves inference-free SparseEncoders: a "
            "SparseStaticEmbedding for queries, a Transformer and SpladePooling for documents"
        )
    if parameters.get("default_route", "document") != "document":
        raise UnsupportedModel(
            f"this Router's default route is {parameters.get('default_route')!r}; "
            "microbatch serves inputs that name no route as documents"
        )
    entries = [{"name": d, "path": str(Path(path) / d), "type": types.get(d, "")}
               for d in document]  # fmt: skip
    return entries, str(Path(path) / query[0])
