"""The common image data set (:class:`ImageDataset`) and the plain folder of images.

:class:`ImageDataset` holds one :class:`ImageRecord` per usable image (path, sample id,
size, targets in original pixels) and does everything that does not depend on the
label format: loading with corrupt-file substitution, the optional RAM cache, masks from
polygons or RLE, transforms, and the COCO-format ground truth for evaluation. The YOLO
and COCO data sets only build records; :class:`FolderDataset` builds records without
targets for distillation-only runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vfmkd.datasets.image_io import (
    CorruptImageError,
    DatasetError,
    Problem,
    check_images,
    is_image_file,
    load_image_rgb,
)
from vfmkd.datasets.masks import Segment, segment_to_mask
from vfmkd.datasets.transforms import IdentityTransform

logger = logging.getLogger(__name__)

MAX_LOGGED_PROBLEMS = 10

__all__ = [
    "FolderDataset",
    "ImageDataset",
    "ImageRecord",
    "Segment",
    "check_image_files",
    "find_images",
    "log_problems",
    "sample_id",
    "segment_to_mask",
]

Transform = Callable[[Any, int, np.random.Generator], dict[str, Any]]


@dataclass
class ImageRecord:
    """One image and its targets, in original (EXIF-oriented) pixels.

    Attributes:
        path: image file.
        id: sample id (path relative to the split's image folder, no suffix, '/'-separated).
        height: image height.
        width: image width.
        boxes: ``[N, 4]`` float32 xyxy training targets.
        cls: ``[N]`` int64 contiguous class indices.
        segments: N segments (polygons or RLE, checked with
            :func:`~vfmkd.datasets.masks.clean_segment`; None for an object with only a
            box), or None when no object has one.
        areas: ``[N]`` float areas for evaluation (mask area where known, else box area).
        crowd: crowd regions, COCO annotation dicts (``bbox``, ``area``, ``segmentation``,
            ``category_id`` contiguous); never training targets, kept for evaluation.
        apply_exif: rotate as the EXIF orientation says when loading (False when the
            annotations were made on the stored pixels).
        object_ids: ``[N]`` int64, where each object was read from (its COCO annotation
            id, its YOLO label line), for messages; None when unknown.
    """

    path: Path
    id: str
    height: int
    width: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float32))
    cls: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    segments: list[Segment] | None = None
    areas: np.ndarray | None = None
    crowd: list[dict[str, Any]] = field(default_factory=list)
    apply_exif: bool = True
    object_ids: np.ndarray | None = None


def sample_id(path: Path, root: Path) -> str:
    """Sample id of an image: its path relative to ``root``, without suffix, '/'-separated."""
    return path.relative_to(root).with_suffix("").as_posix()


def find_images(root: Path) -> list[Path]:
    """All image files under ``root`` (recursive, sorted, hidden folders skipped)."""
    found = [
        path
        for path in root.rglob("*")
        if is_image_file(path)
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return sorted(found)


def check_image_files(paths: Sequence[Path], problems: list[Problem]) -> list[tuple[Path, int, int]]:
    """Check image files; report each bad one in ``problems``.

    Returns:
        (path, height, width) of the usable images, in order.
    """
    usable = []
    for path, result in zip(paths, check_images(paths)):
        if result.ok:
            usable.append((path, result.height, result.width))
        else:
            problems.append(Problem(str(path), None, f"{result.error}; image skipped"))
    return usable


def log_problems(problems: Sequence[Problem], source: str) -> None:
    """Log the first problems in full and how many more there are."""
    if not problems:
        return
    for problem in problems[:MAX_LOGGED_PROBLEMS]:
        logger.warning("%s", problem)
    if len(problems) > MAX_LOGGED_PROBLEMS:
        logger.warning(
            "... and %d more problem(s) in %s; run `vfmkd data check %s` for the full list",
            len(problems) - MAX_LOGGED_PROBLEMS,
            source,
            source,
        )


class ImageDataset(Dataset):
    """A data set of images with detection (and optionally mask) targets.

    ``has_labels`` is False for a data set without annotations (a plain image folder):
    its empty targets mean "unknown", not "no objects", so task losses are skipped.

    Args:
        records: one record per usable image, in data set order.
        names: class names (contiguous label -> name).
        transform: ``transform(dataset, index, rng) -> sample``; None gives the image as
            loaded with an identity frame.
        load_masks: rasterise instance masks (``masks`` in samples).
        cache_images: decode every image once now and keep it in RAM.
        eval_category_ids: category id used in :meth:`coco_ground_truth` for each label;
            default ``label + 1``.
        problems: problems found while building the records (logged here).
        source: what the data set was read from (for messages).
    """

    has_labels = True

    def __init__(
        self,
        records: list[ImageRecord],
        names: Sequence[str],
        *,
        transform: Transform | None = None,
        load_masks: bool = False,
        cache_images: bool = False,
        eval_category_ids: Sequence[int] | None = None,
        problems: Sequence[Problem] = (),
        source: str = "",
    ) -> None:
        self.records = list(records)
        self.names = list(names)
        self.ids = [record.id for record in self.records]
        self.transform = transform if transform is not None else IdentityTransform()
        self.load_masks = bool(load_masks)
        self.eval_category_ids = (
            list(eval_category_ids) if eval_category_ids is not None else list(range(1, len(self.names) + 1))
        )
        self.problems = list(problems)
        self.source = source
        self._bad: set[int] = set()
        self._images: list[np.ndarray | None] | None = None
        log_problems(self.problems, source)
        if not self.records:
            raise DatasetError(
                f"{source}: no usable images; check the image folder or list it names "
                f"(run `vfmkd data check {source}` to see every problem), "
                "or use the built-in `shapes` data set"
            )
        duplicates = len(self.ids) - len(set(self.ids))
        if duplicates:
            raise DatasetError(
                f"{source}: {duplicates} duplicate sample id(s); image paths must be unique per split"
            )
        self._empty_masks: set[tuple[int, int]] = set()
        if self.load_masks:
            self._warn_box_only_masks()
        if cache_images:
            self._images = [self._decode(index) for index in range(len(self.records))]

    def _warn_box_only_masks(self) -> None:
        objects = sum(len(record.boxes) for record in self.records)
        box_only = sum(
            len(record.boxes) if record.segments is None else sum(s is None for s in record.segments)
            for record in self.records
        )
        if box_only:
            logger.warning(
                "%s: %d of %d objects have no segmentation (box labels); with load_masks their "
                "masks are their boxes",
                self.source,
                box_only,
                objects,
            )

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, index: int) -> np.ndarray | None:
        try:
            record = self.records[index]
            return load_image_rgb(record.path, apply_exif=record.apply_exif)
        except CorruptImageError as error:
            self._report_bad(index, error)
            return None

    def _report_bad(self, index: int, error: CorruptImageError) -> None:
        if index not in self._bad:
            self._bad.add(index)
            logger.warning("skipping unreadable image %s: %s", error.path, error.reason)

    def _image(self, index: int) -> np.ndarray | None:
        if index in self._bad:
            return None
        if self._images is not None:
            return self._images[index]
        return self._decode(index)

    def load_raw(self, index: int) -> dict[str, Any]:
        """Load an image and its targets in original pixels.

        An image that cannot be decoded is reported once (logging.warning) and replaced
        by the next readable one (the returned ``id`` says which).

        Returns:
            ``image`` ``[H, W, 3]`` uint8 RGB, ``boxes`` ``[N, 4]`` float32 xyxy,
            ``cls`` ``[N]`` int64, ``masks`` ``[N, H, W]`` uint8 or None, ``id``, ``path``.
        """
        count = len(self.records)
        for step in range(count):
            current = (index + step) % count
            image = self._image(current)
            if image is not None:
                break
        else:
            raise DatasetError(f"{self.source}: none of the {count} images can be decoded")
        record = self.records[current]
        masks = self._masks(current, *image.shape[:2]) if self.load_masks else None
        return {
            "image": image,
            "boxes": record.boxes.astype(np.float32).reshape(-1, 4),
            "cls": record.cls.astype(np.int64).reshape(-1),
            "masks": masks,
            "id": record.id,
            "path": str(record.path),
        }

    def _masks(self, index: int, height: int, width: int) -> np.ndarray:
        """``[N, H, W]`` uint8 masks of record ``index``; a segment that rasterises to no
        pixel (thinner than a pixel) gives an empty mask, reported once."""
        record = self.records[index]
        if not len(record.boxes):
            return np.zeros((0, height, width), dtype=np.uint8)
        segments = record.segments if record.segments is not None else [None] * len(record.boxes)
        masks = np.stack(
            [segment_to_mask(segment, box, height, width) for segment, box in zip(segments, record.boxes)]
        )
        for object_index in np.flatnonzero(~masks.reshape(len(masks), -1).any(axis=1)).tolist():
            if (index, object_index) not in self._empty_masks:
                self._empty_masks.add((index, object_index))
                logger.warning(
                    "%s: its mask has no pixel in the %dx%d image (a segment thinner than a pixel); "
                    "the object keeps its box, its mask stays empty (no mask prompts)",
                    self.object_origin(index, object_index),
                    height,
                    width,
                )
        return masks

    def object_origin(self, index: int, object_index: int) -> str:
        """Where object ``object_index`` of record ``index`` was read from, for messages."""
        record = self.records[index]
        return f"{record.path}: object {object_index}"

    @property
    def mosaic_active(self) -> bool:
        """Whether the training transform may make mosaics (False for other transforms)."""
        return bool(getattr(self.transform, "mosaic_active", False))

    def close_mosaic(self) -> None:
        """Stop making mosaics from now on (a transform without mosaics is left as it is)."""
        close = getattr(self.transform, "close_mosaic", None)
        if callable(close):
            close()

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The transformed sample (see :mod:`vfmkd.datasets` for its keys)."""
        # Drawn from torch's generator so DataLoader worker seeding makes runs repeatable.
        seed = int(torch.randint(0, 2**62, (1,)).item())
        sample = self.transform(self, index, np.random.default_rng(seed))
        sample["has_labels"] = self.has_labels
        return sample

    def coco_ground_truth(self) -> dict[str, Any]:
        """COCO-format ground truth in original image pixels.

        Image ids are ``0 .. len - 1`` in data set order; category ids are
        ``self.eval_category_ids[label]``. Crowd regions are included with ``iscrowd: 1``
        so that pycocotools ignores detections matching them.
        """
        images, annotations = [], []
        for image_id, record in enumerate(self.records):
            images.append(
                {
                    "id": image_id,
                    "file_name": record.id + record.path.suffix,
                    "height": record.height,
                    "width": record.width,
                }
            )
            for object_index, (box, label) in enumerate(zip(record.boxes, record.cls)):
                x0, y0, x1, y1 = (float(value) for value in box)
                area = (
                    float(record.areas[object_index]) if record.areas is not None else (x1 - x0) * (y1 - y0)
                )
                annotation = {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(self.eval_category_ids[int(label)]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": area,
                    "iscrowd": 0,
                }
                segment = record.segments[object_index] if record.segments is not None else None
                if segment is not None:
                    annotation["segmentation"] = segment
                annotations.append(annotation)
            for crowd in record.crowd:
                annotations.append(
                    {
                        **crowd,
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(self.eval_category_ids[int(crowd["category_id"])]),
                        "iscrowd": 1,
                    }
                )
        categories = [
            {"id": int(category_id), "name": name}
            for category_id, name in zip(self.eval_category_ids, self.names)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}


class FolderDataset(ImageDataset):
    """A folder of images (recursive) without labels, for distillation-only runs.

    Args:
        root: the folder; sample ids are paths relative to it.
        names: class names, if a detection head needs them (targets are always empty).
        **kwargs: see :class:`ImageDataset`.
    """

    has_labels = False

    def __init__(self, root: str | Path, names: Sequence[str] = (), **kwargs: Any) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: not a folder of images")
        problems: list[Problem] = []
        records = [
            ImageRecord(path, sample_id(path, root), height, width)
            for path, height, width in check_image_files(find_images(root), problems)
        ]
        kwargs.setdefault("source", str(root))
        super().__init__(records, names, problems=problems, **kwargs)
