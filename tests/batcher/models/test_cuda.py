"""The device path on CUDA (run by `bash benchmarks/lab/gpu.sh`; skipped without a GPU):
CUDA graphs (`--compile-mode reduce-overhead`) give the vectors plain compile gives, for
every batch size and length, with no recompile after warm-up; batches prepared ahead
(pinned host memory, on another thread, through the engine) give the vectors the CPU
gives."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from batcher.models import CompileMode, LoadOptions, TextModel
from tests.batcher.models.test_reference import through_the_engine
from tests.batcher.models.test_text import sentences

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def vectors(model: TextModel, batches: list[list[str]]) -> list[torch.Tensor]:
    out = []
    for batch in batches:
        for value in model.predict([model.encoder.encode(t) for t in batch]):
            out.append(torch.tensor(value))
    return out


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_on_cuda_matches_eager_for_every_shape(
    tiny_encoder_dir: Path, mode: CompileMode
) -> None:
    on_cuda = LoadOptions(source=str(tiny_encoder_dir), device="cuda", dtype="float32")
    eager = TextModel.load(replace(on_cuda, compile=False))
    compiled = TextModel.load(replace(on_cuda, compile_mode=mode))
    compiled.warm_up(max_batch_size=32)
    assert compiled.compile_state.enabled, compiled.compile_state.error
    compiled.compile_state.stance = "fail_on_recompile"
    rng = random.Random(3)
    texts = [*sentences(300, seed=4), "word " * 200]
    batches = [rng.sample(texts, rng.randint(1, 32)) for _ in range(30)]
    for ours, reference in zip(vectors(compiled, batches), vectors(eager, batches), strict=True):
        assert torch.nn.functional.cosine_similarity(ours, reference, dim=0) > 0.9999
    assert compiled.compile_state.graphs_since_warm_up == 0


@pytest.mark.asyncio
async def test_batches_prepared_ahead_on_cuda_match_the_cpu(tiny_encoder_dir: Path) -> None:
    on_cpu = LoadOptions(source=str(tiny_encoder_dir), device="cpu", dtype="float32",
                         compile=False)  # fmt: skip
    model = TextModel.load(replace(on_cpu, device="cuda"))
    assert model.collates_ahead, "collating ahead is the default on CUDA"
    host = model.prepare([model.encoder.encode(t) for t in ("pinned", "memory")])
    assert host.input_ids.is_pinned()
    assert host.attention_mask.is_pinned()
    texts = sentences(200, seed=5)
    results, threads = await through_the_engine(model, texts, max_batch_size=8, thread="gpu")
    assert "gpu-collate_0" in threads
    reference = vectors(TextModel.load(on_cpu), [texts])
    for result, expected in zip(results, reference, strict=True):
        ours = torch.tensor(result.value)
        assert torch.nn.functional.cosine_similarity(ours, expected, dim=0) > 0.9999
