"""The built-in synthetic data set ``shapes``: drawn objects with exact boxes and masks.

Six classes of shapes (circle, rectangle, triangle, ellipse, star, cross), each with its
own colour family, are drawn on textured backgrounds (smooth noise, gradients, stripes,
checks) in images of varied, mostly non-square sizes. Objects overlap (later ones
occlude earlier ones; the masks hold the visible parts) and cross the image border
(clipped). Objects left with a tiny visible part are not drawn at all, so every visible
object is labelled. A box is the tight box of the visible mask.

Output (Ultralytics layout plus COCO json)::

    OUT/images/{train,val}/000000.jpg
    OUT/labels/{train,val}/000000.txt          cls x1 y1 x2 y2 ... (normalised polygons)
    OUT/annotations/instances_{train,val}.json polygons for whole objects, RLE otherwise
    OUT/data.yaml                              path: ., train, val, names

Both layouts give the same masks: a YOLO label line is the visible mask traced along
pixel edges (:func:`~vfmkd.datasets.masks.mask_to_polygon`; parts and holes joined by
zero-width bridges), which rasterises back to exactly that mask and whose extent is
the tight box of the json's ``bbox``.

Generation is deterministic for a seed (byte-identical files) and atomic: the set is
written to a temporary folder beside OUT and renamed into place.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from vfmkd.datasets.masks import mask_to_polygon

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "rectangle", "triangle", "ellipse", "star", "cross")
# Base RGB colour of each class; each object varies it by up to +-COLOUR_JITTER.
CLASS_COLOURS = (
    (215, 45, 45),
    (45, 95, 215),
    (40, 175, 70),
    (225, 195, 35),
    (160, 60, 200),
    (240, 130, 25),
)
COLOUR_JITTER = 30
MAX_OBJECTS = 7
# An object stays only if this many pixels and this fraction of its drawn area are visible.
MIN_VISIBLE_PIXELS = 40
MIN_VISIBLE_FRACTION = 0.2
JPEG_QUALITY = 95


def _shape_polygon(kind: str, centre: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Outline of a shape as a ``[K, 2]`` polygon (pixel coordinates)."""
    rotation = rng.uniform(0, 2 * np.pi)
    if kind == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        points = np.stack([np.cos(angles), np.sin(angles)], 1) * radius
    elif kind == "ellipse":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        points = np.stack([np.cos(angles), rng.uniform(0.35, 0.65) * np.sin(angles)], 1) * radius
    elif kind == "rectangle":
        aspect = rng.uniform(0.45, 1.0)
        points = np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]]) * radius * 0.85
    elif kind == "triangle":
        angles = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        points = np.stack([np.cos(angles), np.sin(angles)], 1) * radius
    elif kind == "star":
        angles = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        lengths = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        points = np.stack([np.cos(angles), np.sin(angles)], 1) * (lengths * radius)[:, None]
    elif kind == "cross":
        arm = rng.uniform(0.25, 0.38)
        points = (
            np.array(
                [
                    [-arm, -1],
                    [arm, -1],
                    [arm, -arm],
                    [1, -arm],
                    [1, arm],
                    [arm, arm],
                    [arm, 1],
                    [-arm, 1],
                    [-arm, arm],
                    [-1, arm],
                    [-1, -arm],
                    [-arm, -arm],
                ]
            )
            * radius
        )
    else:
        raise ValueError(f"unknown shape '{kind}'; known: {', '.join(SHAPE_CLASSES)}")
    cosine, sine = np.cos(rotation), np.sin(rotation)
    rotated = points @ np.array([[cosine, sine], [-sine, cosine]])
    # Rounded as written to the json, so the json polygon rasterises to the same mask.
    return np.round(rotated + centre, 2)


