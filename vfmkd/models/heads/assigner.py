"""Task-aligned label assignment (TOOD, Feng et al., ICCV 2021, arXiv:2108.07755).

For every ground-truth box, the candidate anchors are those whose centre lies inside the
box. Each candidate gets the alignment metric ``t = s^alpha * u^beta``, where ``s`` is the
predicted probability of the box's class and ``u`` the CIoU between the predicted and the
ground-truth box. The ``topk`` candidates with the largest metric become positives. An anchor
that ends up positive for several boxes keeps the box it overlaps most. Classification
targets are soft: the one-hot label scaled by ``t / max(t) * max(u)`` over the box's
positives, as in YOLOv8.

Everything is batched over images with ground truth padded to the same count; there are no
Python loops over images, boxes or anchors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from vfmkd.ops.boxes import aligned_box_ciou

__all__ = ["Assignment", "TaskAlignedAssigner"]


class Assignment(NamedTuple):
    """Result of assigning ground truth to anchors.

    Attributes:
        labels: ``[B, A]`` int64 class of the assigned box (meaningless where not foreground).
        boxes: ``[B, A, 4]`` ``xyxy`` assigned boxes in the unit of the ground truth.
        scores: ``[B, A, num_classes]`` soft classification targets (zero for background).
        foreground: ``[B, A]`` bool, anchors with an assigned box.
        gt_index: ``[B, A]`` int64 index of the assigned box in the padded ground truth.
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    foreground: torch.Tensor
    gt_index: torch.Tensor


