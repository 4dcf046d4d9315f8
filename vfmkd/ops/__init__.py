"""Tensor operations shared across models, losses and evaluation."""

from vfmkd.ops.boxes import (
    aligned_box_ciou,
    batched_nms,
    bbox_to_distance,
    box_iou,
    distance_to_bbox,
    make_anchors,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from vfmkd.ops.masks import centre_point, mask_iou, masks_to_original, refinement_point, refinement_points

__all__ = [
    "aligned_box_ciou",
    "batched_nms",
    "bbox_to_distance",
    "box_iou",
    "centre_point",
    "distance_to_bbox",
    "make_anchors",
    "mask_iou",
    "masks_to_original",
    "refinement_point",
    "refinement_points",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]
