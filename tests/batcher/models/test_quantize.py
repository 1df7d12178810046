"""Quantized embeddings against sentence-transformers' `quantize_embeddings`, the
reference: binary and ubinary bit for bit, int8 and uint8 bit for bit given the same
ranges; and what the ranges are."""

from __future__ import annotations

import numpy as np
import pytest

from batcher.models import Calibration, quantize_as

pytestmark = pytest.mark.reference

RNG = np.random.default_rng(0)


def vectors(rows: int, dims: int) -> np.ndarray:
    out = RNG.standard_normal((rows, dims)).astype(np.float32)
    out[0, : min(dims, 5)] = 0.0  # zero is not positive: its bit is 0
    return out


@pytest.mark.parametrize("dims", [384, 13, 8, 1])
@pytest.mark.parametrize("kind", ["binary", "ubinary"])
def test_binary_is_the_references_bit_for_bit(kind: str, dims: int) -> None:
    from sentence_transformers import quantize_embeddings

    x = vectors(20, dims)
    ours = quantize_as(x, kind)  # type: ignore[arg-type]
    reference = quantize_embeddings(x, kind)
    assert ours.dtype == reference.dtype == (np.int8 if kind == "binary" else np.uint8)
    assert ours.shape == (20, (dims + 7) // 8)
    np.testing.assert_array_equal(ours, reference)


def _reference_clips() -> bool:
    """Whether this sentence-transformers clips values outside the ranges (older ones
    let them wrap around)."""
    from sentence_transformers import quantize_embeddings

    outside = np.array([[2.0, -2.0]], dtype=np.float32)
    ranges = np.array([[-1.0, -1.0], [1.0, 1.0]], dtype=np.float32)
    return quantize_embeddings(outside, "int8", ranges=ranges).tolist() == [[127, -128]]


@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_int8_is_the_references_bit_for_bit_given_the_same_ranges(kind: str) -> None:
    from sentence_transformers import quantize_embeddings

    if not _reference_clips():
        pytest.skip("this sentence-transformers wraps values outside the ranges around")
    calibration = vectors(50, 64)
    ranges = np.vstack((calibration.min(axis=0), calibration.max(axis=0)))
    ranges[:, 3] = 0.25  # a dimension with one value: steps of 1
    x = vectors(30, 64) * 1.5  # some values beyond the calibration's: clipped
    ours = quantize_as(x, kind, ranges)  # type: ignore[arg-type]
    reference = quantize_embeddings(x, kind, ranges=ranges)
    np.testing.assert_array_equal(ours, reference)
    assert ours.dtype == reference.dtype
    low, high = (-128, 127) if kind == "int8" else (0, 255)
    assert ours.min() == low
    assert ours.max() == high


@pytest.mark.parametrize(
    ("dims", "normalize"), [(None, True), (4, True), (None, False), (7, False)]
)
def test_a_calibration_quantizes_as_the_reference_calibrated_on_its_vectors(
    dims: int | None, normalize: bool
) -> None:
    """The reference, given the calibration set's vectors under the request's options as
    `calibration_embeddings`, gives the same bytes as our fixed ranges for those options."""
    from sentence_transformers import quantize_embeddings

    if not _reference_clips():
        pytest.skip("this sentence-transformers wraps values outside the ranges around")
    raw = RNG.standard_normal((40, 16)).astype(np.float32) * 3
    calibration = Calibration(raw.astype("<f4").tobytes(), 16, "test (40 texts)")
    x = RNG.standard_normal((25, 16)).astype(np.float32) * 3
    x = x[:, :dims] if dims is not None else x
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    cut = raw[:, :dims] if dims is not None else raw
    if normalize:
        cut = cut / np.linalg.norm(cut, axis=1, keepdims=True)
    for kind in ("int8", "uint8"):
        ours = quantize_as(x, kind, calibration.ranges(dims, normalize))  # type: ignore[arg-type]
        reference = quantize_embeddings(x, kind, calibration_embeddings=cut)
        np.testing.assert_array_equal(ours, reference)


def test_ranges_follow_each_requests_cut_and_normalisation() -> None:
    raw = RNG.standard_normal((40, 16)).astype(np.float32) * 3
    calibration = Calibration(raw.astype("<f4").tobytes(), 16, "test (40 texts)")
    assert calibration.count == 40
    whole = calibration.ranges(None, False)
    np.testing.assert_array_equal(whole, np.vstack((raw.min(axis=0), raw.max(axis=0))))
    cut = raw[:, :4] / np.linalg.norm(raw[:, :4], axis=1, keepdims=True)
    np.testing.assert_allclose(
        calibration.ranges(4, True), np.vstack((cut.min(axis=0), cut.max(axis=0))), rtol=1e-6
    )
    assert calibration.ranges(4, True) is calibration.ranges(4, True)  # computed once
