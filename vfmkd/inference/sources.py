"""What ``vfmkd predict`` runs on: the images of a source and the prompts of a prompts file.

A source is an image file, a folder (searched recursively), a glob (``photos/**/*.jpg``)
or a ``.txt`` list of image paths (one a line; relative paths are relative to the list's
folder; blank lines and ``#`` comments are skipped). Each image gets a ``name``: its path
relative to the source's folder, ``/``-separated, which names its drawn copy in the
output folder, its ``file_name`` in ``predictions.json`` and its entry in a prompts file.

A prompts file is JSON, one entry per image (keyed by that name, the image's path as
listed, or its file name), in the image's original pixels::

    {"street.jpg": {"boxes": [[10, 20, 200, 180]],
                    "points": [[[120.5, 80.5], 1], [[[40.5, 60.5], 1], [[45.5, 90.5], 0]]]}}

``boxes`` are ``[x1, y1, x2, y2]``; each entry of ``points`` is one prompt: one
``[[x, y], label]`` point or a list of them (label 1: on the object, 0: not on it).
Coordinates are continuous: the image's top-left corner is (0, 0) and the centre of the
pixel in column ``c``, row ``r`` is ``(c + 0.5, r + 0.5)``, as the predicted boxes are, so a
predicted box can be given back as a prompt.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vfmkd.datasets.folder import find_images
from vfmkd.datasets.image_io import IMAGE_SUFFIXES, is_image_file
from vfmkd.errors import UserError

__all__ = [
    "ImageEntry",
    "ImagePrompts",
    "PredictError",
    "list_images",
    "match_prompts",
    "parse_prompts",
    "read_prompts",
    "to_image_prompts",
]

logger = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt",)
PROMPT_KEYS = ("boxes", "points")
_GLOB_CHARACTERS = frozenset("*?[")
_SOURCE_FORMS = "an image, a folder, a quoted glob ('photos/**/*.jpg') or a .txt list of image paths"


class PredictError(UserError, ValueError):
    """A source, prompts file or option ``vfmkd predict`` cannot use; the message says which and what to do."""


@dataclass(frozen=True)
class ImageEntry:
    """One image of a source.

    Attributes:
        path: the file to read.
        name: its path relative to the source's folder, ``/``-separated (unique in a source).
    """

    path: Path
    name: str


@dataclass(frozen=True)
class ImagePrompts:
    """One image's prompts in its original pixels.

    Attributes:
        boxes: ``[Nb, 4]`` float64 xyxy, one prompt each.
        points: ``[Np, K, 2]`` float64 xy, one prompt per row (K: the most points of a
            prompt; shorter prompts are padded).
        point_labels: ``[Np, K]`` int64: 1 on the object, 0 not on it, -1 padding.
    """

    boxes: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray

    @property
    def count(self) -> int:
        """How many prompts (masks asked for): boxes first, then point prompts."""
        return len(self.boxes) + len(self.points)


def list_images(source: str | Path) -> list[ImageEntry]:
    """The images of a source, in order (see the module doc for the accepted forms).

    Files listed but missing or unreadable are kept: reading them fails later, and the
    caller skips them with a warning.

    Raises:
        PredictError: nothing at ``source``, or no image in it.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        paths = find_images(path)
        if not paths:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise PredictError(f"{path}: no images in this folder (image suffixes: {suffixes})")
        return [ImageEntry(image, image.relative_to(path).as_posix()) for image in paths]
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return _named(_read_list(path))
    if path.is_file():
        if not is_image_file(path):
            raise PredictError(
                f"{path}: not an image (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}); give {_SOURCE_FORMS}"
            )
        return [ImageEntry(path, path.name)]
    if _GLOB_CHARACTERS & set(text):
        matches = sorted(Path(match) for match in glob.glob(os.path.expanduser(text), recursive=True))
        images = [match for match in matches if match.is_file() and is_image_file(match)]
        if not images:
            raise PredictError(f"{text}: the glob matches no image files ({len(matches)} matches in all)")
        return _named(images)
    raise PredictError(f"{text}: no such file or folder; give {_SOURCE_FORMS}")


