"""The fidelity tool reports how close our outputs are to the reference's."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.lab import fidelity
from tests.tiny_models import TEXTS, Kind, save_cross_encoder, save_embedder

pytestmark = pytest.mark.reference


def test_it_measures_an_embedder_and_a_reranker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    embedder = save_embedder(tmp_path / "embedder", Kind("cls", pooling="cls"))
    reranker = save_cross_encoder(tmp_path / "reranker")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    fidelity.main(["--model", str(embedder), "--model", str(reranker), "--texts", str(texts),
                   "--json", str(tmp_path / "out.json")])  # fmt: skip
    [vectors, scores] = [
        fidelity.measure(str(embedder), TEXTS),
        fidelity.measure(str(reranker), TEXTS),
    ]
    assert (vectors.task, vectors.computed) == ("embed", "sentence-transformers: cls, normalize")
    assert vectors.worst_cosine is not None
    assert vectors.worst_cosine >= 0.9999
    assert vectors.worst_norm_ratio is not None
    assert vectors.worst_norm_ratio < 1 + 1e-4
    assert scores.task == "rerank"
    assert scores.max_abs_diff is not None
    assert scores.max_abs_diff < 1e-4
    out = capsys.readouterr().out
    assert f"| {embedder} | embed | sentence-transformers: cls, normalize | {len(TEXTS)} |" in out
    assert (tmp_path / "out.json").is_file()
