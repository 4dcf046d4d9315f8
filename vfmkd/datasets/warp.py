"""Warping images and instance masks by an affine map (what every transform's geometry comes down to).

Images are resampled bilinearly (box-reduced first when shrinking by 2x or more, so they
are not aliased), masks by nearest neighbour; pixel centres are at ``i + 0.5`` in both, as
in :class:`~vfmkd.geometry.Frame`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from vfmkd.geometry import compose_matrices, scale_translate_matrix

__all__ = ["PAD_VALUE", "warp_image", "warp_masks"]

# The grey of letterbox padding and of pixels outside the image (YOLOv8's value).
PAD_VALUE = 114


def _axis_scales(matrix: np.ndarray) -> tuple[float, float]:
    return float(math.hypot(matrix[0, 0], matrix[1, 0])), float(math.hypot(matrix[0, 1], matrix[1, 1]))


def warp_image(
    image: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int], fill: int = PAD_VALUE
) -> np.ndarray:
    """Warp an image by an affine map (bilinear), filling uncovered pixels with ``fill``.

    Downscaling by 2x or more first box-reduces the image by the whole factor so the
    result is not aliased.

    Args:
        image: ``[h, w, 3]`` uint8 RGB.
        matrix: 2x3 map from image pixels to output pixels (continuous coordinates).
        out_hw: (H, W) of the output.
        fill: grey level of pixels that map outside the image.

    Returns:
        ``[H, W, 3]`` uint8.
    """
    out_h, out_w = out_hw
    matrix = np.asarray(matrix, dtype=np.float64)
    content_matrix = matrix
    picture = Image.fromarray(image)
    factor = int(1.0 / max(*_axis_scales(matrix), 1e-12))
    if factor >= 2:
        # NOTE: Image.reduce averages a partial last block over the pixels it has; padding
        # with the fill colour to whole blocks keeps every reduced pixel exactly `factor`
        # source pixels wide, as the composed matrix assumes.
        width, height = picture.size
        padded_size = (-(-width // factor) * factor, -(-height // factor) * factor)
        if padded_size != (width, height):
            padded = Image.new(picture.mode, padded_size, (fill, fill, fill))
            padded.paste(picture, (0, 0))
            picture = padded
        picture = picture.reduce(factor)
        matrix = compose_matrices(scale_translate_matrix(factor), matrix)
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    # NOTE: PIL samples output pixel (x, y) at inverse @ (x + 0.5, y + 0.5) and its bilinear
    # filter puts pixel centres at +0.5: the same continuous convention as Frame.
    warped = picture.transform(
        (int(out_w), int(out_h)),
        Image.Transform.AFFINE,
        data=tuple(float(value) for value in inverse.ravel()),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(fill, fill, fill),
    )
    result = np.asarray(warped, dtype=np.uint8)
    return _fill_outside_content(result, content_matrix, image.shape[:2], fill)


def _fill_outside_content(warped: np.ndarray, matrix: np.ndarray, source_hw: tuple[int, int], fill: int) -> np.ndarray:
    """``fill`` at output pixels whose centre lies outside the image's mapped rectangle.

    Bilinear sampling reaches half a (reduced) pixel past the image's edge; the frame's
    valid region is exact, so the warped image must hold nothing outside it. Only for
    axis-aligned maps (scale, flip, translate), which is what the transforms make.
    """
    if abs(matrix[0, 1]) > 1e-12 or abs(matrix[1, 0]) > 1e-12:
        return warped
    height, width = source_hw
    xs = sorted((matrix[0, 2], matrix[0, 0] * width + matrix[0, 2]))
    ys = sorted((matrix[1, 2], matrix[1, 1] * height + matrix[1, 2]))
    centres_x = np.arange(warped.shape[1]) + 0.5
    centres_y = np.arange(warped.shape[0]) + 0.5
    outside_x = (centres_x < xs[0]) | (centres_x >= xs[1])
    outside_y = (centres_y < ys[0]) | (centres_y >= ys[1])
    if not outside_x.any() and not outside_y.any():
        return warped
    warped = warped.copy()
    warped[:, outside_x] = fill
    warped[outside_y] = fill
    return warped


def warp_masks(masks: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Warp instance masks by an affine map (nearest neighbour), zero outside.

    Args:
        masks: ``[N, h, w]`` uint8.
        matrix: 2x3 map from mask pixels to output pixels.
        out_hw: (H, W) of the output.

    Returns:
        ``[N, H, W]`` uint8.
    """
    count, height, width = masks.shape
    out_h, out_w = out_hw
    if count == 0:
        return np.zeros((0, out_h, out_w), dtype=np.uint8)
    inverse = np.linalg.inv(np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]]))[:2]
    xs = np.arange(out_w, dtype=np.float64) + 0.5
    ys = np.arange(out_h, dtype=np.float64) + 0.5
    if abs(inverse[0, 1]) < 1e-12 and abs(inverse[1, 0]) < 1e-12:
        # Axis-aligned (every augmentation here): rows and columns index independently.
        columns = np.floor(inverse[0, 0] * xs + inverse[0, 2]).astype(np.int64)
        rows = np.floor(inverse[1, 1] * ys + inverse[1, 2]).astype(np.int64)
        column_ok = (columns >= 0) & (columns < width)
        row_ok = (rows >= 0) & (rows < height)
        gathered = masks[:, np.clip(rows, 0, height - 1)][:, :, np.clip(columns, 0, width - 1)]
        return gathered * (row_ok[:, None] & column_ok[None, :]).astype(np.uint8)
    grid_x, grid_y = np.meshgrid(xs, ys)
    columns = np.floor(inverse[0, 0] * grid_x + inverse[0, 1] * grid_y + inverse[0, 2]).astype(np.int64)
    rows = np.floor(inverse[1, 0] * grid_x + inverse[1, 1] * grid_y + inverse[1, 2]).astype(np.int64)
    inside = (columns >= 0) & (columns < width) & (rows >= 0) & (rows < height)
    gathered = masks[:, np.clip(rows, 0, height - 1), np.clip(columns, 0, width - 1)]
    return gathered * inside.astype(np.uint8)
