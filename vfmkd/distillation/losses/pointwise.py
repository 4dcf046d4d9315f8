"""Per-cell feature losses: ``mse``, ``smooth_l1``, ``cosine`` and their mix ``cos_l1``.

Each compares the student and teacher vector at every valid cell and averages over the
valid cells (and, for the elementwise ones, the channels). Mean-squared feature matching
is FitNets' hint loss (Romero et al., ICLR 2015, arXiv:1412.6550). The cosine distance
matches only each cell's feature direction; ``cos_l1`` adds a small smooth L1 term that
also pins magnitudes.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from vfmkd.distillation.losses.base import FeatureLoss, valid_cell_count
from vfmkd.registry import LOSSES

__all__ = ["CosineFeatureLoss", "CosineSmoothL1FeatureLoss", "MSEFeatureLoss", "SmoothL1FeatureLoss"]


def masked_smooth_l1(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, beta: float) -> torch.Tensor:
    """Smooth L1 averaged over valid cells and channels.

    Args:
        student: ``[B, C, H, W]`` float32.
        teacher: ``[B, C, H, W]`` float32.
        valid: ``[B, 1, H, W]`` bool.
        beta: Where the loss turns from quadratic to linear; 0 gives plain L1.

    Returns:
        A scalar.
    """
    per_cell = F.smooth_l1_loss(student, teacher, reduction="none", beta=beta).sum(dim=1, keepdim=True)
    return torch.where(valid, per_cell, 0.0).sum() / (valid_cell_count(valid) * student.shape[1])


def masked_cosine_distance(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, eps: float
) -> torch.Tensor:
    """``1 - cos(student, teacher)`` along channels, averaged over valid cells.

    Args:
        student: ``[B, C, H, W]`` float32.
        teacher: ``[B, C, H, W]`` float32.
        valid: ``[B, 1, H, W]`` bool.
        eps: Lower bound of each vector's norm (a zero vector has cosine 0 to anything).

    Returns:
        A scalar.
    """
    cosine = (F.normalize(student, dim=1, eps=eps) * F.normalize(teacher, dim=1, eps=eps)).sum(dim=1, keepdim=True)
    return torch.where(valid, 1.0 - cosine, 0.0).sum() / valid_cell_count(valid)


@LOSSES.register("mse")
class MSEFeatureLoss(FeatureLoss):
    """Mean squared error over valid cells and channels: ``mean((s - t)^2)``.

    Example:
        ```yaml
        distillation:
          losses:
            sam2_embed_p4:
              type: mse
              teacher: sam2
              feature: embed
              student: p4
              adapter: conv1x1
              weight: 1.0
        ```

    Args:
        student_channels: Ignored.
        teacher_channels: Ignored.
    """

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor,
        targets: Mapping[str, Any] | None,
    ) -> torch.Tensor:
        """See :meth:`FeatureLoss.compute`."""
        squared = (student - teacher).square().sum(dim=1, keepdim=True)
        return torch.where(valid, squared, 0.0).sum() / (valid_cell_count(valid) * student.shape[1])


@LOSSES.register("smooth_l1")
class SmoothL1FeatureLoss(FeatureLoss):
    """Smooth L1 (Huber with slope 1) over valid cells and channels.

    Per element: ``0.5 * d^2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 * beta``.

    Example:
        ```yaml
        distillation:
          losses:
            dinov2_patch_p5:
              type: smooth_l1
              teacher: dinov2
              feature: patch
              student: p5
              weight: 1.0
              params: {beta: 1.0}
        ```

    Args:
        beta: Transition point between the quadratic and the linear part; 0 is plain L1.
        student_channels: Ignored.
        teacher_channels: Ignored.
    """

    def __init__(
        self,
        *,
        beta: float = 1.0,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
    ) -> None:
        super().__init__(student_channels=student_channels, teacher_channels=teacher_channels)
        if beta < 0:
            raise ValueError(f"smooth_l1 beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor,
        targets: Mapping[str, Any] | None,
    ) -> torch.Tensor:
        """See :meth:`FeatureLoss.compute`."""
        return masked_smooth_l1(student, teacher, valid, self.beta)


@LOSSES.register("cosine")
class CosineFeatureLoss(FeatureLoss):
    """Cosine distance ``1 - cos(s, t)`` along channels, averaged over valid cells.

    Scale-free: matches the direction of each cell's feature vector, not its magnitude.

    Example:
        ```yaml
        distillation:
          losses:
            sam_embed_p4:
              type: cosine
              teacher: sam
              feature: embed
              student: p4
              weight: 1.0
              params: {eps: 1.0e-8}
        ```

    Args:
        eps: Lower bound of each vector's norm.
        student_channels: Ignored.
        teacher_channels: Ignored.
    """

    def __init__(
        self,
        *,
        eps: float = 1e-8,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
    ) -> None:
        super().__init__(student_channels=student_channels, teacher_channels=teacher_channels)
        self.eps = float(eps)

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor,
        targets: Mapping[str, Any] | None,
    ) -> torch.Tensor:
        """See :meth:`FeatureLoss.compute`."""
        return masked_cosine_distance(student, teacher, valid, self.eps)


@LOSSES.register("cos_l1")
class CosineSmoothL1FeatureLoss(FeatureLoss):
    """``cosine_weight * cosine + smooth_l1_weight * smooth_l1`` (defaults 0.9 and 0.1).

    The cosine term matches feature directions; the small smooth L1 term also pins the
    magnitudes, which the cosine term alone leaves free.

    Example:
        ```yaml
        distillation:
          losses:
            sam2_embed_p4:
              type: cos_l1
              teacher: sam2
              feature: embed
              student: p4
              weight: 1.0
              params: {cosine_weight: 0.9, smooth_l1_weight: 0.1, beta: 1.0}
        ```

    Args:
        cosine_weight: Weight of the cosine distance.
        smooth_l1_weight: Weight of the smooth L1 term.
        beta: Smooth L1 transition point.
        eps: Lower bound of each vector's norm in the cosine term.
        student_channels: Ignored.
        teacher_channels: Ignored.
    """

    def __init__(
        self,
        *,
        cosine_weight: float = 0.9,
        smooth_l1_weight: float = 0.1,
        beta: float = 1.0,
        eps: float = 1e-8,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
    ) -> None:
        super().__init__(student_channels=student_channels, teacher_channels=teacher_channels)
        if beta < 0:
            raise ValueError(f"cos_l1 beta must be >= 0, got {beta}")
        self.cosine_weight = float(cosine_weight)
        self.smooth_l1_weight = float(smooth_l1_weight)
        self.beta = float(beta)
        self.eps = float(eps)

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor,
        targets: Mapping[str, Any] | None,
    ) -> torch.Tensor:
        """See :meth:`FeatureLoss.compute`."""
        cosine = masked_cosine_distance(student, teacher, valid, self.eps)
        smooth_l1 = masked_smooth_l1(student, teacher, valid, self.beta)
        return self.cosine_weight * cosine + self.smooth_l1_weight * smooth_l1