def _read_list(list_file: Path) -> list[Path]:
    """The image paths of a ``.txt`` list (relative ones taken from the list's folder), each once."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise PredictError(f"{list_file}: cannot read the list of images ({error})") from None
    paths: list[Path] = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        paths.append(path if path.is_absolute() else list_file.parent / path)
    unique = list(dict.fromkeys(paths))
    if not unique:
        raise PredictError(f"{list_file}: the list names no images; write one image path a line")
    return unique


def _named(paths: Sequence[Path]) -> list[ImageEntry]:
    """Entries named by their paths relative to the deepest folder they share."""
    resolved = [path.absolute() for path in paths]
    root = Path(os.path.commonpath([str(path.parent) for path in resolved]))
    return [ImageEntry(path, absolute.relative_to(root).as_posix()) for path, absolute in zip(paths, resolved)]


def read_prompts(path: str | Path) -> dict[str, ImagePrompts]:
    """Read and check a prompts file (see the module doc).

    Returns:
        Each image key of the file with its prompts in original pixels.

    Raises:
        PredictError: an unreadable file or a malformed entry (named by image and key).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PredictError(f"prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PredictError(f"{path}: cannot read the prompts file ({error})") from None
    except ValueError as error:
        raise PredictError(f"{path}: not valid JSON ({error})") from None
    return parse_prompts(data, str(path))


def parse_prompts(data: Any, where: str = "prompts") -> dict[str, ImagePrompts]:
    """Check prompts given as plain values: ``{image key: {"boxes": [...], "points": [...]}}``.

    Args:
        data: the prompts (what a prompts file holds).
        where: the file or argument named in errors.

    Raises:
        PredictError: a malformed entry (named by image and key).
    """
    if not isinstance(data, Mapping):
        raise PredictError(f"{where}: expected a JSON object keyed by image file name, got {type(data).__name__}")
    return {str(key): to_image_prompts(value, f"{where}: '{key}'") for key, value in data.items()}


def to_image_prompts(entry: Mapping[str, Any] | ImagePrompts, where: str = "prompts") -> ImagePrompts:
    """One image's prompts, ``{"boxes": [...], "points": [...]}`` in original pixels, checked.

    Raises:
        PredictError: a malformed entry (``where`` and the key named).
    """
    if isinstance(entry, ImagePrompts):
        return entry
    if not isinstance(entry, Mapping):
        raise PredictError(f"{where}: expected {{\"boxes\": [...], \"points\": [...]}}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(PROMPT_KEYS))
    if unknown:
        raise PredictError(f"{where}: unknown key(s) {unknown}; an image's prompts are {list(PROMPT_KEYS)}")
    boxes = np.zeros((0, 4), dtype=np.float64)
    if entry.get("boxes"):
        boxes = _numbers(entry["boxes"], f"{where}.boxes", "[[x1, y1, x2, y2], ...]")
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise PredictError(f"{where}.boxes: expected [[x1, y1, x2, y2], ...], got shape {list(boxes.shape)}")
        bad = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
        if len(bad):
            raise PredictError(f"{where}.boxes[{bad[0]}] = {boxes[bad[0]].tolist()}: needs x1 < x2 and y1 < y2")
    given = entry.get("points") or []
    prompts = [_point_prompt(prompt, f"{where}.points[{index}]") for index, prompt in enumerate(given)]
    most = max((len(labels) for _, labels in prompts), default=0)
    points = np.zeros((len(prompts), most, 2), dtype=np.float64)
    labels = np.full((len(prompts), most), -1, dtype=np.int64)
    for row, (xy, point_labels) in enumerate(prompts):
        points[row, : len(xy)] = xy
        labels[row, : len(xy)] = point_labels
    return ImagePrompts(boxes, points, labels)


def _point_prompt(prompt: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``[[x, y], label]`` or ``[[[x, y], label], ...]`` as ``[K, 2]`` points and ``[K]`` labels."""
    usage = "[[x, y], label] or a list of them"
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise PredictError(f"{where}: expected {usage}, got {prompt!r}")
    pairs = [prompt] if len(prompt) == 2 and not isinstance(prompt[1], (list, tuple)) else list(prompt)
    xy, labels = [], []
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and pair[1] in (0, 1)):
            raise PredictError(f"{where}: expected {usage} with label 1 (on the object) or 0 (not on it), got {pair!r}")
        point = _numbers(pair[0], where, usage)
        if point.shape != (2,):
            raise PredictError(f"{where}: a point is [x, y], got {pair[0]!r}")
        xy.append(point)
        labels.append(int(pair[1]))
    return np.stack(xy), np.asarray(labels, dtype=np.int64)


def _numbers(values: Any, where: str, usage: str) -> np.ndarray:
    """``values`` as a finite float64 array."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise PredictError(f"{where}: expected numbers, {usage}; got {values!r}") from None
    if not np.isfinite(array).all():
        raise PredictError(f"{where}: every coordinate must be a finite number, got {values!r}")
    return array


def match_prompts(entries: Sequence[ImageEntry], prompts: Mapping[str, ImagePrompts]) -> dict[str, ImagePrompts]:
    """The prompts of each entry, by its name (keys: the name, the path as listed, or the file name).

    Keys that match no image are named in a warning; images without prompts are left out
    of the result.
    """
    matched: dict[str, ImagePrompts] = {}
    used: set[str] = set()
    for entry in entries:
        for key in (entry.name, str(entry.path), entry.path.name):
            if key in prompts:
                matched[entry.name] = prompts[key]
                used.add(key)
                break
    unused = [key for key in prompts if key not in used]
    if unused:
        logger.warning(
            "prompts for %d image(s) not in the source, ignored (first: %s); key prompts by the image's path "
            "relative to the source folder or by its file name",
            len(unused),
            ", ".join(unused[:3]),
        )
    return matched
