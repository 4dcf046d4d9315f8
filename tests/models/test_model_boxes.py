"""Tests of vfmkd.ops.boxes."""

from __future__ import annotations

import torch

from vfmkd.ops import (
    aligned_box_ciou,
    batched_nms,
    bbox_to_distance,
    box_iou,
    distance_to_bbox,
    make_anchors,
    xywh_to_xyxy,
    xyxy_to_xywh,
)


def test_ciou_of_identical_boxes_is_one() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [3.5, 1.0, 7.0, 2.0], [100.0, 50.0, 300.0, 60.0]])
    torch.testing.assert_close(aligned_box_ciou(boxes, boxes), torch.ones(3), atol=1e-5, rtol=0)


def test_ciou_penalises_distance_and_aspect() -> None:
    box = torch.tensor([0.0, 0.0, 10.0, 10.0])
    shifted = torch.tensor([5.0, 0.0, 15.0, 10.0])
    iou = 50 / 150
    # Same aspect ratio: CIoU = IoU - centre distance^2 / enclosing diagonal^2.
    torch.testing.assert_close(aligned_box_ciou(box, shifted), torch.tensor(iou - 25 / (15**2 + 10**2)))
    disjoint = torch.tensor([20.0, 20.0, 25.0, 40.0])
    assert aligned_box_ciou(box, disjoint) < 0


def test_make_anchors_row_major_cell_centres() -> None:
    points, strides = make_anchors([(2, 3), (1, 1)], [8, 16])
    expected = torch.tensor([[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [0.5, 0.5]])
    torch.testing.assert_close(points, expected)
    torch.testing.assert_close(strides.squeeze(1), torch.tensor([8.0] * 6 + [16.0]))


def test_distance_box_round_trip_and_formats() -> None:
    anchors = torch.tensor([[4.5, 4.5], [1.5, 2.5]])
    distances = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    boxes = distance_to_bbox(distances, anchors)
    torch.testing.assert_close(boxes[0], torch.tensor([3.5, 2.5, 7.5, 8.5]))
    torch.testing.assert_close(bbox_to_distance(anchors, boxes), distances)
    assert bbox_to_distance(anchors, boxes, max_distance=1.0).max() == 1.0
    torch.testing.assert_close(xywh_to_xyxy(xyxy_to_xywh(boxes)), boxes)


def test_batched_nms_is_per_group() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [1.0, 0.0, 11.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep = batched_nms(boxes, scores, torch.tensor([0, 0, 1]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    assert box_iou(boxes[:1], boxes[1:2]).item() > 0.5
