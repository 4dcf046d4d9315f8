"""YOLOv8 detection loss: task-aligned assignment, BCE classification, CIoU and DFL box terms.

Terms and normalisation follow YOLOv8: every term is a sum over anchors divided by the sum of
the soft classification targets (at least 1), and multiplied by its gain (box 7.5, cls 0.5,
dfl 1.5). The values returned are per-image means, i.e. YOLOv8's loss before it multiplies by
the batch size. Distribution focal loss: Li et al., "Generalized Focal Loss", NeurIPS 2020,
arXiv:2006.04388. CIoU: Zheng et al., AAAI 2020, arXiv:1911.08287.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.models.heads.assigner import TaskAlignedAssigner
from vfmkd.ops.boxes import aligned_box_ciou, bbox_to_distance

__all__ = ["YOLOv8DetectionLoss", "distribution_focal_loss", "pad_targets"]

BOX_LOSS = "det/box"
CLS_LOSS = "det/cls"
DFL_LOSS = "det/dfl"


def pad_targets(
    targets: Mapping[str, torch.Tensor], batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scatter a flat list of boxes into per-image padded tensors.

    Args:
        targets: ``batch_idx [N]`` image index of each box, ``cls [N]`` (or ``[N, 1]``) class
            ids, ``boxes [N, 4]`` ``xyxy`` in input pixels.
        batch_size: Number of images B.
        device: Device of the outputs.

    Returns:
        ``labels [B, M]`` int64, ``boxes [B, M, 4]`` float32 and ``mask [B, M]`` bool, where M
        is the largest box count of an image (0 when there are no boxes).
    """
    for key in ("batch_idx", "cls", "boxes"):
        if key not in targets:
            raise KeyError(f"detection targets need '{key}'; got keys {sorted(targets)}")
    image_index = targets["batch_idx"].to(device=device, dtype=torch.long).reshape(-1)
    classes = targets["cls"].to(device=device, dtype=torch.long).reshape(-1)
    boxes = targets["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
    if not (image_index.numel() == classes.numel() == boxes.shape[0]):
        raise ValueError(
            f"detection targets disagree in length: batch_idx {image_index.numel()}, cls {classes.numel()}, "
            f"boxes {boxes.shape[0]}"
        )
    counts = torch.bincount(image_index, minlength=batch_size)
    if counts.numel() > batch_size:
        raise ValueError(f"targets batch_idx reaches {int(image_index.max())} but the batch has {batch_size} images")
    max_boxes = int(counts.max()) if image_index.numel() else 0

    order = torch.argsort(image_index, stable=True)
    image_index, classes, boxes = image_index[order], classes[order], boxes[order]
    first_of_image = torch.cumsum(counts, dim=0) - counts
    slot = torch.arange(image_index.numel(), device=device) - first_of_image[image_index]

    padded_labels = torch.zeros((batch_size, max_boxes), dtype=torch.long, device=device)
    padded_boxes = torch.zeros((batch_size, max_boxes, 4), dtype=torch.float32, device=device)
    mask = torch.zeros((batch_size, max_boxes), dtype=torch.bool, device=device)
    padded_labels[image_index, slot] = classes
    padded_boxes[image_index, slot] = boxes
    mask[image_index, slot] = True
    return padded_labels, padded_boxes, mask


def distribution_focal_loss(pred_distributions: torch.Tensor, target_distances: torch.Tensor) -> torch.Tensor:
    """Cross-entropy towards the two integer bins around a continuous target.

    Args:
        pred_distributions: ``[P, 4, R]`` logits over ``R`` distance bins per box side.
        target_distances: ``[P, 4]`` target distances in ``[0, R - 1)``.

    Returns:
        ``[P]`` loss per box, averaged over its four sides.
    """
    left = target_distances.long()
    right = left + 1
    weight_left = right.to(target_distances.dtype) - target_distances
    weight_right = 1 - weight_left
    log_probs = F.log_softmax(pred_distributions, dim=-1)
    loss = -(
        log_probs.gather(-1, left[..., None]).squeeze(-1) * weight_left
        + log_probs.gather(-1, right[..., None]).squeeze(-1) * weight_right
    )
    return loss.mean(dim=-1)


class YOLOv8DetectionLoss(nn.Module):
    """Loss of an anchor-free DFL detection head with task-aligned assignment.

    Args:
        num_classes: Number of classes.
        reg_max: Distance bins per box side.
        box_gain: Weight of the CIoU term.
        cls_gain: Weight of the classification term.
        dfl_gain: Weight of the distribution focal term.
        topk: Positives per ground-truth box in the assigner.
        alpha: Score exponent of the alignment metric.
        beta: IoU exponent of the alignment metric.

    Example (experiment YAML, keys passed through the head config)::

        heads:
          detection: {type: yolo_head, num_classes: 80, box_gain: 7.5, cls_gain: 0.5, dfl_gain: 1.5}
    """

    def __init__(
        self,
        num_classes: int,
        reg_max: int = 16,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.box_gain = box_gain
        self.cls_gain = cls_gain
        self.dfl_gain = dfl_gain
        self.assigner = TaskAlignedAssigner(num_classes, topk=topk, alpha=alpha, beta=beta)

    def extra_repr(self) -> str:
        return f"box_gain={self.box_gain}, cls_gain={self.cls_gain}, dfl_gain={self.dfl_gain}"

    def forward(
        self,
        pred_distributions: torch.Tensor,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        anchor_points: torch.Tensor,
        stride_tensor: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        *,
        labelled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the three loss terms.

        Args:
            pred_distributions: ``[B, A, 4 * reg_max]`` box-side distance logits.
            pred_logits: ``[B, A, C]`` class logits.
            pred_boxes: ``[B, A, 4]`` decoded ``xyxy`` boxes in grid units of each anchor's level.
            anchor_points: ``[A, 2]`` anchor centres in grid units.
            stride_tensor: ``[A, 1]`` stride of each anchor.
            targets: ``batch_idx [N]``, ``cls [N]``, ``boxes [N, 4]`` ``xyxy`` in input pixels.
            labelled: ``[B]`` float, 0 for images without labels: their anchors are left
                out of the classification term (they have no boxes, so no box or DFL
                term). None: every image is labelled.

        Returns:
            ``det/box``, ``det/cls``, ``det/dfl``: scalar tensors, gains applied, per-image means.
        """
        batch_size = pred_logits.shape[0]
        gt_labels, gt_boxes, gt_mask = pad_targets(targets, batch_size, pred_logits.device)
        assignment = self.assigner(
            pred_logits.detach().sigmoid(),
            (pred_boxes.detach() * stride_tensor).to(gt_boxes.dtype),
            anchor_points * stride_tensor,
            gt_labels,
            gt_boxes,
            gt_mask,
        )
        target_scores = assignment.scores.to(pred_logits.dtype)
        target_scores_sum = target_scores.sum().clamp(min=1)

        cls_loss = F.binary_cross_entropy_with_logits(pred_logits, target_scores, reduction="none")
        if labelled is not None:
            cls_loss = cls_loss * labelled.to(cls_loss.dtype)[:, None, None]
        cls_loss = cls_loss.sum() / target_scores_sum

        foreground = assignment.foreground
        weight = target_scores.sum(dim=-1)[foreground]  # [P]
        target_boxes = (assignment.boxes / stride_tensor)[foreground]  # [P, 4] grid units
        iou = aligned_box_ciou(pred_boxes[foreground], target_boxes)
        box_loss = ((1.0 - iou) * weight).sum() / target_scores_sum

        positive_anchors = anchor_points.expand(batch_size, -1, -1)[foreground]  # [P, 2]
        target_distances = bbox_to_distance(positive_anchors, target_boxes).clamp(0, self.reg_max - 1 - 0.01)
        positive_distributions = pred_distributions[foreground].reshape(-1, 4, self.reg_max)
        dfl_loss = (distribution_focal_loss(positive_distributions, target_distances) * weight).sum()
        dfl_loss = dfl_loss / target_scores_sum

        return {
            BOX_LOSS: box_loss * self.box_gain,
            CLS_LOSS: cls_loss * self.cls_gain,
            DFL_LOSS: dfl_loss * self.dfl_gain,
        }
