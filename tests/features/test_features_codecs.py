"""Storage codecs: exact bfloat16 rounding, round trips, int8 fidelity, sizes."""

import numpy as np
import pytest
import torch

from vfmkd.features.codecs import (
    CODEC_NAMES,
    bfloat16_bits_to_float32,
    float32_to_bfloat16_bits,
    get_codec,
)


def _edge_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = [
        rng.standard_normal(4096).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 4096),
        np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                  np.finfo(np.float32).tiny, 1e-40, -1e-42], dtype=np.float32),
        # exact ties between two bfloat16 values: the kept lowest bit decides (to even)
        np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 3.0 + 2.0**-7], dtype=np.float32),
    ]
    return np.concatenate(values)


def test_bfloat16_bits_round_to_nearest_even_like_torch():
    values = _edge_values()
    ours = float32_to_bfloat16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert ours.dtype == np.uint16
    np.testing.assert_array_equal(ours, theirs)
    assert float32_to_bfloat16_bits(np.array([1.0 + 2.0**-8], np.float32))[0] == 0x3F80  # tie -> even (down)
    assert float32_to_bfloat16_bits(np.array([1.0 + 3 * 2.0**-8], np.float32))[0] == 0x3F82  # tie -> even (up)


def test_bfloat16_nan_stays_nan_and_decoding_is_exact():
    values = np.array([np.nan, -np.nan, np.float32(np.frombuffer(np.uint32(0xFFFFFFFF).tobytes(), np.float32)[0])],
                      dtype=np.float32)
    assert np.isnan(bfloat16_bits_to_float32(float32_to_bfloat16_bits(values))).all()
    bits = np.arange(0, 2**16, dtype=np.uint32).astype(np.uint16)
    decoded = bfloat16_bits_to_float32(bits)
    expected = (bits.astype(np.uint32) << 16).view(np.float32)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(decoded[finite], expected[finite])
    np.testing.assert_array_equal(np.isnan(decoded), np.isnan(expected))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_round_trip_accuracy(name):
    rng = np.random.default_rng(1)
    values = rng.standard_normal((3, 5, 6, 7)).astype(np.float32) * np.array([0.01, 1, 10, 100, 0.5])[None, :, None, None]
    values = values.astype(np.float32)
    codec = get_codec(name)
    stored, scale = codec.encode(values)
    assert stored.dtype == codec.storage_dtype and stored.shape == values.shape
    assert (scale is not None) == codec.has_scale
    if scale is not None:
        assert scale.shape == (3, 5) and scale.dtype == np.float32
    decoded = codec.decode(stored, scale)
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    relative = np.abs(decoded - values).max(axis=(2, 3)) / np.abs(values).max(axis=(2, 3))
    bound = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8, "int8": 0.5 / 127 + 1e-6}[name]
    assert relative.max() <= bound
    # one row decodes alone (how the store reads a memory-mapped row)
    row = codec.decode(stored[1], None if scale is None else scale[1])
    np.testing.assert_array_equal(row, decoded[1])


def test_int8_cosine_and_zero_channels():
    rng = np.random.default_rng(2)
    values = rng.standard_normal((4, 16, 32, 32)).astype(np.float32)
    values[0, 3] = 0.0
    codec = get_codec("int8")
    stored, scale = codec.encode(values)
    decoded = codec.decode(stored, scale)
    assert scale[0, 3] == 0.0 and not decoded[0, 3].any()
    flat, approx = values.reshape(4, -1), decoded.reshape(4, -1)
    cosine = (flat * approx).sum(1) / np.linalg.norm(flat, axis=1) / np.linalg.norm(approx, axis=1)
    assert cosine.min() >= 0.999
    assert np.abs(stored).max() <= 127


def test_sizes_and_unknown_codec():
    assert get_codec("float32").bytes_per_sample(256, 64, 64) == 256 * 64 * 64 * 4
    assert get_codec("float16").bytes_per_sample(256, 64, 64) == 256 * 64 * 64 * 2
    assert get_codec("bfloat16").bytes_per_sample(256, 64, 64) == 256 * 64 * 64 * 2
    assert get_codec("int8").bytes_per_sample(256, 64, 64) == 256 * 64 * 64 + 256 * 4
    with pytest.raises(ValueError, match="known: float16, bfloat16, float32, int8"):
        get_codec("fp8")
