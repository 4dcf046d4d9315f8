"""Instance masks from annotations: validating segments, rasterising them, tracing masks back.

A segment is what an annotation gives for an object's mask: a list of polygons (flat
``[x0, y0, x1, y1, ...]`` in original pixels, COCO and YOLO), a COCO RLE dict (``size``
``[H, W]`` and ``counts``: a compressed string or an uncompressed list of run lengths),
or None (no mask: the box stands in for it). Pixel ``(x, y)`` covers ``[x, x + 1) x [y,
y + 1)`` (the convention of :mod:`vfmkd.geometry` and of pycocotools' rasteriser).

:func:`clean_segment` checks a segment when a data set is read, so that rasterising it
later (:func:`segment_to_mask`, in every epoch) cannot fail or give a mask of the wrong
size; :func:`mask_to_polygon` turns a mask into one polygon that rasterises back to
exactly that mask (how the built-in data set writes YOLO segmentation labels).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    "Segment",
    "clean_segment",
    "mask_to_polygon",
    "polygon_is_flat",
    "rle_counts",
    "segment_box",
    "segment_to_mask",
]

Segment = list[list[float]] | dict[str, Any] | None

# Compressed RLE strings use the characters chr(48) .. chr(48 + 63).
_RLE_CHARACTERS = range(48, 48 + 64)
# Polygon coordinates: JSON numbers, or numpy's (bool is not a coordinate).
_NUMBER_TYPES = frozenset({int, float, np.float64, np.float32, np.int64, np.int32})


def segment_to_mask(segment: Segment, box: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rasterise a segment (polygons, RLE or, when None, the box) to a ``[H, W]`` uint8 mask."""
    if segment is None:
        mask = np.zeros((height, width), dtype=np.uint8)
        x0, y0 = int(np.floor(max(box[0], 0))), int(np.floor(max(box[1], 0)))
        x1, y1 = int(np.ceil(min(box[2], width))), int(np.ceil(min(box[3], height)))
        mask[y0:y1, x0:x1] = 1
        return mask
    if isinstance(segment, list):
        polygons = [polygon for polygon in segment if len(polygon) >= 6]
        if not polygons:
            return segment_to_mask(None, box, height, width)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segment.get("counts"), list):
        rle = mask_utils.frPyObjects(segment, height, width)
    else:
        rle = dict(segment)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def rle_counts(rle: dict[str, Any]) -> list[int]:
    """The run lengths of a COCO RLE, compressed (``counts`` a string) or not (a list).

    Raises:
        ValueError: ``counts`` is neither, holds a negative run or an invalid character.
    """
    counts = rle.get("counts")
    if isinstance(counts, (list, tuple)):
        if not all(isinstance(run, (int, np.integer)) and not isinstance(run, bool) for run in counts):
            raise ValueError("uncompressed RLE counts must be whole numbers")
        runs = [int(run) for run in counts]
    elif isinstance(counts, (str, bytes)):
        runs = _decode_counts(counts.encode("ascii") if isinstance(counts, str) else counts)
    else:
        raise ValueError(f"RLE counts must be a string or a list of run lengths, not {type(counts).__name__}")
    if any(run < 0 for run in runs):
        raise ValueError("RLE counts hold a negative run length")
    return runs