def _smooth_noise(height: int, width: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """``[H, W]`` float noise in [0, 1], smooth at a scale of ``cells`` per side."""
    small = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return (
        np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
        / 255
    )


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A muted textured background, ``[H, W, 3]`` float32 in [0, 255]."""
    # Muted colours (grey plus a tint) so that the saturated objects stand out.
    first = rng.uniform(70, 190) + rng.uniform(-35, 35, 3)
    second = np.clip(first + rng.uniform(-60, 60) + rng.uniform(-20, 20, 3), 20, 235)
    style = rng.integers(0, 4)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if style == 0:
        blend = _smooth_noise(height, width, int(rng.integers(3, 9)), rng)
    elif style == 1:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * xs + np.sin(angle) * ys
        blend = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    elif style == 2:
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(8, 40)
        blend = 0.5 + 0.5 * np.sin((np.cos(angle) * xs + np.sin(angle) * ys) * (2 * np.pi / period))
    else:
        cell = int(rng.integers(10, 40))
        blend = ((xs // cell + ys // cell) % 2).astype(np.float32) * 0.7 + 0.15
    image = first * (1 - blend[..., None]) + second * blend[..., None]
    return image + rng.normal(0, 6, (height, width, 1)).astype(np.float32)


def _polygon_mask(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    rle = mask_utils.frPyObjects([polygon.ravel().tolist()], height, width)
    return mask_utils.decode(rle)[:, :, 0].astype(bool)


def _draw_image(
    rng: np.random.Generator, min_size: int, max_size: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image and its visible objects (class, polygon, visible mask, whole flag)."""
    long_side = int(rng.integers(min_size, max_size + 1))
    short_side = int(round(long_side * rng.uniform(0.6, 1.0)))
    height, width = (long_side, short_side) if rng.random() < 0.35 else (short_side, long_side)
    short = min(height, width)
    candidates = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        label = int(rng.integers(0, len(SHAPE_CLASSES)))
        radius = rng.uniform(0.07, 0.28) * short
        if candidates and rng.random() < 0.35:
            # Near an earlier object, so that occlusions happen often.
            centre = candidates[int(rng.integers(0, len(candidates)))]["centre"] + rng.normal(0, radius, 2)
        else:
            centre = np.array([rng.uniform(-0.05, 1.05) * width, rng.uniform(-0.05, 1.05) * height])
        polygon = _shape_polygon(SHAPE_CLASSES[label], centre, radius, rng)
        colour = np.clip(
            np.array(CLASS_COLOURS[label]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255
        )
        candidates.append(
            {
                "label": label,
                "centre": centre,
                "polygon": polygon,
                "colour": colour,
                "mask": _polygon_mask(polygon, height, width),
            }
        )
    # Drop objects whose visible part would be tiny, then recompute visibility without
    # them (removing an object only uncovers others, so one pass suffices).
    kept = candidates
    for _ in range(2):
        owner = np.full((height, width), -1, dtype=np.int32)
        for index, candidate in enumerate(kept):
            owner[candidate["mask"]] = index
        survivors = []
        for index, candidate in enumerate(kept):
            visible = int((owner == index).sum())
            if visible >= MIN_VISIBLE_PIXELS and visible >= MIN_VISIBLE_FRACTION * int(
                candidate["mask"].sum()
            ):
                survivors.append(candidate)
        if len(survivors) == len(kept):
            break
        kept = survivors
    owner = np.full((height, width), -1, dtype=np.int32)
    for index, candidate in enumerate(kept):
        owner[candidate["mask"]] = index

    image = _background(height, width, rng)
    shading = _smooth_noise(height, width, 4, rng)[..., None] * 40 - 20
    objects = []
    for index, candidate in enumerate(kept):
        visible = owner == index
        image[visible] = candidate["colour"] + shading[visible] + rng.normal(0, 4, (int(visible.sum()), 1))
        polygon = candidate["polygon"]
        inside = polygon.min() >= 0 and (polygon[:, 0] <= width).all() and (polygon[:, 1] <= height).all()
        objects.append(
            {
                "label": candidate["label"],
                "polygon": polygon,
                "mask": visible,
                "whole": bool(inside and np.array_equal(visible, candidate["mask"])),
            }
        )
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), objects


def _annotation(drawn: dict[str, Any], annotation_id: int, image_id: int) -> dict[str, Any]:
    mask = drawn["mask"]
    rows, columns = np.any(mask, axis=1), np.any(mask, axis=0)
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(columns)[[0, -1]]
    if drawn["whole"]:
        segmentation: Any = [[float(value) for value in drawn["polygon"].ravel()]]
    else:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = {"size": [int(size) for size in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": drawn["label"] + 1,
        "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
        "area": int(mask.sum()),
        "segmentation": segmentation,
        "iscrowd": 0,
    }


def _write_split(
    out: Path, split: str, count: int, seed: int, split_index: int, min_size: int, max_size: int
) -> None:
    image_dir, label_dir = out / "images" / split, out / "labels" / split
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, split_index, index])
        pixels, objects = _draw_image(rng, min_size, max_size)
        height, width = pixels.shape[:2]
        name = f"{index:06d}"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        (image_dir / f"{name}.jpg").write_bytes(buffer.getvalue())
        image_id = index + 1
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": height, "width": width})
        lines = []
        for drawn in objects:
            annotations.append(_annotation(drawn, len(annotations) + 1, image_id))
            polygon = np.array(mask_to_polygon(drawn["mask"])).reshape(-1, 2) / np.array([width, height])
            lines.append(" ".join([str(drawn["label"]), *(f"{value:.6f}" for value in polygon.ravel())]))
        (label_dir / f"{name}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    coco = {
        "info": {"description": f"vfmkd synthetic shapes, seed {seed}, split {split}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": index + 1, "name": name} for index, name in enumerate(SHAPE_CLASSES)],
    }
    (out / "annotations").mkdir(exist_ok=True)
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco), encoding="utf-8")


def generate_synthetic_dataset(
    out_dir: str | Path,
    num_train: int = 64,
    num_val: int = 16,
    seed: int = 0,
    min_size: int = 160,
    max_size: int = 320,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic ``shapes`` data set.

    Args:
        out_dir: output folder (must not exist unless ``overwrite``).
        num_train: training images.
        num_val: validation images.
        seed: random seed; the same seed gives byte-identical files.
        min_size: smallest longer image side in pixels.
        max_size: largest longer image side in pixels.
        overwrite: replace an existing ``out_dir``.

    Returns:
        Path of ``OUT/data.yaml``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    out = Path(out_dir)
    if min_size < 16 or max_size < min_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got {min_size}, {max_size}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another folder or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
            _write_split(temporary, split, count, seed, split_index, min_size, max_size)
        data = {
            "path": ".",
            "train": "images/train",
            "val": "images/val",
            "names": {index: name for index, name in enumerate(SHAPE_CLASSES)},
        }
        (temporary / "data.yaml").write_text(
            "# vfmkd built-in synthetic data set; `path` is relative to this file\n"
            + yaml.safe_dump(data, sort_keys=False),
            encoding="utf-8",
        )
        os.chmod(temporary, 0o755)
        if overwrite and out.exists():
            retired = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, retired)
            os.rename(temporary, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logger.info("wrote synthetic data set to %s (%d train, %d val images)", out, num_train, num_val)
    return out / "data.yaml"
