"""Box utilities shared by detection heads, losses and evaluation.

Conventions: boxes are ``xyxy`` (left, top, right, bottom) unless a name says ``xywh``
(centre x, centre y, width, height). Anchor points are the centres of feature-map cells,
``(column + 0.5, row + 0.5)``, in grid units of their level; multiply by the level's stride
to get input pixels.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torchvision

__all__ = [
    "aligned_box_ciou",
    "aligned_box_giou",
    "aligned_box_iou",
    "batched_nms",
    "bbox_to_distance",
    "box_iou",
    "distance_to_bbox",
    "make_anchors",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """Convert corner boxes to centre-size boxes.

    Args:
        boxes: ``[..., 4]`` boxes as ``x1, y1, x2, y2``.

    Returns:
        ``[..., 4]`` boxes as ``cx, cy, w, h``.
    """
    top_left, bottom_right = boxes.chunk(2, dim=-1)
    return torch.cat(((top_left + bottom_right) / 2, bottom_right - top_left), dim=-1)


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Convert centre-size boxes to corner boxes.

    Args:
        boxes: ``[..., 4]`` boxes as ``cx, cy, w, h``.

    Returns:
        ``[..., 4]`` boxes as ``x1, y1, x2, y2``.
    """
    centre, size = boxes.chunk(2, dim=-1)
    half = size / 2
    return torch.cat((centre - half, centre + half), dim=-1)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU between two sets of ``xyxy`` boxes.

    Args:
        boxes1: ``[N, 4]`` boxes.
        boxes2: ``[M, 4]`` boxes.

    Returns:
        ``[N, M]`` IoU matrix.
    """
    return torchvision.ops.box_iou(boxes1, boxes2)


def aligned_box_ciou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU between corresponding ``xyxy`` boxes (Zheng et al., AAAI 2020).

    ``CIoU = IoU - rho^2 / c^2 - alpha * v`` where ``rho`` is the distance between the box
    centres, ``c`` the diagonal of the smallest enclosing box, ``v`` the aspect-ratio
    consistency term and ``alpha = v / (1 - IoU + v)`` (treated as a constant in backward, as
    in the paper).

    Args:
        boxes1: ``[..., 4]`` boxes.
        boxes2: ``[..., 4]`` boxes, broadcastable with ``boxes1``.
        eps: Guard against zero heights and empty unions.

    Returns:
        ``[...]`` CIoU values in ``[-1.5, 1]``; identical boxes give ``1`` up to ``eps``.
    """
    left1, top1, right1, bottom1 = boxes1.unbind(-1)
    left2, top2, right2, bottom2 = boxes2.unbind(-1)
    width1, height1 = right1 - left1, bottom1 - top1 + eps
    width2, height2 = right2 - left2, bottom2 - top2 + eps

    intersection = (torch.minimum(right1, right2) - torch.maximum(left1, left2)).clamp(min=0) * (
        torch.minimum(bottom1, bottom2) - torch.maximum(top1, top2)
    ).clamp(min=0)
    union = width1 * height1 + width2 * height2 - intersection + eps
    iou = intersection / union

    enclosing_width = torch.maximum(right1, right2) - torch.minimum(left1, left2)
    enclosing_height = torch.maximum(bottom1, bottom2) - torch.minimum(top1, top2)
    diagonal_squared = enclosing_width.pow(2) + enclosing_height.pow(2) + eps
    centre_distance_squared = (
        (left2 + right2 - left1 - right1).pow(2) + (top2 + bottom2 - top1 - bottom1).pow(2)
    ) / 4
    aspect_term = (4 / math.pi**2) * (torch.atan(width2 / height2) - torch.atan(width1 / height1)).pow(2)
    with torch.no_grad():
        alpha = aspect_term / (aspect_term - iou + (1 + eps))
    return iou - (centre_distance_squared / diagonal_squared + aspect_term * alpha)