def _decode_counts(text: bytes) -> list[int]:
    """pycocotools' ``rleFrString``: run lengths from a compressed RLE string (LEB128-like,
    6 bits a character, runs after the second stored as differences)."""
    runs: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text) or text[position] not in _RLE_CHARACTERS:
                raise ValueError("compressed RLE counts hold an invalid or truncated character")
            code = text[position] - 48
            value |= (code & 0x1F) << (5 * shift)
            more = bool(code & 0x20)
            position += 1
            shift += 1
            if not more and code & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _signed_area(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Twice the signed area of a polygon (shoelace); not finite when a coordinate is not."""
    # NOTE: plain Python: a COCO file has ~10**6 polygons of a few dozen points, for which
    # numpy's per-call overhead costs three times as much. A NaN or infinite coordinate
    # always makes the sum NaN or infinite (inf * 0 is NaN).
    first_x, first_y = xs[0], ys[0]
    area, previous_x, previous_y = 0.0, 0.0, 0.0
    for x, y in zip(xs, ys):
        x, y = x - first_x, y - first_y
        area += previous_x * y - x * previous_y
        previous_x, previous_y = x, y
    return area


def _check_polygon(part: Any) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """The xyxy extent of one polygon of a segment, or why it cannot be rasterised."""
    if not isinstance(part, (list, tuple)):
        return None, f"is a {type(part).__name__}, not a list of coordinates"
    if not all(type(value) in _NUMBER_TYPES for value in part):
        return None, "holds a value that is not a number"
    if len(part) % 2:
        return None, f"has an odd number of coordinates ({len(part)})"
    if len(part) < 6:
        return None, f"has {len(part) // 2} point(s); a polygon needs 3 or more"
    xs, ys = part[0::2], part[1::2]
    area = _signed_area(xs, ys)
    if not math.isfinite(area):
        return None, "holds a coordinate that is not finite"
    if abs(area) <= 1e-9 and polygon_is_flat(np.array([xs, ys], dtype=np.float64).T):
        return None, "has no area (its points lie on a line)"
    return (min(xs), min(ys), max(xs), max(ys)), None


def polygon_is_flat(points: np.ndarray) -> bool:
    """Whether the ``[K, 2]`` points of a polygon lie on one line (zero area whatever their order)."""
    x, y = points[:, 0] - points[0, 0], points[:, 1] - points[0, 1]
    if abs(_signed_area(x.tolist(), y.tolist())) > 1e-9:
        return False
    # NOTE: a self-crossing polygon (a figure of eight) can have zero signed area and still
    # cover pixels; it is flat only if every point is on the line to the farthest one.
    lengths = np.hypot(x, y)
    if lengths.max() == 0:
        return True
    far = int(np.argmax(lengths))
    cross = x * y[far] - y * x[far]
    return bool(np.abs(cross).max() <= 1e-9 * lengths.max() ** 2)


def _clean_polygons(segment: list[Any], height: int, width: int) -> tuple[Segment, str | None]:
    parts, dropped, extents = [], [], []
    for number, part in enumerate(segment):
        extent, problem = _check_polygon(part)
        if extent is None:
            dropped.append(f"polygon {number} {problem}")
            continue
        parts.append(list(part))
        extents.append(extent)
    if not parts:
        return None, "; ".join(dropped) if dropped else "its segmentation is an empty list of polygons"
    low_x, low_y = min(extent[0] for extent in extents), min(extent[1] for extent in extents)
    high_x, high_y = max(extent[2] for extent in extents), max(extent[3] for extent in extents)
    if high_x <= 0 or high_y <= 0 or low_x >= width or low_y >= height:
        return None, f"its polygons lie outside the {height}x{width} image"
    if dropped:
        return parts, "; ".join(dropped) + f" (dropped; {len(parts)} polygon(s) kept)"
    return parts, None


def _clean_rle(segment: dict[str, Any], height: int, width: int) -> tuple[Segment, str | None]:
    size = segment.get("size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        return None, f"its RLE has no valid `size` [height, width] (got {size!r})"
    if list(size) != [height, width]:
        return None, f"its RLE size {list(size)} differs from the image's [{height}, {width}]"
    try:
        runs = rle_counts(segment)
    except ValueError as error:
        return None, f"its RLE is malformed ({error})"
    if sum(runs) != height * width:
        pixels = height * width
        return None, f"its RLE counts cover {sum(runs)} pixels; the {height}x{width} image has {pixels}"
    if sum(runs[1::2]) == 0:
        return None, "its RLE mask is empty"
    return dict(segment), None


def clean_segment(segment: Any, height: int, width: int) -> tuple[Segment, str | None]:
    """Check an annotation's segment against its image; what can be rasterised, and what was wrong.

    Polygons with fewer than 3 points, an odd number of coordinates, a non-finite value
    or no area are dropped from a segment; an RLE must have the image's ``size`` and
    counts that cover it exactly; the mask must not be empty (an empty RLE, polygons
    outside the image).

    Args:
        segment: the annotation's segmentation (not None).
        height: height of the image the annotation refers to.
        width: its width.

    Returns:
        ``(segment, None)`` when it is fine; ``(the usable polygons, message)`` when some
        polygons were dropped (a warning); ``(None, message)`` when nothing usable is
        left (the object must be dropped).
    """
    if isinstance(segment, list):
        return _clean_polygons(segment, height, width)
    if isinstance(segment, dict):
        return _clean_rle(segment, height, width)
    return None, f"its segmentation is a {type(segment).__name__}, neither polygons nor an RLE dict"


def segment_box(segment: Segment, height: int, width: int) -> np.ndarray:
    """The ``[4]`` xyxy extent of a checked segment (pixel edges), clipped to the image."""
    if isinstance(segment, list):
        points = np.concatenate([np.asarray(part, dtype=np.float64).reshape(-1, 2) for part in segment])
        box = np.concatenate([points.min(axis=0), points.max(axis=0)])
    else:
        rle = segment
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, height, width)
        elif isinstance(rle["counts"], str):
            rle = {**rle, "counts": rle["counts"].encode("ascii")}
        x, y, box_w, box_h = (float(value) for value in mask_utils.toBbox(rle))
        box = np.array([x, y, x + box_w, y + box_h])
    return box.clip([0, 0, 0, 0], [width, height, width, height])


# --------------------------------------------------------------------------- mask -> polygon
def _boundary_edges(mask: np.ndarray) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Directed pixel-edge boundary of a mask, each pixel's edges clockwise (y down):
    start corner -> end corners."""
    padded = np.pad(mask.astype(bool), 1)
    inside = padded[1:-1, 1:-1]
    edges: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    # (neighbour offset, edge start, edge end) in (row, column) steps from the pixel's top-left corner.
    sides = (
        ((-1, 0), (0, 0), (0, 1)),  # top: left to right
        ((0, 1), (0, 1), (1, 1)),  # right: top to bottom
        ((1, 0), (1, 1), (1, 0)),  # bottom: right to left
        ((0, -1), (1, 0), (0, 0)),  # left: bottom to top
    )
    for (d_row, d_col), (s_row, s_col), (e_row, e_col) in sides:
        outside = ~padded[1 + d_row : padded.shape[0] - 1 + d_row, 1 + d_col : padded.shape[1] - 1 + d_col]
        for row, col in zip(*np.nonzero(inside & outside)):
            edges[(int(col) + s_col, int(row) + s_row)].append((int(col) + e_col, int(row) + e_row))
    return edges


def _loops(edges: dict[tuple[int, int], list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
    """Closed loops using every edge once, corners only (no collinear middle points)."""
    loops = []
    for start in sorted(edges, key=lambda corner: (corner[1], corner[0])):
        while edges[start]:
            loop, corner = [start], edges[start].pop()
            while corner != start:
                loop.append(corner)
                corner = edges[corner].pop()
            corners = [
                point
                for index, point in enumerate(loop)
                if (point[0] - loop[index - 1][0], point[1] - loop[index - 1][1])
                != (loop[(index + 1) % len(loop)][0] - point[0], loop[(index + 1) % len(loop)][1] - point[1])
            ]
            loops.append(corners)
    return loops


def mask_to_polygon(mask: np.ndarray) -> list[float]:
    """One polygon that rasterises (pycocotools, even-odd) back to exactly ``mask``.

    The polygon runs along pixel edges. Separate parts and holes are joined by zero-width
    bridges (each bridge is walked there and back, so it adds and removes nothing), as
    Ultralytics joins the parts of a YOLO segmentation label.

    Args:
        mask: ``[H, W]`` mask (nonzero = inside), not empty.

    Returns:
        Flat ``[x0, y0, x1, y1, ...]`` integer corner coordinates (as floats).

    Raises:
        ValueError: the mask is empty.
    """
    loops = _loops(_boundary_edges(mask))
    if not loops:
        raise ValueError("cannot trace an empty mask")
    anchor = loops[0][0]
    path = list(loops[0]) + [anchor]
    for loop in loops[1:]:
        path += list(loop) + [loop[0], anchor]
    # The polygon closes by itself: the final return to the anchor is implied.
    path.pop()
    return [float(value) for point in path for value in point]
