"""Predictions drawn on images, with PIL and numpy only.

Every mask as a semi-transparent overlay in its row's colour (:func:`overlay_masks`),
every box as an outline with ``<class> <score>`` above it (or the class alone,
``show_scores=False``, as ground truth is drawn), at the image's original size.
``vfmkd predict`` (:mod:`vfmkd.inference.writers`, which re-exports these names), the run
report and the TensorBoard pictures (:mod:`vfmkd.report`) draw with it.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["MASK_ALPHA", "PALETTE", "Drawable", "draw_prediction", "overlay_masks", "row_colour"]

#: Opacity of the mask overlay.
MASK_ALPHA = 0.45
#: Distinct colours (RGB), one per class (or per prompt), cycled.
PALETTE = (
    (255, 56, 56), (255, 157, 151), (255, 112, 31), (255, 178, 29), (207, 210, 49), (72, 249, 10),
    (146, 204, 23), (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (0, 194, 255),
    (52, 69, 147), (100, 115, 255), (0, 24, 236), (132, 56, 255), (82, 0, 133), (203, 56, 255),
    (255, 149, 200), (255, 55, 199),
)  # fmt: skip


class Drawable(Protocol):
    """What :func:`draw_prediction` reads (a :class:`~vfmkd.inference.Prediction` is one).

    Attributes:
        boxes: ``[N, 4]`` xyxy in the image's pixels.
        scores: ``[N]`` scores.
        labels: ``[N]`` class labels; -1 for a row without a class (a prompt's mask).
        names: N names drawn beside the boxes.
        masks: ``[N, H, W]`` bool, or None.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]
    masks: np.ndarray | None


def row_colour(labels: Sequence[int] | np.ndarray, row: int) -> tuple[int, int, int]:
    """The colour of a row: its class's, or (a row without a class, label -1) its own."""
    label = int(labels[row])
    return PALETTE[(row if label < 0 else label) % len(PALETTE)]


def overlay_masks(image: np.ndarray, masks: np.ndarray, labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """The image with each mask blended in its row's colour (:data:`MASK_ALPHA`).

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        masks: ``[N, H, W]`` bool.
        labels: ``[N]`` the rows' labels (:func:`row_colour`).

    Returns:
        ``[H, W, 3]`` uint8 RGB.
    """
    canvas = image.astype(np.float32)
    for row, mask in enumerate(masks):
        colour = np.asarray(row_colour(labels, row), dtype=np.float32)
        canvas[mask] = canvas[mask] * (1.0 - MASK_ALPHA) + colour * MASK_ALPHA
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def draw_prediction(image: np.ndarray, prediction: Drawable, *, show_scores: bool = True) -> Image.Image:
    """The image with the prediction's masks, boxes, class names and (optionally) scores drawn.

    Args:
        image: ``[H, W, 3]`` uint8 RGB, the original image.
        prediction: its prediction (original pixels).
        show_scores: write ``<name> <score>`` above each box; False writes the name alone
            (ground truth, whose scores mean nothing).

    Returns:
        An RGB image of the original size.
    """
    pixels = image if prediction.masks is None else overlay_masks(image, prediction.masks, prediction.labels)
    drawing = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB")
    draw = ImageDraw.Draw(drawing)
    width = max(1, round(max(drawing.size) / 320))
    for row, (box, score, name) in enumerate(zip(prediction.boxes, prediction.scores, prediction.names)):
        if not np.any(box):
            continue  # an empty mask's box
        colour = row_colour(prediction.labels, row)
        x1, y1, x2, y2 = (float(value) for value in box)
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=width)
        text = f"{name} {float(score):.2f}" if show_scores else str(name)
        left, top, right, bottom = draw.textbbox((0, 0), text)
        text_y = y1 - (bottom - top) - 2 if y1 >= bottom - top + 2 else y1
        draw.rectangle((x1, text_y, x1 + right - left + 2, text_y + bottom - top + 2), fill=colour)
        draw.text((x1 + 1, text_y - top + 1), text, fill=(255, 255, 255))
    return drawing
