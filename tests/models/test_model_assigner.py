"""Hand-built cases for the task-aligned assigner."""

from __future__ import annotations

import math

import torch

from vfmkd.models.heads import TaskAlignedAssigner
from vfmkd.ops import aligned_box_ciou, make_anchors


def _grid(size: int = 4) -> torch.Tensor:
    points, _ = make_anchors([(size, size)], [1])
    return points  # [size * size, 2], stride 1


def test_topk_inside_box_with_normalised_scores() -> None:
    anchors = _grid()  # 16 anchors
    gt_box = torch.tensor([0.0, 0.0, 2.0, 2.0])
    # Inside the box: anchors 0, 1, 4, 5. Predicted boxes equal the gt box, so CIoU = 1 and the
    # metric is sqrt(score).
    scores = torch.zeros(1, 16, 3)
    scores[0, [0, 1, 4, 5], 1] = torch.tensor([0.9, 0.4, 0.1, 0.6])
    scores[0, 10, 1] = 0.99  # outside the box: never a candidate
    pred_boxes = gt_box.expand(1, 16, 4).clone()
    # Second gt is padding with a box covering everything: must be ignored.
    gt_boxes = torch.stack((gt_box, torch.tensor([0.0, 0.0, 4.0, 4.0])))[None]
    assigner = TaskAlignedAssigner(num_classes=3, topk=2)
    result = assigner(
        scores, pred_boxes, anchors, torch.tensor([[1, 2]]), gt_boxes, torch.tensor([[True, False]])
    )
    assert result.foreground[0].nonzero().flatten().tolist() == [0, 5]
    assert result.labels[0, [0, 5]].tolist() == [1, 1]
    torch.testing.assert_close(result.boxes[0, [0, 5]], gt_box.expand(2, 4))
    expected = torch.zeros(16, 3)
    expected[0, 1] = 1.0
    expected[5, 1] = math.sqrt(0.6) / math.sqrt(0.9)
    torch.testing.assert_close(result.scores[0], expected, atol=1e-6, rtol=1e-6)


def test_normalisation_scales_by_best_iou() -> None:
    anchors = _grid()
    gt_boxes = torch.tensor([[[0.0, 0.0, 2.0, 2.0]]])
    scores = torch.full((1, 16, 1), 0.5)
    pred_boxes = torch.tensor([0.0, 0.0, 2.0, 1.0]).expand(1, 16, 4).clone()  # IoU 0.5 with the gt
    assigner = TaskAlignedAssigner(num_classes=1, topk=10)
    result = assigner(
        scores, pred_boxes, anchors, torch.tensor([[0]]), gt_boxes, torch.tensor([[True]])
    )
    assert result.foreground[0].sum() == 4
    # Equal metrics everywhere: every positive gets the best CIoU of the box as its target.
    expected = aligned_box_ciou(pred_boxes[0, 0], gt_boxes[0, 0])
    torch.testing.assert_close(result.scores[0, result.foreground[0], 0], expected.expand(4))


def test_anchor_in_two_boxes_goes_to_higher_overlap() -> None:
    anchors = _grid()
    box_a = torch.tensor([0.0, 0.0, 3.0, 3.0])
    box_b = torch.tensor([1.0, 1.0, 4.0, 4.0])
    scores = torch.full((1, 16, 2), 0.5)
    pred_boxes = box_a.expand(1, 16, 4).clone()
    pred_boxes[0, 5] = box_b  # anchor 5 at (1.5, 1.5) lies in both boxes and predicts box b
    assigner = TaskAlignedAssigner(num_classes=2, topk=16)
    result = assigner(
        scores,
        pred_boxes,
        anchors,
        torch.tensor([[0, 1]]),
        torch.stack((box_a, box_b))[None],
        torch.ones(1, 2, dtype=torch.bool),
    )
    assert result.gt_index[0, 5].item() == 1
    assert result.labels[0, 5].item() == 1
    # Anchor 10 at (2.5, 2.5) is also in both boxes but predicts box a.
    assert result.gt_index[0, 10].item() == 0
    assert (result.scores[0].sum(-1) > 0).sum() == result.foreground[0].sum()


def test_images_without_boxes_and_empty_batch() -> None:
    anchors = _grid()
    scores = torch.full((2, 16, 2), 0.5)
    pred_boxes = torch.tensor([0.0, 0.0, 2.0, 2.0]).expand(2, 16, 4).clone()
    gt_boxes = torch.tensor([[[0.0, 0.0, 2.0, 2.0]], [[0.0, 0.0, 0.0, 0.0]]])
    assigner = TaskAlignedAssigner(num_classes=2)
    labels = torch.zeros(2, 1, dtype=torch.long)
    result = assigner(scores, pred_boxes, anchors, labels, gt_boxes, torch.tensor([[True], [False]]))
    assert result.foreground[0].sum() == 4 and not result.foreground[1].any()
    assert result.scores[1].abs().sum() == 0

    no_labels, no_boxes = torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 4)
    empty = assigner(scores, pred_boxes, anchors, no_labels, no_boxes, torch.zeros(2, 0, dtype=torch.bool))
    assert not empty.foreground.any() and empty.scores.shape == (2, 16, 2)
