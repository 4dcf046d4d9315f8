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

__all__ = [
    "aligned_box_ciou",
    "batched_nms",
    "bbox_to_distance",
    "box_iou",
    "distance_to_bbox",
    "make_anchors",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]
