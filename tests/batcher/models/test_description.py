"""Reading what a model declares, and refusing what cannot be computed exactly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from batcher.models import LoadOptions, ModelLoadError, TextModel, load
from tests.tiny_models import (
    Kind,
    save_cross_encoder,
    save_embedder,
    save_multi_label_classifier,
    save_nli_classifier,
)

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kind = Kind("dense", pooling="cls", dense=True, prompts={"q": "query: "})
    return save_embedder(tmp_path_factory.mktemp("dense") / "model", kind)


def copy_of(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_a_current_save_without_max_seq_length_loads_at_the_tokenizer_limit(saved: Path) -> None:
    assert "max_seq_length" not in json.loads((saved / "sentence_bert_config.json").read_text())
    loaded = load(LoadOptions(source=str(saved)))
    assert (loaded.task, loaded.max_tokens) == ("embed", 128)
    assert loaded.description.pooling is not None
    assert loaded.description.pooling.modes == ("cls",)
    assert loaded.description.embedding_dimension == 16  # the Dense module's width


def test_the_legacy_layout_reads_its_flags_and_max_seq_length(tmp_path: Path) -> None:
    kind = Kind("legacy", pooling="weightedmean", layout="legacy", max_seq_length=40)
    loaded = load(LoadOptions(source=str(save_embedder(tmp_path / "model", kind))))
    assert loaded.description.pooling is not None
    assert loaded.description.pooling.modes == ("weightedmean",)
    assert loaded.max_tokens == 40


def test_a_module_we_cannot_reproduce_is_refused_by_name(saved: Path, tmp_path: Path) -> None:
    path = copy_of(saved, tmp_path / "model")
    modules = json.loads((path / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_LayerNorm",
                       "type": "sentence_transformers.models.LayerNorm"})  # fmt: skip
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match=r"LayerNorm.*cannot be computed exactly"):
        load(LoadOptions(source=str(path)))


def test_code_outside_sentence_transformers_is_refused(saved: Path, tmp_path: Path) -> None:
    path = copy_of(saved, tmp_path / "model")
    modules = json.loads((path / "modules.json").read_text())
    modules[1]["type"] = "my_package.FancyPooling"
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match=r"'my_package.FancyPooling', code that is not part"):
        load(LoadOptions(source=str(path)))


def test_dense_weights_must_be_safetensors(saved: Path, tmp_path: Path) -> None:
    path = copy_of(saved, tmp_path / "model")
    dense = next(path.glob("*_Dense"))
    (dense / "model.safetensors").rename(dense / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"has no model\.safetensors; microbatch loads"):
        load(LoadOptions(source=str(path)))


def test_sparse_encoders_other_than_mlm_and_splade_pooling_are_refused(
    saved: Path, tmp_path: Path
) -> None:
    path = copy_of(saved, tmp_path / "model")
    config = json.loads((path / "config_sentence_transformers.json").read_text())
    (path / "config_sentence_transformers.json").write_text(
        json.dumps({**config, "model_type": "SparseEncoder"})
    )
    with pytest.raises(ModelLoadError, match="this SparseEncoder is made of Transformer, Pooling"):
        load(LoadOptions(source=str(path)))
    # A Router whose query route is not a SparseStaticEmbedding.
    router = "sentence_transformers.base.modules.router.Router"
    (path / "modules.json").write_text(
        json.dumps([{"idx": 0, "name": "0", "path": "", "type": router}])
    )
    (path / "router_config.json").write_text(json.dumps({
        "types": {"query_0_X": "sentence_transformers.sparse_encoder.modules.SparseAutoEncoder"},
        "structure": {"query": ["query_0_X"], "document": []},
    }))  # fmt: skip
    with pytest.raises(ModelLoadError, match="through \\['SparseAutoEncoder'\\] for queries"):
        load(LoadOptions(source=str(path)))


def test_a_sparse_task_needs_a_sparse_encoder(saved: Path) -> None:
    with pytest.raises(ModelLoadError, match="it is not a SparseEncoder"):
        load(LoadOptions(source=str(saved), task="sparse"))


def test_a_plain_transformers_directory_is_mean_pooled_and_says_so(
    tiny_encoder_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="batcher.models"):
        model = TextModel.load(LoadOptions(source=str(tiny_encoder_dir), compile=False))
    assert "declares no sentence-transformers modules" in caplog.text
    described = model.describe()
    assert described["description"] == "transformers"
    assert (described["pooling"], described["normalize"]) == (["mean"], True)


def test_the_task_follows_the_model(tmp_path: Path) -> None:
    cross_encoder = save_cross_encoder(tmp_path / "ce")
    legacy_cross_encoder = save_cross_encoder(tmp_path / "ce-legacy", "legacy")
    nli = save_nli_classifier(tmp_path / "nli")
    multi = save_multi_label_classifier(tmp_path / "multi")
    assert load(LoadOptions(source=str(cross_encoder))).task == "rerank"
    legacy = load(LoadOptions(source=str(legacy_cross_encoder)))
    assert (legacy.task, legacy.activation) == ("rerank", "torch.nn.modules.linear.Identity")
    assert load(LoadOptions(source=str(nli))).task == "classify"
    assert load(LoadOptions(source=str(multi))).activation == "sigmoid"
    assert load(LoadOptions(source=str(cross_encoder), task="classify")).task == "classify"
    with pytest.raises(ModelLoadError, match="'rerank' needs a model with one output score"):
        load(LoadOptions(source=str(nli), task="rerank"))


def test_rerank_needs_a_cross_encoder(saved: Path) -> None:
    with pytest.raises(ModelLoadError, match="'rerank' needs a sequence-classification model"):
        load(LoadOptions(source=str(saved), task="rerank"))