def _aligned_intersection_union(
    boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union (plus ``eps``) areas of corresponding ``xyxy`` boxes."""
    left1, top1, right1, bottom1 = boxes1.unbind(-1)
    left2, top2, right2, bottom2 = boxes2.unbind(-1)
    intersection = (torch.minimum(right1, right2) - torch.maximum(left1, left2)).clamp(min=0) * (
        torch.minimum(bottom1, bottom2) - torch.maximum(top1, top2)
    ).clamp(min=0)
    area1 = (right1 - left1) * (bottom1 - top1)
    area2 = (right2 - left2) * (bottom2 - top2)
    return intersection, area1 + area2 - intersection + eps


def aligned_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU between corresponding ``xyxy`` boxes.

    Broadcasting makes it pairwise too: ``aligned_box_iou(a[:, None], b[None])`` is ``[N, M]``.

    Args:
        boxes1: ``[..., 4]`` boxes.
        boxes2: ``[..., 4]`` boxes, broadcastable with ``boxes1``.
        eps: Added to the union against empty boxes.

    Returns:
        ``[...]`` IoU values in ``[0, 1]``.
    """
    intersection, union = _aligned_intersection_union(boxes1, boxes2, eps)
    return intersection / union


def aligned_box_giou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Generalized IoU between corresponding ``xyxy`` boxes (Rezatofighi et al., CVPR 2019).

    ``GIoU = IoU - (C - U) / C`` with ``U`` the union and ``C`` the area of the smallest
    box enclosing both. Broadcasting makes it pairwise too, as :func:`aligned_box_iou`.

    Args:
        boxes1: ``[..., 4]`` boxes.
        boxes2: ``[..., 4]`` boxes, broadcastable with ``boxes1``.
        eps: Added to the union and the enclosing area against empty boxes.

    Returns:
        ``[...]`` GIoU values in ``[-1, 1]``; identical boxes give ``1`` up to ``eps``.
    """
    intersection, union = _aligned_intersection_union(boxes1, boxes2, eps)
    enclosing_width = torch.maximum(boxes1[..., 2], boxes2[..., 2]) - torch.minimum(boxes1[..., 0], boxes2[..., 0])
    enclosing_height = torch.maximum(boxes1[..., 3], boxes2[..., 3]) - torch.minimum(boxes1[..., 1], boxes2[..., 1])
    enclosing_area = enclosing_width * enclosing_height + eps
    return intersection / union - (enclosing_area - union) / enclosing_area


def make_anchors(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    offset: float = 0.5,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-centre anchor points of several feature levels, concatenated level by level.

    Within a level, anchors run row-major (row by row, left to right), matching
    ``feature_map.flatten(2)``.

    Args:
        feature_sizes: ``(height, width)`` of each level.
        strides: Stride of each level in input pixels.
        offset: Position of the anchor inside its cell; ``0.5`` is the centre.
        device: Device of the returned tensors.
        dtype: Floating dtype of the returned tensors.

    Returns:
        ``anchor_points [A, 2]`` as ``(x, y)`` in grid units of their level, and
        ``stride_tensor [A, 1]`` holding each anchor's stride, where ``A = sum(h * w)``.
    """
    points, point_strides = [], []
    for (height, width), stride in zip(feature_sizes, strides, strict=True):
        xs = torch.arange(width, device=device, dtype=dtype) + offset
        ys = torch.arange(height, device=device, dtype=dtype) + offset
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 2))
        point_strides.append(torch.full((height * width, 1), float(stride), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(point_strides)


def distance_to_bbox(distances: torch.Tensor, anchor_points: torch.Tensor) -> torch.Tensor:
    """Turn (left, top, right, bottom) distances from anchor points into ``xyxy`` boxes.

    Args:
        distances: ``[..., 4]`` non-negative distances.
        anchor_points: ``[..., 2]`` anchor points, broadcastable with ``distances``.

    Returns:
        ``[..., 4]`` boxes in the unit of the inputs.
    """
    left_top, right_bottom = distances.chunk(2, dim=-1)
    return torch.cat((anchor_points - left_top, anchor_points + right_bottom), dim=-1)


def bbox_to_distance(
    anchor_points: torch.Tensor, boxes: torch.Tensor, max_distance: float | None = None
) -> torch.Tensor:
    """Turn ``xyxy`` boxes into (left, top, right, bottom) distances from anchor points.

    Args:
        anchor_points: ``[..., 2]`` anchor points.
        boxes: ``[..., 4]`` boxes, broadcastable with ``anchor_points``.
        max_distance: If given, distances are clamped to ``[0, max_distance]``.

    Returns:
        ``[..., 4]`` distances.
    """
    top_left, bottom_right = boxes.chunk(2, dim=-1)
    distances = torch.cat((anchor_points - top_left, bottom_right - anchor_points), dim=-1)
    if max_distance is not None:
        distances = distances.clamp(0, max_distance)
    return distances


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Non-maximum suppression applied independently within each group.

    Args:
        boxes: ``[N, 4]`` ``xyxy`` boxes.
        scores: ``[N]`` scores.
        groups: ``[N]`` integer group ids (e.g. ``image_index * num_classes + label``).
        iou_threshold: Boxes overlapping a higher-scoring box of the same group by more
            than this IoU are dropped.

    Returns:
        ``[K]`` int64 indices of the kept boxes, sorted by decreasing score.
    """
    return torchvision.ops.batched_nms(boxes.float(), scores.float(), groups, iou_threshold)
