"""Which description a model's files hold (`batcher.models.description`: a
SentenceTransformer or a CrossEncoder; `batcher.models.sparse_description`: a
SparseEncoder), read the way sentence-transformers reads them."""

from __future__ import annotations

from pathlib import Path

from batcher.models.description import (
    PLAIN,
    Description,
    UnsupportedModel,
    cross_encoder,
    is_legacy_cross_encoder,
    read_json,
    sentence_transformer,
)
from batcher.models.sparse_description import sparse_encoder


def read(root: Path | None) -> Description:
    """The description of the model in directory `root` (None: files not available, e.g.
    a hub id not downloaded). Raises UnsupportedModel."""
    if root is None:
        return PLAIN
    st_config = read_json(root / "config_sentence_transformers.json") or {}
    model_type = st_config.get("model_type")
    if model_type not in (None, "SentenceTransformer", "CrossEncoder", "SparseEncoder"):
        raise UnsupportedModel(
            f"this is a sentence-transformers {model_type}; microbatch serves "
            "SentenceTransformer (dense embeddings), SparseEncoder and CrossEncoder models"
        )
    modules = read_json(root / "modules.json")
    if model_type == "SparseEncoder":
        return sparse_encoder(root, modules or [], st_config)
    if model_type == "CrossEncoder" or (modules is None and is_legacy_cross_encoder(root)):
        return cross_encoder(root, modules, st_config)
    if modules is None:
        return PLAIN
    return sentence_transformer(root, modules, st_config)
