"""Losses between softmax distributions of features: ``kl`` (over channels, per cell) and
``cwd`` (over space, per channel).

``kl`` is the classic soft-target KD of Hinton et al. ("Distilling the Knowledge in a
Neural Network", 2015, arXiv:1503.02531) applied at every cell to the channel vector.
``cwd`` is channel-wise distillation: Shu et al., "Channel-wise Knowledge Distillation
for Dense Prediction", ICCV 2021, arXiv:2011.13256; each channel becomes a distribution
over spatial positions. Both multiply by ``tau^2`` so gradient magnitudes do not shrink
as the temperature grows (Hinton et al.).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from vfmkd.distillation.losses.base import FeatureLoss, samples_with_content, valid_cell_count
from vfmkd.registry import LOSSES

__all__ = ["ChannelKLLoss", "ChannelWiseDistillationLoss"]

# A softmax logit that float32 exp() turns into exactly 0 after any real logit is subtracted.
_EXCLUDED = -1e30


def _check_tau(name: str, tau: float) -> float:
    if tau <= 0:
        raise ValueError(f"{name} tau (temperature) must be > 0, got {tau}")
    return float(tau)


@LOSSES.register("kl")
class ChannelKLLoss(FeatureLoss):
    """Per-cell ``KL(softmax(t / tau) || softmax(s / tau)) * tau^2`` over channels.

    Averaged over valid cells. Suited to maps whose channels act like logits (e.g. a
    teacher's class or cluster scores); for raw embeddings prefer ``cwd`` or ``mse``.

    Example:
        ```yaml
        distillation:
          losses:
            dinov2_patch_p4:
              type: kl
              teacher: dinov2
              feature: patch
              student: p4
              weight: 1.0
              params: {tau: 1.0}
        ```

    Args:
        tau: Softmax temperature.
        student_channels: Ignored.
        teacher_channels: Ignored.
    """

    def __init__(
        self,
        *,
        tau: float = 1.0,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
    ) -> None:
        super().__init__(student_channels=student_channels, teacher_channels=teacher_channels)
        self.tau = _check_tau("kl", tau)

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor,
        targets: Mapping[str, Any] | None,
    ) -> torch.Tensor:
        """See :meth:`FeatureLoss.compute`."""
        log_student = torch.log_softmax(student / self.tau, dim=1)
        log_teacher = torch.log_softmax(teacher / self.tau, dim=1)
        per_cell = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1, keepdim=True)
        return torch.where(valid, per_cell, 0.0).sum() * self.tau**2 / valid_cell_count(valid)


@LOSSES.register("cwd")
class ChannelWiseDistillationLoss(FeatureLoss):
    """Channel-wise distillation (CWD), Shu et al., ICCV 2021.

    Each channel of each sample is turned into a distribution over the valid cells,
    ``softmax(x[b, c] / tau)`` (invalid cells are left out of the softmax, not zeroed),
    and the loss is ``tau^2 * KL(teacher || student)`` summed over cells and averaged
    over the ``C`` channels of each sample with image content (B of them unless some
    sample is all padding).

    Default ``tau = 1.0``, as in the authors' released detection configs (COCO FPN levels
    of RetinaNet / Faster R-CNN, loss weight 5) and in mmrazor's CWD configs for detection
    (loss weight 10) and segmentation logits (loss weight 3 to 5). A larger ``tau`` (e.g.
    4) flattens the spatial distributions, spreading the loss over more cells.

    Example:
        ```yaml
        distillation:
          losses:
            sam2_embed_p4:
              type: cwd
              teacher: sam2
              feature: embed
              student: p4
              weight: 5.0
              params: {tau: 1.0}
        ```

    Args:
        tau: Softmax temperature.
        student_channels: Ignored.
        teacher_channels: Ignored.
    """

    needs_spatial_map = True

    def __init__(
        self,
        *,
        tau: float = 1.0,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
    ) -> None:
        super().__init__(student_channels=student_channels, teacher_channels=teacher_channels)
        self.tau = _check_tau("cwd", tau)

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor,
        targets: Mapping[str, Any] | None,
    ) -> torch.Tensor:
        """See :meth:`FeatureLoss.compute`."""
        channels = student.shape[1]
        # NOTE: invalid cells leave the softmax through a large negative bias rather than
        # -inf masking (one add per map instead of several masked fills): their
        # probabilities are exactly 0 in float32, so they add nothing to the value or the
        # gradient. An all-padding sample has two equal (zero) maps, hence equal uniform
        # distributions and a divergence of exactly 0.
        bias = torch.zeros(valid.shape, dtype=student.dtype, device=student.device).masked_fill_(~valid, _EXCLUDED)
        bias = bias.flatten(2)  # [B, 1, H*W], broadcast over channels
        log_student = torch.log_softmax(student.flatten(2) / self.tau + bias, dim=-1)
        log_teacher = torch.log_softmax(teacher.flatten(2) / self.tau + bias, dim=-1)
        divergence = F.kl_div(log_student, log_teacher, reduction="sum", log_target=True)
        return divergence * self.tau**2 / (samples_with_content(valid) * channels)
