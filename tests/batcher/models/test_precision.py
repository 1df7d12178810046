"""`--dtype auto`: bfloat16 on a CPU with native bfloat16 only after the start-up probe
agrees with float32; float32 otherwise, with the reason. The detection is forced on or
off here, so that each branch runs on any CPU (bfloat16 runs everywhere, emulated where
the CPU lacks it)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from batcher.models import LoadOptions, TextModel
from batcher.models.precision import agreement, bf16_flags, judge, native_bf16, plan
from tests.tiny_models import save_cross_encoder


@pytest.fixture
def native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batcher.models.precision.native_bf16", lambda: True)


@pytest.fixture
def not_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batcher.models.precision.native_bf16", lambda: False)


def test_native_bfloat16_is_read_from_torchs_cpu_features() -> None:
    assert bf16_flags({"avx512_bf16": True, "amx_bf16": True, "avx2": True}) == [
        "amx_bf16",
        "avx512_bf16",
    ]
    assert bf16_flags({"bf16": True}) == ["bf16"]  # Arm
    assert bf16_flags({"avx512_f": True, "avx2": True}) == []  # Skylake: emulated only
    assert native_bf16({"avx512_f": True, "avx2": True}) is False


def test_plan_follows_the_option_and_the_hardware(native: None) -> None:
    cpu = torch.device("cpu")
    explicit, probe = plan("float32", cpu)
    assert (explicit.dtype, explicit.reason, probe) == (
        torch.float32,
        "asked for (--dtype float32)",
        None,
    )
    assert plan("bfloat16", cpu)[0].dtype == torch.bfloat16
    assert plan("auto", torch.device("cuda"))[0].dtype == torch.float16
    assert plan("auto", torch.device("mps"))[0].dtype == torch.float32
    loaded_in, probe = plan("auto", cpu)
    assert (loaded_in.dtype, probe) == (torch.float32, torch.bfloat16)


def test_plan_without_native_bfloat16_is_float32_and_says_why(not_native: None) -> None:
    precision, probe = plan("auto", torch.device("cpu"))
    assert (precision.dtype, probe) == (torch.float32, None)
    assert "no native bfloat16" in precision.reason


def test_agreement_is_per_vector_and_per_column_for_one_score() -> None:
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidate = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert agreement(reference, candidate).tolist() == pytest.approx([1.0, 2**-0.5])
    scores = torch.tensor([[1.0], [2.0], [3.0]])
    assert agreement(scores, scores * 2).tolist() == pytest.approx([1.0])
    assert agreement(scores, -scores).tolist() == pytest.approx([-1.0])


def test_judge_keeps_the_lower_precision_only_within_the_bound() -> None:
    reference = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    close = reference + 1e-4 * torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    kept = judge(reference, close, torch.bfloat16, 0.999)
    assert kept.dtype == torch.bfloat16
    assert kept.probe is not None
    assert (kept.probe.kept, kept.probe.inputs) == (True, 8)
    assert kept.probe.worst >= 0.999
    off = reference.clone()
    off[3] = torch.randn(16)
    refused = judge(reference, off, torch.bfloat16, 0.999)
    assert refused.dtype == torch.float32
    assert refused.probe is not None
    assert refused.probe.kept is False
    assert refused.probe.worst < 0.999
    assert "was probed and refused" in refused.reason
    assert "--min-accuracy" in refused.reason
    broken = close.clone()
    broken[0, 0] = float("nan")
    assert judge(reference, broken, torch.bfloat16, 0.5).dtype == torch.float32


@pytest.mark.reference
def test_auto_probes_the_default_model_and_keeps_bfloat16(
    native: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="batcher.models"):
        model = TextModel.load(LoadOptions(compile=False))
    assert model.dtype == torch.bfloat16
    assert next(model.loaded.model.parameters()).dtype == torch.bfloat16
    described = model.describe()
    assert described["dtype"] == "bfloat16"
    probe = described["precision"]["probe"]  # type: ignore[index]
    assert probe["kept"] is True
    assert probe["inputs"] == 32
    assert 0.999 <= probe["worst_cosine"] <= probe["mean_cosine"] <= 1.0
    assert "precision bfloat16" in caplog.text


@pytest.mark.reference
def test_auto_refuses_bfloat16_below_the_bound_and_serves_float32(
    native: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="batcher.models"):
        model = TextModel.load(LoadOptions(compile=False, min_accuracy=0.99999999))
    assert model.dtype == torch.float32
    assert next(model.loaded.model.parameters()).dtype == torch.float32
    precision = model.describe()["precision"]
    assert precision["dtype"] == "float32"  # type: ignore[index]
    assert precision["probe"]["kept"] is False  # type: ignore[index]
    assert "bfloat16 was probed and refused (worst cosine 0.99" in caplog.text
    # Still float32's numbers: the float32 weights were kept, not cast back.
    [vector] = model.predict([model.encoder.encode("the float32 weights are intact")])
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.reference
def test_no_probe_without_native_bfloat16(not_native: None) -> None:
    model = TextModel.load(LoadOptions(compile=False))
    assert model.dtype == torch.float32
    precision = model.describe()["precision"]
    assert precision["probe"] is None  # type: ignore[index]
    assert "no native bfloat16" in precision["reason"]  # type: ignore[index]


def test_a_reranker_is_probed_on_text_pairs(native: None, tmp_path: Path) -> None:
    model = TextModel.load(
        LoadOptions(source=str(save_cross_encoder(tmp_path / "m")), compile=False)
    )
    assert model.task == "rerank"
    probe = model.describe()["precision"]["probe"]  # type: ignore[index]
    assert probe["inputs"] == 32  # 32 pairs: one column of scores, compared as one vector
    assert probe["kept"] == (model.dtype == torch.bfloat16)


def test_an_explicit_dtype_is_not_probed(native: None, tiny_encoder_dir: Path) -> None:
    model = TextModel.load(
        LoadOptions(source=str(tiny_encoder_dir), dtype="bfloat16", compile=False)
    )
    assert model.dtype == torch.bfloat16
    assert model.describe()["precision"] == {
        "dtype": "bfloat16",
        "reason": "asked for (--dtype bfloat16)",
        "probe": None,
    }


@pytest.mark.slow
@pytest.mark.reference
def test_bfloat16_holds_its_bound_against_sentence_transformers() -> None:
    """bfloat16 as the probe would keep it, over 500 texts of the benchmark corpus,
    against sentence-transformers in float32."""
    from sentence_transformers import SentenceTransformer

    from batcher.models import default_source
    from benchmarks.corpus import builtin

    texts = builtin(500, seed=11).texts
    reference = SentenceTransformer(default_source(), device="cpu").encode(texts, batch_size=32)
    model = TextModel.load(LoadOptions(dtype="bfloat16", compile=False))
    ours = np.concatenate(
        [
            np.array(model.predict([model.encoder.encode(t) for t in texts[i : i + 32]]))
            for i in range(0, len(texts), 32)
        ]
    )
    cosines = (ours * reference).sum(axis=1) / np.linalg.norm(reference, axis=1)
    assert cosines.min() >= 0.999, f"worst cosine {cosines.min():.5f}"
