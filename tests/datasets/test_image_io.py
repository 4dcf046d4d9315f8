"""Robust image reading: every mode to 8-bit RGB, EXIF orientation, corrupt files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vfmkd.datasets.image_io import CorruptImageError, check_image, check_images, load_image_rgb


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFMKD_CACHE_DIR", str(tmp_path / "cache"))


def _jpeg_bytes(array: np.ndarray, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


def test_grayscale_rgba_and_palette_become_rgb(tmp_path: Path) -> None:
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    palette = Image.fromarray(np.full((6, 8), 1, dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    loaded = load_image_rgb(tmp_path / "grey.png")
    assert loaded.shape == (6, 8, 3) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded[..., 1], grey)
    assert load_image_rgb(tmp_path / "rgba.png")[0, 0].tolist() == [200, 0, 0]
    assert load_image_rgb(tmp_path / "palette.png")[0, 0].tolist() == [10, 20, 30]


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    loaded = load_image_rgb(tmp_path / "deep.png")
    assert loaded[0, :, 0].tolist() == [0, 1, 128, 255]
    Image.fromarray(values.astype(np.int32), "I").save(tmp_path / "int.tif")
    assert load_image_rgb(tmp_path / "int.tif")[0, :, 2].tolist() == [0, 1, 128, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :10] = 255  # white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    (tmp_path / "rotated.jpg").write_bytes(_jpeg_bytes(array, exif=exif))
    loaded = load_image_rgb(tmp_path / "rotated.jpg")
    assert loaded.shape == (40, 20, 3)
    assert loaded[:10].mean() > 200 and loaded[20:].mean() < 50  # the band is now on top
    assert load_image_rgb(tmp_path / "rotated.jpg", apply_exif=False).shape == (20, 40, 3)
    assert (check_image(tmp_path / "rotated.jpg").height, check_image(tmp_path / "rotated.jpg").width) == (
        40,
        20,
    )


def test_corrupt_empty_and_truncated_files_raise_with_the_path(tmp_path: Path) -> None:
    good = _jpeg_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(1).bytes(500))
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    for name in ("empty.jpg", "noise.jpg", "truncated.jpg", "missing.jpg"):
        with pytest.raises(CorruptImageError) as caught:
            load_image_rgb(tmp_path / name)
        assert name in str(caught.value)
        assert not check_image(tmp_path / name).ok


def test_check_images_caches_answers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((5, 7, 3), dtype=np.uint8)).save(good)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cache = tmp_path / "checks.json"
    first = check_images([good, tmp_path / "bad.png"], cache_file=cache)
    assert [(result.height, result.width, result.ok) for result in first] == [(5, 7, True), (0, 0, False)]
    assert cache.is_file()
    second = check_images([good, tmp_path / "bad.png"], cache_file=cache)
    assert second == first
    # A changed file is checked again.
    Image.fromarray(np.zeros((9, 3, 3), dtype=np.uint8)).save(good)
    assert (
        check_images([good], cache_file=cache)[0].height,
        check_images([good], cache_file=cache)[0].width,
    ) == (9, 3)
