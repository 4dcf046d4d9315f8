"""What ``vfmkd predict`` writes: each image with its predictions drawn, and COCO results.

Drawing (:mod:`vfmkd.utils.visualization`, whose names are re-exported here): every mask
as a semi-transparent overlay in its row's colour, every box as an outline with
``<class> <score>`` above it (PIL ``ImageDraw``), at the image's original size.

COCO results (``predictions.json``): one entry per row of every image, ``image_id`` (the
image's position in the source, from 0), ``file_name``, ``category_id`` (the data set's
category id of the label: ``label + 1`` for YOLO data, the original id for COCO json),
``category_name``, ``bbox`` ``[x, y, w, h]`` and ``score`` in original pixels, and with
masks ``segmentation`` (RLE, ``counts`` a string). A row that answers a prompt has no
class: ``category_id`` null, ``category_name`` ``"prompt"``, and ``prompt_index``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from vfmkd.utils.visualization import MASK_ALPHA, PALETTE, draw_prediction, overlay_masks

if TYPE_CHECKING:
    from vfmkd.inference.predictor import Prediction

__all__ = ["MASK_ALPHA", "PALETTE", "coco_results", "draw_prediction", "overlay_masks", "save_drawing"]

#: Suffixes the drawn copy keeps; other images are written as PNG.
KEPT_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def save_drawing(drawing: Image.Image, out_dir: Path, name: str) -> Path:
    """Write a drawn image to ``out_dir / name`` (as PNG when its suffix is not one PIL writes well)."""
    path = out_dir / name
    if path.suffix.lower() not in KEPT_SUFFIXES:
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    drawing.save(path)
    return path


def coco_results(prediction: Prediction, image_id: int, category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The COCO results entries of one image's prediction (see the module doc).

    Args:
        prediction: the image's prediction (original pixels).
        image_id: its id in the results (its position in the source).
        category_ids: the category id of each label.
    """
    encoded = _encode_masks(prediction.masks) if prediction.masks is not None else None
    results = []
    for row, (box, score, label, name) in enumerate(
        zip(prediction.boxes, prediction.scores, prediction.labels, prediction.names)
    ):
        x1, y1, x2, y2 = (float(value) for value in box)
        entry: dict[str, Any] = {
            "image_id": int(image_id),
            "file_name": prediction.name,
            "category_id": int(category_ids[int(label)]) if label >= 0 else None,
            "category_name": name,
            "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
            "score": round(float(score), 5),
        }
        if label < 0:
            entry["prompt_index"] = row
        if encoded is not None:
            entry["segmentation"] = encoded[row]
        results.append(entry)
    return results


def _encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """RLE of bool masks ``[N, H, W]`` (``counts`` decoded to str, as JSON needs)."""
    from pycocotools import mask as mask_utils

    if len(masks) == 0:
        return []
    # pycocotools encodes [H, W, N] uint8 arrays in Fortran order.
    encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(size) for size in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in encoded]
