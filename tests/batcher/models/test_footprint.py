"""A model's footprint, read from its files before it loads, against what torch holds
once it is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batcher.models import LoadOptions
from batcher.models.sizing import footprint, parameters, value_bytes
from tests.tiny_models import save_bert, save_sparse_encoder


def test_the_weights_are_the_safetensors_values_at_the_served_precision(tmp_path: Path) -> None:
    from transformers import AutoModel

    path = save_bert(tmp_path / "bert")
    loaded = AutoModel.from_pretrained(path)
    values = sum(p.numel() for p in loaded.state_dict().values())
    assert parameters(path) == values
    fp32 = footprint(LoadOptions(source=str(path), dtype="float32"), 32, "cpu")
    half = footprint(LoadOptions(source=str(path), dtype="bfloat16"), 32, "cpu")
    assert fp32 is not None
    assert half is not None
    assert fp32.weights_bytes == 4 * values
    assert half.weights_bytes == 2 * values
    config = loaded.config
    per_token = 3 * config.hidden_size + config.intermediate_size
    per_token += config.num_attention_heads * config.max_position_embeddings
    assert fp32.activation_bytes == 32 * config.max_position_embeddings * per_token * 4
    smaller = footprint(LoadOptions(source=str(path), dtype="float32", max_tokens=16), 8, "cpu")
    assert smaller is not None
    assert smaller.activation_bytes < fp32.activation_bytes / 4


@pytest.mark.parametrize(
    ("dtype", "device", "size"),
    [("auto", "cuda:0", 2), ("auto", "cpu", 4), ("float16", "cpu", 2), ("float32", "cuda", 4)],
)
def test_auto_counts_what_the_server_chooses(dtype: str, device: str, size: int) -> None:
    assert value_bytes(dtype, device) == size  # type: ignore[arg-type]


def test_a_hub_id_is_not_sized(tmp_path: Path) -> None:
    assert footprint(LoadOptions(source="someone/some-model"), 32, "cpu") is None


def test_a_sparse_model_counts_its_logits_over_the_vocabulary(tmp_path: Path) -> None:
    """A SPLADE model's batch holds logits of the vocabulary's width at every token, and
    their float32 weights: 30,522 values a token where the layers hold a few hundred."""
    import torch
    from transformers import AutoModelForMaskedLM

    path = save_sparse_encoder(tmp_path / "splade")
    dense = footprint(LoadOptions(source=str(save_bert(tmp_path / "bert")), dtype="float32"),
                      8, "cpu")  # fmt: skip
    sparse = footprint(LoadOptions(source=str(path), dtype="float32"), 8, "cpu")
    assert dense is not None
    assert sparse is not None
    model = AutoModelForMaskedLM.from_pretrained(path)
    with torch.inference_mode():
        logits = model(input_ids=torch.ones((8, sparse.tokens), dtype=torch.long)).logits
    held = logits.numel() * logits.element_size() * 2  # the logits and their float32 weights
    assert sparse.activation_bytes - dense.activation_bytes == held
    # A dense model saved as ...ForMaskedLM (all-mpnet-base-v2 is) holds no such logits.
    declared = path / "config_sentence_transformers.json"
    config = json.loads(declared.read_text())
    declared.write_text(json.dumps({**config, "model_type": "SentenceTransformer"}))
    again = footprint(LoadOptions(source=str(path), dtype="float32"), 8, "cpu")
    assert again is not None
    assert again.activation_bytes == dense.activation_bytes
