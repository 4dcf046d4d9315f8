"""YOLO-layout data sets (as COCO128 ships): a data yaml, ``images/<split>``, ``labels/<split>``.

The data yaml has ``path`` (dataset root; relative paths are tried against the yaml's
folder, then against the project root), ``train`` / ``val`` (a folder, a ``.txt`` file
listing images, or a list of those; relative to ``path``), ``names`` (list, or dict
id -> name) and optionally ``nc``.

The label file of an image is its path with the last ``images`` component replaced by
``labels`` and the suffix by ``.txt``. A line is ``cls cx cy w h`` (normalised) or a
polygon ``cls x1 y1 x2 y2 ...`` (normalised, at least 3 points), whose box is the
polygon's extent (Ultralytics' segmentation labels; with ``load_masks`` the polygon is the
object's mask, a box line's mask is its box). A malformed line (a polygon of fewer than
3 points, or without area, included) is reported with ``file:line`` and dropped; a
missing or empty label file means an image without objects.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vfmkd.datasets.folder import ImageDataset, ImageRecord, check_image_files, find_images
from vfmkd.datasets.image_io import DatasetError, Problem, is_image_file
from vfmkd.datasets.masks import polygon_is_flat

logger = logging.getLogger(__name__)

# Normalised coordinates may overshoot [0, 1] by this much (rounding in label tools).
COORDINATE_TOLERANCE = 1e-3


def read_data_yaml(path: str | Path) -> dict[str, Any]:
    """Read and validate a YOLO data yaml.

    Returns:
        The yaml dict with ``names`` normalised to a list.

    Raises:
        DatasetError: unreadable yaml, missing or malformed ``names``, or ``nc`` that
            disagrees with ``names``.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the data yaml ({error})") from None
    except yaml.YAMLError as error:
        raise DatasetError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a data yaml must be a mapping with path, train, val and names")
    names = data.get("names")
    if isinstance(names, dict):
        try:
            keyed = {int(key): str(value) for key, value in names.items()}
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: `names` keys must be class ids 0..K-1") from None
        if sorted(keyed) != list(range(len(keyed))):
            raise DatasetError(
                f"{path}: `names` ids must be 0..{len(keyed) - 1} without gaps, got {sorted(keyed)}; "
                "renumber the classes (labels use contiguous ids)"
            )
        names = [keyed[index] for index in range(len(keyed))]
    elif isinstance(names, (list, tuple)):
        names = [str(name) for name in names]
    else:
        raise DatasetError(f"{path}: `names` is missing; give the class names as a list or a dict id -> name")
    if not names:
        raise DatasetError(f"{path}: `names` is empty; list the class names")
    if "nc" in data and data["nc"] is not None and int(data["nc"]) != len(names):
        raise DatasetError(
            f"{path}: `nc: {data['nc']}` but `names` lists {len(names)} classes; "
            "make them agree (or drop `nc`)"
        )
    return {**data, "names": names}


def dataset_root(data: dict[str, Any], yaml_path: Path, project_root: Path | None = None) -> Path:
    """The folder the yaml's split entries are relative to."""
    base = data.get("path")
    if not base:
        return yaml_path.parent
    base = Path(str(base)).expanduser()
    if base.is_absolute():
        return base
    beside_yaml = yaml_path.parent / base
    if beside_yaml.exists():
        return beside_yaml
    return (project_root or Path(".")) / base


def label_path_for(image_path: Path) -> Path:
    """``.../images/<rest>.jpg`` -> ``.../labels/<rest>.txt`` (the last ``images`` component)."""
    parts = list(image_path.parts)
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == "images":
            parts[index] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image_path.with_suffix(".txt")


def _list_file_images(list_file: Path, root: Path) -> list[Path]:
    images = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        candidate = Path(entry)
        if not candidate.is_absolute():
            beside = list_file.parent / entry
            candidate = beside if beside.exists() or entry.startswith("./") else root / entry
        images.append(candidate)
    return images


