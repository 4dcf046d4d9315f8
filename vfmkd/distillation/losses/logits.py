"""Losses on logit maps: ``bce``, the teacher's sigmoid scores as soft targets.

A detector's class-logit maps (``detection.cls_p3`` ... of a YOLO head) say, at every
cell, how likely each class is there: on an unlabelled image they are what labels would
have said, spread over every cell (dense soft targets, as Dense Teacher distils them for
semi-supervised detection: Zhou et al., "Dense Teacher: Dense Pseudo-Labels for
Semi-supervised Object Detection", ECCV 2022). Unlike a neck's channels, class scores keep
their meaning under a flip or a rescale of the image, so maps warped from the store stay
consistent with what the student sees.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from vfmkd.distillation.losses.base import FeatureLoss
from vfmkd.registry import LOSSES

__all__ = ["SoftBinaryCrossEntropyLoss"]


@LOSSES.register("bce")
class SoftBinaryCrossEntropyLoss(FeatureLoss):
    """Binary cross-entropy of the student's logits against the teacher's sigmoid scores.

    ``sum BCE(s, sigmoid(t)) - BCE(t, sigmoid(t))`` (the binary KL divergence: 0 when the
    scores match) over the valid cells and channels, divided by the sum of
    the teacher's scores over those cells (at least 1): the normalisation of YOLOv8's own
    classification term (by the sum of its target scores), so a weight near the head's
    ``cls_gain`` (0.5) puts the term on the detection loss's scale at any image size.
    The teacher's maps must be its raw logits (``normalize: false``) and the student's
    its own logits of the same classes (``adapter: none``).

    Example:
        ```yaml
        distillation:
          losses:
            yolov8s_cls_p3:
              type: bce
              teacher: yolov8s
              feature: detection.cls_p3
              student: detection.cls_p3
              adapter: none
              weight: 0.5
        ```

    Args:
        student_channels: Ignored.
        teacher_channels: Ignored.
    """

    needs_raw_teacher = True

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor,
        targets: Mapping[str, Any] | None,
    ) -> torch.Tensor:
        """See :meth:`FeatureLoss.compute`."""
        scores = teacher.sigmoid()
        # NOTE: minus the teacher's own entropy (same gradient), so a perfect match gives 0.
        per_cell = F.binary_cross_entropy_with_logits(student, scores, reduction="none") - (
            F.binary_cross_entropy_with_logits(teacher, scores, reduction="none")
        )
        total = torch.where(valid, per_cell, 0.0).sum()
        return total / torch.where(valid, scores, 0.0).sum().clamp(min=1.0)
