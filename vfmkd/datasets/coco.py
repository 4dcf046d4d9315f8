"""COCO-json data sets (``instances_<split>.json`` + an image folder).

Category ids need not be contiguous: they are sorted and mapped to labels ``0..K-1``;
``dataset.category_ids[label]`` gives the original id back, and the evaluation ground
truth (:meth:`~vfmkd.datasets.folder.ImageDataset.coco_ground_truth`) uses the original
ids. Crowd annotations (``iscrowd: 1``) are not training targets; they are kept so that
evaluation ignores detections on them.

Segmentations (polygons, compressed or uncompressed RLE) are checked when the file is
read (:func:`~vfmkd.datasets.masks.clean_segment`): an annotation whose segmentation is
unusable (RLE of another size, polygons of fewer than 3 points or without area, an empty
mask) is dropped and reported with its id; an annotation without ``bbox`` takes the
extent of its segmentation (a warning).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from vfmkd.datasets.folder import ImageDataset, ImageRecord, check_image_files
from vfmkd.datasets.image_io import DatasetError, Problem
from vfmkd.datasets.masks import clean_segment, segment_box

logger = logging.getLogger(__name__)


def split_token(json_path: Path) -> str:
    """``instances_train2017.json`` -> ``train2017``; ``instances_val.json`` -> ``val``."""
    stem = json_path.stem
    for prefix in ("instances_", "person_keypoints_", "captions_", "panoptic_"):
        if stem.startswith(prefix):
            return stem[len(prefix) :]
    return stem


def sibling_json(json_path: Path, split: str) -> Path:
    """The annotation file of ``split`` beside ``json_path``: ``train`` is swapped for
    ``split`` in the file name (``instances_train2017.json`` -> ``instances_val2017.json``).

    Returns ``json_path`` itself when its name already names ``split`` or no sibling exists.
    """
    token = split_token(json_path)
    if split in token:
        return json_path
    swapped = re.sub(r"(train|val|test)", split, json_path.name, count=1)
    candidate = json_path.with_name(swapped)
    return candidate if candidate != json_path and candidate.exists() else json_path


def find_image_dir(json_path: Path, images: str | Path | None = None) -> Path:
    """The image folder of an annotation file.

    Args:
        json_path: the annotation file.
        images: an explicit folder (the data config's ``images`` key), if any.

    Raises:
        DatasetError: no candidate folder exists; the message lists the places tried.
    """
    if images:
        folder = Path(images).expanduser()
        if not folder.is_dir():
            raise DatasetError(f"image folder {folder} (data `images:` key) does not exist")
        return folder
    token = split_token(json_path)
    base = token
    for word in ("train", "val", "test"):
        if token.startswith(word):
            base = word
    parent, grandparent = json_path.parent, json_path.parent.parent
    candidates = [
        grandparent / "images" / token,
        grandparent / token,
        grandparent / "images" / base,
        parent / "images" / token,
        parent / token,
        parent / "images" / base,
        grandparent / "images",
        parent / "images",
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(candidate) for candidate in candidates[:6])
    raise DatasetError(
        f"{json_path}: cannot find its image folder (tried {tried}); set `data.images` to the folder"
    )


def _valid_box(bbox: Any) -> bool:
    return (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(isinstance(value, (int, float)) and math.isfinite(value) for value in bbox)
        and bbox[2] > 0
        and bbox[3] > 0
    )


def _load_annotation_file(json_path: Path) -> dict[str, Any]:
    """The parsed annotation file; raises :class:`DatasetError` when it is unreadable or not COCO."""
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DatasetError(f"{json_path}: cannot read the annotation file ({error})") from None
    except ValueError as error:
        raise DatasetError(f"{json_path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(
            f"{json_path}: a COCO annotation file needs `images`, `annotations` and `categories`"
        )
    return data


def _read_categories(json_path: Path, data: dict[str, Any]) -> tuple[list[str], list[int]]:
    """Class names and original category ids, sorted by id (list index = contiguous label)."""
    categories = sorted(data.get("categories") or [], key=lambda category: category["id"])
    if not categories:
        raise DatasetError(f"{json_path}: no `categories`; list the classes with their ids and names")
    category_ids = [int(category["id"]) for category in categories]
    if len(set(category_ids)) != len(category_ids):
        raise DatasetError(f"{json_path}: duplicate category ids in `categories`")
    names = [str(category.get("name", category["id"])) for category in categories]
    return names, category_ids


def read_coco_categories(json_path: Path) -> tuple[list[str], list[int]]:
    """A COCO annotation file's class names and category ids, sorted by id (list index =
    contiguous label); raises :class:`DatasetError` naming the file when it is not COCO."""
    return _read_categories(json_path, _load_annotation_file(json_path))


def _index_images(
    json_path: Path, data: dict[str, Any], problems: list[Problem]
) -> dict[Any, dict[str, Any]]:
    """Image entries by id; entries without ``id`` or ``file_name`` are skipped as problems."""
    images_by_id: dict[Any, dict[str, Any]] = {}
    for image in data["images"]:
        if "id" not in image or "file_name" not in image:
            problems.append(
                Problem(str(json_path), None, f"image entry without id or file_name: {image}; skipped")
            )
            continue
        images_by_id[image["id"]] = image
    return images_by_id


def _annotation_problem(
    annotation: dict[str, Any], images_by_id: dict[Any, Any], label_of: dict[int, int]
) -> str | None:
    """Why ``annotation`` must be dropped (unknown image or category, invalid bbox), or None."""
    image_id = annotation.get("image_id")
    if image_id not in images_by_id:
        return f"annotation {annotation.get('id')} refers to unknown image {image_id}; dropped"
    if annotation.get("category_id") not in label_of:
        return (
            f"annotation {annotation.get('id')} has unknown category "
            f"{annotation.get('category_id')}; dropped"
        )
    if annotation.get("bbox") is None and annotation.get("segmentation"):
        return None  # the box comes from the segmentation
    if not _valid_box(annotation.get("bbox")):
        return f"annotation {annotation.get('id')} has an invalid bbox {annotation.get('bbox')}; dropped"
    return None


def _group_annotations(
    json_path: Path,
    data: dict[str, Any],
    images_by_id: dict[Any, dict[str, Any]],
    label_of: dict[int, int],
    problems: list[Problem],
) -> dict[Any, list[dict[str, Any]]]:
    """The usable annotations of each image id; the others are dropped as problems."""
    annotations_by_image: dict[Any, list[dict[str, Any]]] = {image_id: [] for image_id in images_by_id}
    for annotation in data.get("annotations") or []:
        reason = _annotation_problem(annotation, images_by_id, label_of)
        if reason is not None:
            problems.append(Problem(str(json_path), None, reason))
            continue
        annotations_by_image[annotation["image_id"]].append(annotation)
    return annotations_by_image


def _oriented_size(
    image: dict[str, Any], path: Path, height: int, width: int, problems: list[Problem]
) -> tuple[int, int, bool] | None:
    """The size the annotations use and whether to apply the EXIF orientation.

    Args:
        image: the json's image entry.
        path: its image file.
        height: height of the file's pixels, EXIF orientation applied.
        width: width likewise.
        problems: gets a warning when the EXIF orientation is ignored, or the reason to skip.

    Returns:
        ``(height, width, apply_exif)``, or None when the json states another size.
    """
    stated = (int(image.get("height", height)), int(image.get("width", width)))
    if stated == (height, width):
        return height, width, True
    if stated == (width, height):
        # The annotations were made on the stored pixels, before the EXIF rotation.
        problems.append(
            Problem(
                str(path), None, "EXIF orientation ignored: the annotations use the stored pixels", "warning"
            )
        )
        return width, height, False
    problems.append(
        Problem(
            str(path),
            None,
            f"size {height}x{width} differs from the json's {stated[0]}x{stated[1]}; skipped",
        )
    )
    return None


def _crowd_region(annotation: dict[str, Any], box: np.ndarray, segment: Any, label: int) -> dict[str, Any]:
    """A crowd annotation for evaluation: the clipped ``[4]`` xyxy ``box`` as an xywh bbox,
    its checked ``segment``, the contiguous ``label`` as its category."""
    box_w, box_h = float(box[2] - box[0]), float(box[3] - box[1])
    return {
        "bbox": [float(box[0]), float(box[1]), box_w, box_h],
        "area": float(annotation.get("area", box_w * box_h)),
        "segmentation": segment,
        "category_id": label,
    }


def _box_and_segment(
    annotation: dict[str, Any], height: int, width: int, json_path: Path, problems: list[Problem]
) -> tuple[np.ndarray, Any] | None:
    """An annotation's ``[4]`` xyxy box clipped to the image and its checked segment (None
    without one); None, reported in ``problems``, when it cannot be used."""
    name = f"annotation {annotation.get('id')}"
    segment = annotation.get("segmentation") or None
    if segment is not None:
        segment, message = clean_segment(segment, height, width)
        if message is not None:
            if segment is None:
                problems.append(Problem(str(json_path), None, f"{name}: {message}; dropped"))
                return None
            problems.append(Problem(str(json_path), None, f"{name}: {message}", "warning"))
    if annotation.get("bbox") is None:
        message = f"{name} has no bbox; its box is its segmentation's extent"
        problems.append(Problem(str(json_path), None, message, "warning"))
        box = segment_box(segment, height, width)
    else:
        x, y, box_w, box_h = (float(value) for value in annotation["bbox"])
        box = np.array([x, y, x + box_w, y + box_h]).clip([0, 0, 0, 0], [width, height, width, height])
    if box[2] <= box[0] or box[3] <= box[1]:
        problems.append(Problem(str(json_path), None, f"{name} lies outside its image; dropped"))
        return None
    return box, segment


def _image_record(
    image: dict[str, Any],
    path: Path,
    size: tuple[int, int, bool],
    annotations: list[dict[str, Any]],
    label_of: dict[int, int],
    json_path: Path,
    problems: list[Problem],
) -> ImageRecord:
    """One image's record: boxes clipped to the image, crowd regions apart, unusable
    annotations (outside the image, unusable segmentation) dropped.

    Args:
        image: the json's image entry.
        path: its image file.
        size: ``(height, width, apply_exif)`` from :func:`_oriented_size`.
        annotations: its usable annotations.
        label_of: contiguous label of each original category id.
        json_path: the annotation file (named in problems).
        problems: gets one entry per annotation dropped or changed.
    """
    height, width, apply_exif = size
    boxes, classes, segments, areas, crowd, object_ids = [], [], [], [], [], []
    for annotation in annotations:
        usable = _box_and_segment(annotation, height, width, json_path, problems)
        if usable is None:
            continue
        box, segment = usable
        label = label_of[annotation["category_id"]]
        if annotation.get("iscrowd", 0):
            crowd.append(_crowd_region(annotation, box, segment, label))
            continue
        boxes.append(box)
        classes.append(label)
        segments.append(segment)
        areas.append(float(annotation.get("area", (box[2] - box[0]) * (box[3] - box[1]))))
        identifier = annotation.get("id")
        object_ids.append(identifier if isinstance(identifier, int) else -1)
    return ImageRecord(
        path,
        Path(str(image["file_name"])).with_suffix("").as_posix(),
        height,
        width,
        np.array(boxes, dtype=np.float32).reshape(-1, 4),
        np.array(classes, dtype=np.int64),
        segments=segments,
        areas=np.array(areas, dtype=np.float64),
        crowd=crowd,
        apply_exif=apply_exif,
        object_ids=np.array(object_ids, dtype=np.int64),
    )


def build_coco_records(
    json_path: Path, image_dir: Path
) -> tuple[list[ImageRecord], list[str], list[int], list[Problem]]:
    """Read a COCO annotation file into records (original pixels, contiguous labels).

    Returns:
        Records, class names, original category id per label, and the problems found.
    """
    problems: list[Problem] = []
    data = _load_annotation_file(json_path)
    names, category_ids = _read_categories(json_path, data)
    label_of = {category_id: label for label, category_id in enumerate(category_ids)}
    images_by_id = _index_images(json_path, data, problems)
    annotations_by_image = _group_annotations(json_path, data, images_by_id, label_of, problems)

    entries = sorted(images_by_id.values(), key=lambda image: str(image["file_name"]))
    paths = [image_dir / str(image["file_name"]) for image in entries]
    usable = {path: (height, width) for path, height, width in check_image_files(paths, problems)}
    records = []
    for image, path in zip(entries, paths):
        if path not in usable:
            continue
        size = _oriented_size(image, path, *usable[path], problems)
        if size is None:
            continue
        annotations = annotations_by_image[image["id"]]
        records.append(_image_record(image, path, size, annotations, label_of, json_path, problems))
    return records, names, category_ids, problems


class CocoDataset(ImageDataset):
    """A COCO-json data set.

    Attributes:
        category_ids: original COCO category id of each contiguous label (also
            ``eval_category_ids``: the ground truth keeps the original ids).

    Args:
        annotation_file: ``instances_<split>.json``.
        image_dir: the images; found from the json's location when None (see
            :func:`find_image_dir`).
        **kwargs: see :class:`~vfmkd.datasets.folder.ImageDataset`.
    """

    def __init__(
        self, annotation_file: str | Path, image_dir: str | Path | None = None, **kwargs: Any
    ) -> None:
        annotation_file = Path(annotation_file)
        folder = find_image_dir(annotation_file, image_dir)
        records, names, category_ids, problems = build_coco_records(annotation_file, folder)
        kwargs.setdefault("source", str(annotation_file))
        super().__init__(records, names, eval_category_ids=category_ids, problems=problems, **kwargs)
        self.category_ids: list[int] = list(category_ids)
        self.annotation_file = annotation_file
        self.image_dir = folder

    def object_origin(self, index: int, object_index: int) -> str:
        """``<annotation file>: annotation <id>`` of object ``object_index`` of record ``index``."""
        object_ids = self.records[index].object_ids
        if object_ids is None:
            return super().object_origin(index, object_index)
        return f"{self.annotation_file}: annotation {int(object_ids[object_index])}"