def split_images(
    data: dict[str, Any], split: str, root: Path, yaml_path: Path, problems: list[Problem]
) -> list[tuple[Path, str]]:
    """The (image path, sample id) pairs of a split, sorted by id.

    Ids are relative to the split's image folder; with a ``.txt`` list, to the deepest
    folder holding all listed images; with several sources, prefixed by the source name.
    """
    if split not in data or data[split] in (None, ""):
        known = [key for key in ("train", "val", "test") if data.get(key)]
        raise DatasetError(
            f"{yaml_path}: no `{split}:` entry; the yaml has {known}. Add it or choose another split"
        )
    entries = data[split] if isinstance(data[split], (list, tuple)) else [data[split]]
    pairs: list[tuple[Path, str]] = []
    for entry in entries:
        source = Path(str(entry)).expanduser()
        source = source if source.is_absolute() else root / source
        if source.is_dir():
            images = find_images(source)
            base = source
        elif source.is_file() and source.suffix == ".txt":
            images = _list_file_images(source, root)
            for image in images:
                if not image.exists():
                    problems.append(
                        Problem(str(source), None, f"lists {image}, which does not exist; skipped")
                    )
            images = [image for image in images if image.exists() and is_image_file(image)]
            base = (
                Path(os.path.commonpath([str(image.parent) for image in images])) if images else source.parent
            )
        elif is_image_file(source) and source.is_file():
            images, base = [source], source.parent
        else:
            raise DatasetError(
                f"{yaml_path}: `{split}: {entry}` resolves to {source}, which does not exist. "
                "For coco128 run `bash scripts/download_datasets.sh`, or use the built-in `shapes` data set"
            )
        prefix = f"{source.stem}/" if len(entries) > 1 else ""
        pairs += [(image, prefix + image.relative_to(base).with_suffix("").as_posix()) for image in images]
    return sorted(pairs, key=lambda pair: pair[1])


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not finite")
    return value


def _parse_label_line(fields: list[str], num_classes: int) -> tuple[np.ndarray, int, np.ndarray | None] | str:
    """One label line -> (normalised xyxy box, class, polygon or None), or what is wrong."""
    count = len(fields)
    if count != 5 and (count < 7 or count % 2 == 0):
        return f"expected 5 fields (cls cx cy w h) or a polygon (cls x1 y1 ..., 3+ points), got {count}"
    try:
        class_value = _number(fields[0])
        values = np.array([_number(field) for field in fields[1:]], dtype=np.float64)
    except ValueError as error:
        return f"not a finite number ({error})"
    if class_value != int(class_value) or not 0 <= class_value < num_classes:
        return f"class id {fields[0]} is not an integer in [0, {num_classes - 1}] ({num_classes} names)"
    polygon = None
    if count == 5:
        centre_x, centre_y, width, height = values
        if width <= 0 or height <= 0:
            return f"box width and height must be > 0, got {width:g} x {height:g}"
        box = np.array(
            [centre_x - width / 2, centre_y - height / 2, centre_x + width / 2, centre_y + height / 2]
        )
    else:
        polygon = values.reshape(-1, 2)
        if polygon_is_flat(polygon):
            return "the polygon has no area (its points lie on a line)"
        box = np.concatenate([polygon.min(axis=0), polygon.max(axis=0)])
    if box.min() < -COORDINATE_TOLERANCE or box.max() > 1 + COORDINATE_TOLERANCE:
        return "coordinates are not normalised to [0, 1]"
    box = box.clip(0.0, 1.0)
    if box[2] <= box[0] or box[3] <= box[1]:
        return "the object has no area"
    return box, int(class_value), None if polygon is None else polygon.clip(0.0, 1.0)


