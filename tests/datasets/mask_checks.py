"""Checks that a sample's masks follow its frames, shared by the mask tests and the dataset contract."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vfmkd.datasets import ImageDataset
from vfmkd.geometry import Frame

# Nearest-neighbour resampling moves a mask edge by at most half an input pixel.
BOX_TOLERANCE = 1.0
# Share of a mask's pixels allowed to differ from the reference warp (float rounding at edges).
PIXEL_TOLERANCE = 0.01


def tight_box(mask: np.ndarray) -> list[float]:
    """The xyxy pixel-edge box of a non-empty ``[H, W]`` mask."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def warp_through_frame(mask: np.ndarray, frame: Frame, tile: tuple[float, ...]) -> np.ndarray:
    """``mask`` seen through ``frame``: each input pixel of ``tile`` takes the source pixel
    under its centre (nearest), zero elsewhere; ``[H, W]`` uint8 of the frame's input size."""
    height, width = frame.input_size
    ys, xs = np.mgrid[0:height, 0:width]
    source = frame.invert_points(np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1))
    columns, rows = np.floor(source[:, 0]).astype(int), np.floor(source[:, 1]).astype(int)
    inside = (columns >= 0) & (columns < mask.shape[1]) & (rows >= 0) & (rows < mask.shape[0])
    warped = np.zeros(height * width, dtype=np.uint8)
    warped[inside] = mask[rows[inside], columns[inside]]
    x0, y0, x1, y1 = (int(value) for value in tile)
    in_tile = np.zeros((height, width), dtype=bool)
    in_tile[y0:y1, x0:x1] = True
    return warped.reshape(height, width) * in_tile


def check_masks_follow_frames(sample: dict[str, Any], dataset: ImageDataset, size: int) -> list[float]:
    """Every object's mask is its source mask through its frame, inside its box and tile.

    Args:
        sample: a transformed sample with masks (``size x size`` input).
        dataset: the data set it came from (``load_raw`` gives the source masks).
        size: side of the input.

    Returns:
        Per object, the largest distance between an edge of its box and of its mask's tight box.
    """
    masks, boxes, frame_index = sample["masks"].numpy(), sample["boxes"].numpy(), sample["frame_index"]
    assert frame_index.dtype == torch.int64 and frame_index.shape == (len(boxes),)
    assert masks.shape == (len(boxes), size, size) and set(np.unique(masks)) <= {0, 1}
    distances = []
    for mask, box, label, source in zip(masks, boxes, sample["cls"].tolist(), frame_index.tolist()):
        frame, tile = sample["frames"][source], sample["tiles"][source]
        raw = dataset.load_raw(dataset.ids.index(sample["source_ids"][source]))
        # The object is the one of its class whose warped mask it is.
        rows = np.flatnonzero(raw["cls"] == label)
        candidates = [warp_through_frame(raw["masks"][row], frame, tile) for row in rows]
        differences = [int((mask != candidate).sum()) for candidate in candidates]
        expected = candidates[int(np.argmin(differences))]
        assert mask.any(), f"{sample['id']}: empty mask for {dataset.names[label]}"
        assert min(differences) <= PIXEL_TOLERANCE * int(expected.sum()), (dataset.names[label], differences)
        tight = np.array(tight_box(mask))
        assert (tight[:2] >= box[:2] - BOX_TOLERANCE).all() and (tight[2:] <= box[2:] + BOX_TOLERANCE).all()
        x0, y0, x1, y1 = tile
        assert x0 <= box[0] and box[2] <= x1 and y0 <= box[1] and box[3] <= y1
        distances.append(float(np.abs(tight - box).max()))
    return distances
