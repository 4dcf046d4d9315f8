"""Geometric frames: where every pixel of a network input came from.

A :class:`Frame` is the 2x3 affine map from an original image's pixel coordinates to a
network input's pixel coordinates, together with the input size, the valid (non-padding)
region of the input and the original image size.

Coordinates are continuous: pixel ``i`` covers ``[i, i + 1)``, so its centre sits at
``i + 0.5``, and a resize by a factor ``s`` maps ``x -> s * x``. Resize, letterbox, pad,
flip, scale, translate, crop and each mosaic tile compose into a frame with
:meth:`Frame.then`; boxes and points move with :meth:`Frame.apply_boxes` and
:meth:`Frame.apply_points`.

:func:`warp_features` aligns a feature map computed in one frame (a teacher's) with the
grid of another frame (a student level) with one ``grid_sample`` call, and returns the
mask of grid cells whose value came from real image content in both frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]

__all__ = [
    "Box",
    "Frame",
    "FrameWarp",
    "as_matrix3",
    "compose_matrices",
    "hflip_matrix",
    "intersect_regions",
    "letterbox_frame",
    "longest_side_frame",
    "merge_tiles",
    "resize_frame",
    "scale_translate_matrix",
    "transform_boxes",
    "transform_points",
    "warp_features",
    "warp_features_batch",
]


def as_matrix3(matrix: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Return a 2x3 (or 3x3) affine matrix as a 3x3 float64 homogeneous matrix."""
    array = np.asarray(matrix, dtype=np.float64)
    if array.shape == (3, 3):
        return array.copy()
    if array.shape != (2, 3):
        raise ValueError(f"an affine matrix must be 2x3 or 3x3, got shape {array.shape}")
    full = np.eye(3, dtype=np.float64)
    full[:2] = array
    return full


