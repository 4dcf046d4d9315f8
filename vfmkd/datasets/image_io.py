"""Robust image reading and the error types of the data path.

Images are read with PIL: EXIF orientation applied, every mode (grayscale, RGBA,
palette, CMYK, 16-bit, 32-bit integer, float) turned into 8-bit RGB, and a corrupt,
truncated or empty file raises :class:`CorruptImageError` naming the file.
:func:`check_images` validates many files quickly (header, ``verify()`` and the JPEG
end marker, no full decode) and caches the answers on disk keyed by file size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vfmkd.errors import UserError
from vfmkd.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".mpo", ".pgm", ".ppm"}
)
CACHE_VERSION = 1
# EXIF orientations 5-8 rotate by 90 degrees and swap height and width.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


class CorruptImageError(OSError):
    """An image file that cannot be decoded (corrupt, truncated, empty or not an image)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class DatasetError(UserError, ValueError):
    """A data set that cannot be used (empty, inconsistent names, missing files).

    The message names the file and what to do.
    """


@dataclass(frozen=True)
class Problem:
    """One problem found in a data set.

    Attributes:
        file: the file concerned (image, label file, annotation json, data yaml).
        line: 1-based line number in ``file``, or None.
        message: what is wrong (and, where useful, what was done about it).
        severity: ``error`` (the item is dropped or the data set is unusable) or
            ``warning`` (kept, but probably not what was meant).
    """

    file: str
    line: int | None
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{self.severity}: {where}: {self.message}"


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has one of the image suffixes the data sets read."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16/32-bit values are scaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            peak = 65535.0
        elif mode == "I":
            # NOTE: PIL opens 16-bit PNGs as mode I; treat values up to 65535 as 16-bit.
            top = float(values.max()) if values.size else 0.0
            peak = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
        else:
            top = float(np.nanmax(values)) if values.size else 0.0
            peak = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else top
        scaled = np.clip(np.nan_to_num(values) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(scaled[:, :, None], 3, axis=2), "RGB")
    if mode in ("P", "PA", "LA", "RGBA", "RGBa", "La"):
        # Transparent pixels keep their colour values; the alpha channel is dropped.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def load_image_rgb(path: str | Path, apply_exif: bool = True) -> np.ndarray:
    """Read an image as an RGB uint8 array.

    Args:
        path: image file.
        apply_exif: rotate/flip as the EXIF orientation tag says.

    Returns:
        ``[H, W, 3]`` uint8 array (H, W after the EXIF orientation).

    Raises:
        CorruptImageError: the file is empty, truncated, corrupt or not an image.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise CorruptImageError(path, "empty file (0 bytes)")
        with Image.open(path) as image:
            image.load()
            if apply_exif:
                image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
            array = np.asarray(rgb, dtype=np.uint8)
    except CorruptImageError:
        raise
    except FileNotFoundError:
        raise CorruptImageError(path, "file not found") from None
    except UnidentifiedImageError:
        raise CorruptImageError(path, "not an image PIL can identify") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptImageError(path, f"cannot decode ({error})") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise CorruptImageError(path, f"decoded to an unusable shape {array.shape}")
    return np.ascontiguousarray(array)


@dataclass(frozen=True)
class ImageCheck:
    """Result of a quick check of one image file.

    Attributes:
        height: height after the EXIF orientation (0 when the file is bad).
        width: width after the EXIF orientation (0 when the file is bad).
        error: why the file is unusable, or None.
    """

    height: int
    width: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def check_image(path: str | Path) -> ImageCheck:
    """Check an image without decoding all of it.

    Opens the header, runs ``PIL.Image.verify()`` and, for JPEG, checks the end-of-image
    marker (a missing marker means a truncated file).

    Returns:
        The oriented size, or the reason the file is unusable.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return ImageCheck(0, 0, "empty file (0 bytes)")
        with Image.open(path) as image:
            image.verify()  # must come first: it leaves the image unusable
        with Image.open(path) as image:
            width, height = image.size
            image_format = image.format
            orientation = image.getexif().get(0x0112, 1)
        if image_format in ("JPEG", "MPO"):
            with open(path, "rb") as file:
                file.seek(max(size - 2, 0))
                if file.read(2) != b"\xff\xd9":
                    return ImageCheck(0, 0, "truncated JPEG (no end-of-image marker)")
    except FileNotFoundError:
        return ImageCheck(0, 0, "file not found")
    except UnidentifiedImageError:
        return ImageCheck(0, 0, "not an image PIL can identify")
    except (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError) as error:
        return ImageCheck(0, 0, f"corrupt image ({error})")
    if width <= 0 or height <= 0:
        return ImageCheck(0, 0, f"image has no pixels ({width}x{height})")
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return ImageCheck(int(height), int(width))


def default_cache_dir() -> Path:
    """Folder of vfmkd's on-disk caches: ``$VFMKD_CACHE_DIR`` or ``~/.cache/vfmkd``."""
    return Path(os.environ.get("VFMKD_CACHE_DIR", Path.home() / ".cache" / "vfmkd"))


def _cache_file_for(paths: list[Path]) -> Path:
    anchor = str(paths[0].resolve().parent) if paths else "empty"
    digest = hashlib.sha1(anchor.encode("utf-8")).hexdigest()[:16]
    return default_cache_dir() / "image_checks" / f"{digest}.json"


def _read_cache(cache_file: Path) -> dict[str, list]:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def check_images(
    paths: Iterable[str | Path], cache_file: Path | None | bool = True, workers: int = 8
) -> list[ImageCheck]:
    """Check many images (see :func:`check_image`), in threads, with an on-disk cache.

    Args:
        paths: image files.
        cache_file: JSON cache of earlier answers keyed by resolved path, size and mtime;
            True picks one under :func:`default_cache_dir` from the images' folder,
            False or None disables it. An unwritable cache is skipped silently.
        workers: threads reading files.

    Returns:
        One :class:`ImageCheck` per path, in order.
    """
    paths = [Path(path) for path in paths]
    if cache_file is True:
        cache_file = _cache_file_for(paths)
    cached = _read_cache(cache_file) if cache_file else {}

    def stamp(path: Path) -> tuple[str, int, int] | None:
        try:
            status = path.stat()
        except OSError:
            return None
        return str(path.resolve()), status.st_size, status.st_mtime_ns

    stamps = [stamp(path) for path in paths]
    results: list[ImageCheck | None] = [None] * len(paths)
    todo: list[int] = []
    for index, key in enumerate(stamps):
        if key is None:
            results[index] = ImageCheck(0, 0, "file not found")
            continue
        entry = cached.get(key[0])
        if entry and entry[0] == key[1] and entry[1] == key[2]:
            results[index] = ImageCheck(entry[2], entry[3], entry[4])
        else:
            todo.append(index)
    if todo:
        if len(todo) > 16 and workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                checked = list(pool.map(check_image, [paths[index] for index in todo]))
        else:
            checked = [check_image(paths[index]) for index in todo]
        for index, result in zip(todo, checked):
            results[index] = result
        if cache_file:
            for index in todo:
                key, result = stamps[index], results[index]
                if key is not None and result is not None:
                    cached[key[0]] = [key[1], key[2], result.height, result.width, result.error]
            try:
                atomic_write_text(cache_file, json.dumps({"version": CACHE_VERSION, "entries": cached}))
            except OSError as error:
                logger.debug("image check cache %s not written: %s", cache_file, error)
    return [result for result in results if result is not None]