def parse_label_file(
    path: Path, num_classes: int, problems: list[Problem]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None], np.ndarray]:
    """Parse one YOLO label file; malformed lines are reported with ``file:line`` and dropped.

    Args:
        path: label file (missing = no objects).
        num_classes: number of classes; ids must be in ``[0, num_classes)``.
        problems: list the problems are appended to.

    Returns:
        ``[N, 4]`` normalised xyxy boxes, ``[N]`` int64 classes, per object the ``[K, 2]``
        normalised polygon or None for box lines, and ``[N]`` int64 1-based line numbers.
    """
    empty = (np.zeros((0, 4)), np.zeros((0,), dtype=np.int64), [], np.zeros((0,), dtype=np.int64))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return empty
    except (OSError, UnicodeDecodeError) as error:
        problems.append(
            Problem(str(path), None, f"cannot read the label file ({error}); image kept without objects")
        )
        return empty
    boxes, classes, polygons, line_numbers = [], [], [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        parsed = _parse_label_line(fields, num_classes)
        if isinstance(parsed, str):
            problems.append(Problem(str(path), line_number, f"{parsed}; line dropped"))
            continue
        boxes.append(parsed[0])
        classes.append(parsed[1])
        polygons.append(parsed[2])
        line_numbers.append(line_number)
    if not boxes:
        return empty
    lines = np.array(line_numbers, dtype=np.int64)
    return np.stack(boxes), np.array(classes, dtype=np.int64), polygons, lines


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def build_yolo_records(
    data: dict[str, Any], split: str, yaml_path: Path, project_root: Path | None = None
) -> tuple[list[ImageRecord], list[Problem]]:
    """Read the images and labels of one split into records (original pixels)."""
    problems: list[Problem] = []
    root = dataset_root(data, yaml_path, project_root)
    pairs = split_images(data, split, root, yaml_path, problems)
    ids = {path: image_id for path, image_id in pairs}
    num_classes = len(data["names"])
    records = []
    labelled = 0
    for path, height, width in check_image_files([path for path, _ in pairs], problems):
        label_file = label_path_for(path)
        labelled += label_file.exists()
        boxes, classes, polygons, line_numbers = parse_label_file(label_file, num_classes, problems)
        scale = np.array([width, height, width, height], dtype=np.float64)
        pixel_boxes = (boxes * scale).astype(np.float32).reshape(-1, 4)
        segments = None
        areas = ((pixel_boxes[:, 2] - pixel_boxes[:, 0]) * (pixel_boxes[:, 3] - pixel_boxes[:, 1])).astype(
            np.float64
        )
        if any(polygon is not None for polygon in polygons):
            segments = []
            for index, polygon in enumerate(polygons):
                if polygon is None:
                    segments.append(None)
                    continue
                pixels = polygon * np.array([width, height])
                segments.append([pixels.ravel().tolist()])
                areas[index] = _polygon_area(pixels)
        records.append(
            ImageRecord(
                path,
                ids[path],
                height,
                width,
                pixel_boxes,
                classes,
                segments=segments,
                areas=areas,
                object_ids=line_numbers,
            )
        )
    if records and not labelled:
        problems.append(
            Problem(
                str(label_path_for(records[0].path).parent),
                None,
                f"no label files found for the {len(records)} images of split `{split}` "
                "(labels/ beside images/); every image is trained as background",
                severity="warning",
            )
        )
    return records, problems


class YoloDataset(ImageDataset):
    """A split of a YOLO-layout data set.

    Args:
        data_yaml: the data yaml.
        split: key of the split in the yaml (``train``, ``val``, ``test``).
        project_root: where relative ``path`` entries are looked up when not beside the yaml.
        **kwargs: see :class:`~vfmkd.datasets.folder.ImageDataset`.
    """

    def __init__(
        self, data_yaml: str | Path, split: str, project_root: Path | None = None, **kwargs: Any
    ) -> None:
        data_yaml = Path(data_yaml)
        data = read_data_yaml(data_yaml)
        records, problems = build_yolo_records(data, split, data_yaml, project_root)
        kwargs.setdefault("source", str(data_yaml))
        super().__init__(records, data["names"], problems=problems, **kwargs)
        self.data_yaml = data_yaml
        self.split = split

    def object_origin(self, index: int, object_index: int) -> str:
        """``<label file>:<line>`` of object ``object_index`` of record ``index``."""
        record = self.records[index]
        if record.object_ids is None:
            return super().object_origin(index, object_index)
        return f"{label_path_for(record.path)}:{int(record.object_ids[object_index])}"