def compose_matrices(*matrices: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Compose affine steps applied in the given order (first argument first).

    Returns:
        The 2x3 float64 matrix of ``matrices[-1] o ... o matrices[0]``.
    """
    result = np.eye(3, dtype=np.float64)
    for matrix in matrices:
        result = as_matrix3(matrix) @ result
    return result[:2].copy()


def scale_translate_matrix(
    scale_x: float = 1.0, scale_y: float | None = None, translate_x: float = 0.0, translate_y: float = 0.0
) -> np.ndarray:
    """The 2x3 matrix of ``x -> scale_x * x + translate_x``, ``y -> scale_y * y + translate_y``.

    ``scale_y`` defaults to ``scale_x``.
    """
    scale_y = scale_x if scale_y is None else scale_y
    return np.array([[scale_x, 0.0, translate_x], [0.0, scale_y, translate_y]], dtype=np.float64)


def hflip_matrix(width: float) -> np.ndarray:
    """The 2x3 matrix of a horizontal flip of a canvas ``width`` pixels wide: ``x -> width - x``."""
    return np.array([[-1.0, 0.0, float(width)], [0.0, 1.0, 0.0]], dtype=np.float64)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to points.

    Args:
        matrix: 2x3 (or 3x3) affine matrix.
        points: ``[N, 2]`` (x, y) points.

    Returns:
        ``[N, 2]`` float64 transformed points.
    """
    matrix3 = as_matrix3(matrix)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ matrix3[:2, :2].T + matrix3[:2, 2]


def transform_boxes(matrix: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Map boxes through an affine matrix; each result is the hull of its 4 mapped corners.

    The hull keeps ``x0 <= x1`` and ``y0 <= y1`` under flips, and is exact for the
    axis-aligned maps (scale, translate, flip) that the augmentation uses.

    Args:
        matrix: 2x3 (or 3x3) affine matrix.
        boxes: ``[N, 4]`` xyxy boxes.

    Returns:
        ``[N, 4]`` float64 xyxy boxes.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros((0, 4), dtype=np.float64)
    x0, y0, x1, y1 = boxes.T
    corners = np.stack(
        [np.stack([x0, y0], 1), np.stack([x1, y0], 1), np.stack([x0, y1], 1), np.stack([x1, y1], 1)], 1
    )  # [N, 4, 2]
    mapped = transform_points(matrix, corners.reshape(-1, 2)).reshape(-1, 4, 2)
    return np.concatenate([mapped.min(axis=1), mapped.max(axis=1)], axis=1)


def intersect_regions(first: Box, second: Box) -> Box:
    """Intersection of two xyxy regions; an empty one collapses to zero size (never inverted)."""
    x0, y0 = max(first[0], second[0]), max(first[1], second[1])
    x1, y1 = min(first[2], second[2]), min(first[3], second[3])
    return (float(x0), float(y0), float(max(x1, x0)), float(max(y1, y0)))


@dataclass(frozen=True, eq=False)
class Frame:
    """The map from an original image to a network input.

    Attributes:
        matrix: 2x3 float64 affine matrix, original-image pixel coordinates -> network-input
            pixel coordinates (continuous coordinates, pixel centres at ``i + 0.5``).
        input_size: (H, W) of the network input.
        valid: (x0, y0, x1, y1) in input pixels of the region holding image content, not
            padding (zero size when no content is visible).
        source_size: (H, W) of the original image.
    """

    matrix: np.ndarray
    input_size: tuple[int, int]
    valid: Box
    source_size: tuple[int, int]

    def __post_init__(self) -> None:
        matrix = np.array(self.matrix, dtype=np.float64)
        if matrix.shape == (3, 3):
            matrix = matrix[:2]
        if matrix.shape != (2, 3):
            raise ValueError(f"Frame.matrix must be 2x3, got shape {matrix.shape}")
        if not np.isfinite(matrix).all():
            raise ValueError(f"Frame.matrix must be finite, got {matrix.tolist()}")
        if abs(np.linalg.det(matrix[:, :2])) < 1e-12:
            raise ValueError(f"Frame.matrix must be invertible, got {matrix.tolist()}")
        matrix.setflags(write=False)
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "input_size", (int(self.input_size[0]), int(self.input_size[1])))
        object.__setattr__(self, "source_size", (int(self.source_size[0]), int(self.source_size[1])))
        valid = tuple(float(value) for value in self.valid)
        if len(valid) != 4:
            raise ValueError(f"Frame.valid must be (x0, y0, x1, y1), got {self.valid}")
        object.__setattr__(self, "valid", valid)

    # ----------------------------------------------------------------- construction
    @classmethod
    def identity(cls, height: int, width: int) -> Frame:
        """The frame of an image fed to a network as it is."""
        return cls(np.eye(3)[:2], (height, width), (0.0, 0.0, float(width), float(height)), (height, width))

    def then(
        self,
        matrix: np.ndarray | Sequence[Sequence[float]],
        input_size: tuple[int, int],
        valid: Box | None = None,
    ) -> Frame:
        """Apply a further affine step after this frame.

        Args:
            matrix: 2x3 affine step, this frame's input pixels -> the new input pixels.
            input_size: (H, W) of the new input.
            valid: the new valid region; by default the mapped old valid region
                intersected with the new canvas.

        Returns:
            The frame from the original image to the new input.
        """
        step = as_matrix3(matrix)
        if valid is None:
            mapped = transform_boxes(step, np.array([self.valid]))[0]
            valid = intersect_regions(tuple(mapped), (0.0, 0.0, float(input_size[1]), float(input_size[0])))
        return Frame(compose_matrices(self.matrix, step), input_size, valid, self.source_size)

    def compose(self, other: Frame) -> Frame:
        """Chain ``other`` after this frame; ``other``'s source is this frame's input.

        The valid region is this frame's mapped valid region intersected with ``other``'s.
        """
        if tuple(other.source_size) != tuple(self.input_size):
            raise ValueError(
                f"cannot compose: the second frame's source size {other.source_size} is not the "
                f"first frame's input size {self.input_size}"
            )
        mapped = transform_boxes(other.matrix, np.array([self.valid]))[0]
        valid = intersect_regions(tuple(mapped), other.valid)
        return Frame(compose_matrices(self.matrix, other.matrix), other.input_size, valid, self.source_size)

    # ----------------------------------------------------------------- mapping
    def inverse_matrix(self) -> np.ndarray:
        """The 2x3 matrix from network-input pixels back to original-image pixels."""
        return np.linalg.inv(as_matrix3(self.matrix))[:2].copy()

    def apply_points(self, points: np.ndarray) -> np.ndarray:
        """Map ``[N, 2]`` original-image points to ``[N, 2]`` input points."""
        return transform_points(self.matrix, points)

    def invert_points(self, points: np.ndarray) -> np.ndarray:
        """Map ``[N, 2]`` input points back to ``[N, 2]`` original-image points."""
        return transform_points(self.inverse_matrix(), points)

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``[N, 4]`` xyxy original-image boxes to ``[N, 4]`` xyxy input boxes (not clipped)."""
        return transform_boxes(self.matrix, boxes)

    def invert_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``[N, 4]`` xyxy input boxes back to ``[N, 4]`` xyxy original-image boxes."""
        return transform_boxes(self.inverse_matrix(), boxes)

    @property
    def mirrored(self) -> bool:
        """Whether the input shows the original mirrored (the map reverses orientation: an odd number of flips)."""
        return float(np.linalg.det(self.matrix[:, :2])) < 0.0

    @property
    def valid_area(self) -> float:
        """Area in input pixels of the valid region."""
        return max(self.valid[2] - self.valid[0], 0.0) * max(self.valid[3] - self.valid[1], 0.0)

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (float64 values survive a JSON round trip exactly)."""
        return {
            "matrix": [[float(value) for value in row] for row in self.matrix],
            "input_size": list(self.input_size),
            "valid": list(self.valid),
            "source_size": list(self.source_size),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Frame:
        """Inverse of :meth:`to_dict`."""
        return cls(
            np.asarray(data["matrix"], dtype=np.float64),
            tuple(data["input_size"]),
            tuple(data["valid"]),
            tuple(data["source_size"]),
        )

    def isclose(self, other: Frame, atol: float = 1e-6) -> bool:
        """Equality up to ``atol`` on the matrix and the valid region."""
        return (
            isinstance(other, Frame)
            and self.input_size == other.input_size
            and self.source_size == other.source_size
            and np.allclose(self.matrix, other.matrix, atol=atol, rtol=0.0)
            and np.allclose(self.valid, other.valid, atol=atol, rtol=0.0)
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (
            self.input_size == other.input_size
            and self.source_size == other.source_size
            and self.valid == other.valid
            and np.array_equal(self.matrix, other.matrix)
        )

    def __hash__(self) -> int:
        return hash((self.matrix.tobytes(), self.input_size, self.valid, self.source_size))

    def __repr__(self) -> str:
        rows = ", ".join("[" + ", ".join(f"{value:.6g}" for value in row) + "]" for row in self.matrix)
        return (
            f"Frame(matrix=[{rows}], input_size={self.input_size}, valid={self.valid}, "
            f"source_size={self.source_size})"
        )


# --------------------------------------------------------------------------- frame helpers
def _size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    return int(size[0]), int(size[1])


def resize_frame(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Frame:
    """Stretch an image of size ``src_hw`` to ``dst_hw`` (H, W), aspect ratio not kept."""
    src_h, src_w = src_hw
    dst_h, dst_w = _size_pair(dst_hw)
    matrix = scale_translate_matrix(dst_w / src_w, dst_h / src_h)
    return Frame(matrix, (dst_h, dst_w), (0.0, 0.0, float(dst_w), float(dst_h)), (src_h, src_w))


def letterbox_frame(
    src_hw: tuple[int, int], dst_size: int | tuple[int, int], center: bool = True, scale_up: bool = True
) -> Frame:
    """Fit an image into ``dst_size`` keeping its aspect ratio, padding the rest.

    The content is resized to whole pixels (``round(w * r) x round(h * r)``) and placed at
    whole-pixel offsets, so the letterboxed image is a plain resize plus a paste.

    Args:
        src_hw: (H, W) of the original image.
        dst_size: side of a square input, or its (H, W).
        center: pad evenly on both sides (True) or only at the bottom and right (False).
        scale_up: allow enlarging images smaller than the input.
    """
    src_h, src_w = src_hw
    dst_h, dst_w = _size_pair(dst_size)
    ratio = min(dst_h / src_h, dst_w / src_w)
    if not scale_up:
        ratio = min(ratio, 1.0)
    new_w = min(max(int(round(src_w * ratio)), 1), dst_w)
    new_h = min(max(int(round(src_h * ratio)), 1), dst_h)
    left, top = ((dst_w - new_w) // 2, (dst_h - new_h) // 2) if center else (0, 0)
    matrix = scale_translate_matrix(new_w / src_w, new_h / src_h, left, top)
    valid = (float(left), float(top), float(left + new_w), float(top + new_h))
    return Frame(matrix, (dst_h, dst_w), valid, (src_h, src_w))


def longest_side_frame(src_hw: tuple[int, int], long_side: int) -> Frame:
    """SAM's preprocessing: scale the longest side to ``long_side``, pad bottom-right to a square.

    The resized size follows ``ResizeLongestSide.get_preprocess_shape``
    (``int(side * scale + 0.5)``).
    """
    src_h, src_w = src_hw
    scale = long_side / max(src_h, src_w)
    new_h, new_w = int(src_h * scale + 0.5), int(src_w * scale + 0.5)
    matrix = scale_translate_matrix(new_w / src_w, new_h / src_h)
    return Frame(matrix, (long_side, long_side), (0.0, 0.0, float(new_w), float(new_h)), (src_h, src_w))


# --------------------------------------------------------------------------- feature warping
class FrameWarp:
    """Resampling from B maps' own frames into B target frames, composed once for any grid.

    The per-map affine chains (target input px -> original px -> source input px) and valid
    regions are computed once, so the levels of one batch (p3, p4, p5, ...) share them;
    :meth:`warp` then samples one level with one ``grid_sample`` call.

    Args:
        src_frames: B frames of the maps (e.g. a teacher's preprocessing).
        dst_frames: B target frames (e.g. the augmented student input; one mosaic tile's
            frame for a tile).
        device: where the sampling grids are built.
    """

    def __init__(self, src_frames: Sequence[Frame], dst_frames: Sequence[Frame], device: torch.device) -> None:
        if len(src_frames) != len(dst_frames):
            raise ValueError(
                f"need one source and one target frame per map: {len(src_frames)} source frames, "
                f"{len(dst_frames)} target frames"
            )
        self.count = len(src_frames)
        if self.count:
            # Composed in float64: dst input px -> original px -> src input px.
            src = np.stack([as_matrix3(frame.matrix) for frame in src_frames])
            dst = np.stack([as_matrix3(frame.matrix) for frame in dst_frames])
            maps = (src @ np.linalg.inv(dst))[:, :2]  # [B, 2, 3]
        else:
            maps = np.zeros((0, 2, 3))
        self.device = device
        self._affine = torch.from_numpy(np.ascontiguousarray(maps)).to(device)[:, :, :, None, None]  # [B, 2, 3, 1, 1]
        valid = np.array([frame.valid for frame in src_frames] + [frame.valid for frame in dst_frames], dtype=np.float64)
        valid_t = torch.from_numpy(valid.reshape(2, self.count, 4)).to(device)[..., None, None]
        self._src_valid, self._dst_valid = valid_t[0], valid_t[1]  # [B, 4, 1, 1] each

    def grid(
        self, src_stride: float, src_grid_hw: tuple[int, int], dst_size: tuple[int, int], dst_stride: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``grid_sample`` coordinates ``[B, Hd, Wd, 2]`` and validity ``[B, 1, Hd, Wd]``."""
        dst_h, dst_w = dst_size
        xs = ((torch.arange(dst_w, device=self.device, dtype=torch.float64) + 0.5) * dst_stride)[None, None, :]
        ys = ((torch.arange(dst_h, device=self.device, dtype=torch.float64) + 0.5) * dst_stride)[None, :, None]
        affine, src_valid, dst_valid = self._affine, self._src_valid, self._dst_valid
        src_x = affine[:, 0, 0] * xs + affine[:, 0, 1] * ys + affine[:, 0, 2]  # [B, Hd, Wd]
        src_y = affine[:, 1, 0] * xs + affine[:, 1, 1] * ys + affine[:, 1, 2]
        valid = (
            (src_x >= src_valid[:, 0])
            & (src_x < src_valid[:, 2])
            & (src_y >= src_valid[:, 1])
            & (src_y < src_valid[:, 3])
            & (xs >= dst_valid[:, 0])
            & (xs < dst_valid[:, 2])
            & (ys >= dst_valid[:, 1])
            & (ys < dst_valid[:, 3])
        )
        # align_corners=False: normalised -1 and 1 are the outer edges of the source grid.
        src_grid_h, src_grid_w = src_grid_hw
        grid = torch.stack(
            [src_x * (2.0 / (src_stride * src_grid_w)) - 1.0, src_y * (2.0 / (src_stride * src_grid_h)) - 1.0],
            dim=-1,
        )
        return grid, valid[:, None]

    def warp(
        self,
        features: torch.Tensor,
        src_stride: float,
        dst_size: tuple[int, int],
        dst_stride: float,
        mode: str = "bilinear",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resample ``[B, C, Hs, Ws]`` maps at ``src_stride`` onto the target grid; see :func:`warp_features_batch`."""
        if features.dim() != 4:
            raise ValueError(f"features must be [B, C, H, W], got shape {tuple(features.shape)}")
        if features.shape[0] != self.count:
            raise ValueError(
                f"need one source and one target frame per map: {features.shape[0]} maps, "
                f"{self.count} frame pairs"
            )
        dst_size = (int(dst_size[0]), int(dst_size[1]))
        grid, valid = self.grid(src_stride, tuple(features.shape[-2:]), dst_size, dst_stride)
        compute_dtype = features.dtype
        if compute_dtype not in (torch.float32, torch.float64) and (
            features.device.type == "cpu" or compute_dtype not in (torch.float16, torch.bfloat16)
        ):
            # NOTE: grid_sample has no CPU half kernels; compute in float32 and cast back.
            compute_dtype = torch.float32
        warped = F.grid_sample(
            features.to(compute_dtype),
            grid.to(compute_dtype),
            mode=mode,
            padding_mode="border",
            align_corners=False,
        )
        return warped.to(features.dtype), valid


def warp_features_batch(
    features: torch.Tensor,
    src_frames: Sequence[Frame],
    src_stride: float,
    dst_frames: Sequence[Frame],
    dst_size: tuple[int, int],
    dst_stride: float,
    mode: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample a batch of feature maps from their own frames into target frames.

    Every target grid cell centre ``((j + 0.5) * dst_stride, (i + 0.5) * dst_stride)`` (in
    target-input pixels) is mapped back to the original image through ``dst_frames[b]``,
    forward into the source input through ``src_frames[b]``, and sampled from the source
    grid (cell ``k`` covers source-input pixels ``[k * src_stride, (k + 1) * src_stride)``).
    All samples go through one ``grid_sample`` call; several levels of one batch share
    their frame chains through :class:`FrameWarp`.

    Args:
        features: ``[B, C, Hs, Ws]`` maps, each in the frame ``src_frames[b]`` at stride
            ``src_stride``.
        src_frames: B frames of the maps (e.g. a teacher's preprocessing).
        src_stride: input pixels per source grid cell.
        dst_frames: B target frames (e.g. the augmented student input; one mosaic tile's
            frame for a tile).
        dst_size: (Hd, Wd) of the target grid.
        dst_stride: input pixels per target grid cell.
        mode: ``grid_sample`` interpolation (``bilinear`` or ``nearest``).

    Returns:
        ``[B, C, Hd, Wd]`` warped maps (dtype of ``features``) and a ``[B, 1, Hd, Wd]`` bool
        mask, True where the cell centre lies inside both the target frame's valid region
        and the source frame's valid region.
    """
    return FrameWarp(src_frames, dst_frames, features.device).warp(features, src_stride, dst_size, dst_stride, mode)


def warp_features(
    feature: torch.Tensor,
    src_frame: Frame,
    src_stride: float,
    dst_frame: Frame,
    dst_size: tuple[int, int],
    dst_stride: float,
    mode: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample a feature map from ``src_frame`` into ``dst_frame``'s grid.

    Args:
        feature: ``[C, Hs, Ws]`` or ``[B, C, Hs, Ws]`` (all B maps share the two frames).
        src_frame: frame of the map's input (e.g. the teacher's preprocessing).
        src_stride: input pixels per source grid cell.
        dst_frame: target frame (e.g. the augmented student input).
        dst_size: (Hd, Wd) of the target grid.
        dst_stride: input pixels per target grid cell.
        mode: ``grid_sample`` interpolation (``bilinear`` or ``nearest``).

    Returns:
        Warped ``[C, Hd, Wd]`` (or ``[B, C, Hd, Wd]``) and a bool valid mask ``[1, Hd, Wd]``
        (or ``[B, 1, Hd, Wd]``); see :func:`warp_features_batch`.
    """
    single = feature.dim() == 3
    batch = feature[None] if single else feature
    count = batch.shape[0]
    warped, valid = warp_features_batch(
        batch, [src_frame] * count, src_stride, [dst_frame] * count, dst_size, dst_stride, mode=mode
    )
    return (warped[0], valid[0]) if single else (warped, valid)


def merge_tiles(
    warped: torch.Tensor, valid: torch.Tensor, sample_index: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-tile warped maps into per-sample maps (mosaic samples have up to 4 tiles).

    Args:
        warped: ``[T, C, H, W]`` maps, one per (sample, tile), from :func:`warp_features_batch`.
        valid: ``[T, 1, H, W]`` bool masks of those maps.
        sample_index: ``[T]`` int64 index of the sample each tile belongs to.
        num_samples: B.

    Returns:
        ``[B, C, H, W]`` maps (mean of the valid tiles at each cell, 0 where none is valid)
        and a ``[B, 1, H, W]`` bool mask (any tile valid).
    """
    weight = valid.to(warped.dtype)
    total = warped.new_zeros((num_samples, *warped.shape[1:]))
    total.index_add_(0, sample_index, warped * weight)
    count = warped.new_zeros((num_samples, 1, *warped.shape[2:]))
    count.index_add_(0, sample_index, weight)
    return total / count.clamp(min=1.0), count > 0