class TaskAlignedAssigner(nn.Module):
    """Assign padded ground-truth boxes to anchors by the task-aligned metric.

    Args:
        num_classes: Number of classes.
        topk: Positives kept per ground-truth box.
        alpha: Exponent of the classification score in the metric.
        beta: Exponent of the IoU in the metric.
        eps: Margin for "centre inside box" and guard for the normalisation.
    """

    def __init__(
        self, num_classes: int, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.eps = eps

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, topk={self.topk}, alpha={self.alpha}, beta={self.beta}"

    @torch.no_grad()
    def forward(
        self,
        pred_scores: torch.Tensor,
        pred_boxes: torch.Tensor,
        anchor_points: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_mask: torch.Tensor,
    ) -> Assignment:
        """Assign ground truth to anchors.

        Args:
            pred_scores: ``[B, A, C]`` predicted class probabilities (after sigmoid).
            pred_boxes: ``[B, A, 4]`` predicted ``xyxy`` boxes, same unit as ``gt_boxes``.
            anchor_points: ``[A, 2]`` anchor centres ``(x, y)``, same unit as ``gt_boxes``.
            gt_labels: ``[B, M]`` int64 classes of the padded ground truth.
            gt_boxes: ``[B, M, 4]`` ``xyxy`` padded ground-truth boxes.
            gt_mask: ``[B, M]`` bool, true for real (non-padding) boxes.

        Returns:
            The :class:`Assignment`.
        """
        batch_size, num_anchors, _ = pred_scores.shape
        max_boxes = gt_boxes.shape[1]
        device = pred_scores.device
        if max_boxes == 0:
            return Assignment(
                labels=torch.full((batch_size, num_anchors), self.num_classes, dtype=torch.long, device=device),
                boxes=torch.zeros_like(pred_boxes),
                scores=torch.zeros_like(pred_scores),
                foreground=torch.zeros((batch_size, num_anchors), dtype=torch.bool, device=device),
                gt_index=torch.zeros((batch_size, num_anchors), dtype=torch.long, device=device),
            )

        candidates = self._centres_inside(anchor_points, gt_boxes) & gt_mask.bool()[..., None]  # [B, M, A]
        alignment, overlaps = self._alignment_metric(pred_scores, pred_boxes, gt_labels, gt_boxes, candidates)

        top_indices = alignment.topk(min(self.topk, num_anchors), dim=-1).indices  # [B, M, k]
        in_top = torch.zeros_like(candidates).scatter_(-1, top_indices, True)
        # NOTE: the top-k may include candidates whose metric is 0 (box holds fewer useful
        # anchors than topk); they stay positive as long as their centre is inside the box.
        positive = in_top & candidates

        positive = self._keep_highest_overlap(positive, overlaps)
        foreground = positive.any(dim=1)  # [B, A]
        gt_index = positive.to(torch.uint8).argmax(dim=1)  # [B, A]

        labels = gt_labels.long().gather(1, gt_index)  # [B, A]
        boxes = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))  # [B, A, 4]

        alignment = alignment * positive
        best_alignment = alignment.amax(dim=-1, keepdim=True)  # [B, M, 1]
        best_overlap = (overlaps * positive).amax(dim=-1, keepdim=True)  # [B, M, 1]
        normalised = (alignment * best_overlap / (best_alignment + self.eps)).amax(dim=1)  # [B, A]
        scores = torch.zeros_like(pred_scores).scatter_(-1, labels[..., None], 1.0)
        scores = scores * (normalised * foreground)[..., None]
        return Assignment(labels=labels, boxes=boxes, scores=scores, foreground=foreground, gt_index=gt_index)

    def _centres_inside(self, anchor_points: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """``[B, M, A]`` bool: anchor centre strictly inside the box (by more than ``eps``)."""
        # NOTE: four [B, M, A] comparisons instead of one [B, M, A, 4] distance tensor: with
        # many boxes and 8400 anchors per image this keeps the peak memory small.
        x, y = anchor_points[:, 0], anchor_points[:, 1]  # [A]
        left, top, right, bottom = (gt_boxes[..., i, None] for i in range(4))  # [B, M, 1] each
        inside = (x - left) > self.eps
        inside &= (y - top) > self.eps
        inside &= (right - x) > self.eps
        inside &= (bottom - y) > self.eps
        return inside

    def _alignment_metric(
        self,
        pred_scores: torch.Tensor,
        pred_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        candidates: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Metric ``s^alpha * u^beta`` and CIoU ``u``, both ``[B, M, A]``, zero off candidates."""
        batch_index, box_index, anchor_index = candidates.nonzero(as_tuple=True)
        class_scores = pred_scores[batch_index, anchor_index, gt_labels[batch_index, box_index].long()]
        ious = aligned_box_ciou(gt_boxes[batch_index, box_index], pred_boxes[batch_index, anchor_index]).clamp(min=0)

        overlaps = torch.zeros(candidates.shape, dtype=pred_boxes.dtype, device=pred_boxes.device)
        alignment = torch.zeros(candidates.shape, dtype=pred_scores.dtype, device=pred_scores.device)
        overlaps[batch_index, box_index, anchor_index] = ious.to(overlaps.dtype)
        alignment[batch_index, box_index, anchor_index] = (
            class_scores.pow(self.alpha) * ious.pow(self.beta)
        ).to(alignment.dtype)
        return alignment, overlaps

    @staticmethod
    def _keep_highest_overlap(positive: torch.Tensor, overlaps: torch.Tensor) -> torch.Tensor:
        """Anchors positive for several boxes keep only the box of largest overlap.

        Args:
            positive: ``[B, M, A]`` bool.
            overlaps: ``[B, M, A]`` CIoU of candidates, zero elsewhere.

        Returns:
            ``[B, M, A]`` bool with at most one true value per anchor.
        """
        # NOTE: like YOLOv8, the arg-max runs over all boxes containing the anchor, not only
        # those where it made the top-k; keeping this preserves parity with YOLOv8 training.
        several = positive.sum(dim=1, keepdim=True) > 1  # [B, 1, A]
        best = torch.zeros_like(positive).scatter_(1, overlaps.argmax(dim=1, keepdim=True), True)  # [B, M, A]
        return torch.where(several, best, positive)
