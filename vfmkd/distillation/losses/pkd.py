"""PKD: distillation through the Pearson correlation of features.

Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson
Correlation Coefficient", NeurIPS 2022, arXiv:2207.02039. Standardising both maps to zero
mean and unit variance and then taking half the mean squared error equals ``1 - r`` with
``r`` the Pearson correlation, so the student matches the teacher's relational pattern
while magnitude and offset differences between the two networks drop out.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from vfmkd.distillation.losses.base import FeatureLoss, valid_cell_count
from vfmkd.registry import LOSSES

__all__ = ["PearsonFeatureLoss", "standardise_per_sample"]


def standardise_per_sample(features: torch.Tensor, valid: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero mean, unit standard deviation per sample and channel, over valid cells only.

    Args:
        features: ``[B, C, H, W]`` float32, zero at invalid cells.
        valid: ``[B, 1, H, W]`` bool.
        eps: Added to the standard deviation (a constant channel maps to zeros).

    Returns:
        ``[B, C, H, W]``, zero at invalid cells.
    """
    cells = valid.sum(dim=(2, 3), keepdim=True, dtype=torch.float32).clamp_min(1.0)  # [B, 1, 1, 1]
    mean = features.sum(dim=(2, 3), keepdim=True) / cells
    centred = torch.where(valid, features - mean, 0.0)
    variance = centred.square().sum(dim=(2, 3), keepdim=True) / cells
    # NOTE: clamp before sqrt: sqrt's gradient at 0 is infinite (NaN after the chain rule).
    standard_deviation = variance.clamp_min(1e-12).sqrt()
    return centred / (standard_deviation + eps)


@LOSSES.register("pkd")
class PearsonFeatureLoss(FeatureLoss):
    """PKD (Cao et al., NeurIPS 2022): MSE of standardised features, halved.

    Normalisation: both maps are standardised **per sample and per channel over that
    sample's valid cells** (population variance, i.e. divided by the cell count, plus
    ``eps = 1e-6`` on the standard deviation as mmrazor does); the loss is then the mean
    over valid cells and channels of ``(z_s - z_t)^2``, divided by 2. With the population
    variance this equals ``1 - r``, averaged over the (sample, channel) pairs weighted by
    their valid cell count, exactly (up to ``eps``).

    NOTE: the paper's code (mmrazor ``PKDLoss``) standardises each channel over batch
    and space together. Here a batch mixes offline samples (cached teacher maps, warped)
    and online ones (the live teacher on the augmented image) with different valid
    regions and statistics; per-sample statistics keep one sample's content and padding
    from shifting another's normalisation, and make the loss independent of batch
    composition.

    Example:
        ```yaml
        distillation:
          losses:
            sam2_embed_p4:
              type: pkd
              teacher: sam2
              feature: embed
              student: p4
              weight: 1.0
              params: {eps: 1.0e-6}
        ```

    Args:
        eps: Added to each standard deviation.
        student_channels: Ignored.
        teacher_channels: Ignored.
    """

    def __init__(
        self,
        *,
        eps: float = 1e-6,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
    ) -> None:
        super().__init__(student_channels=student_channels, teacher_channels=teacher_channels)
        if eps <= 0:
            raise ValueError(f"pkd eps must be > 0, got {eps}")
        self.eps = float(eps)

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor,
        targets: Mapping[str, Any] | None,
    ) -> torch.Tensor:
        """See :meth:`FeatureLoss.compute`."""
        student_standard = standardise_per_sample(student, valid, self.eps)
        teacher_standard = standardise_per_sample(teacher, valid, self.eps)
        squared = (student_standard - teacher_standard).square().sum(dim=1, keepdim=True)
        mean_squared = torch.where(valid, squared, 0.0).sum() / (valid_cell_count(valid) * student.shape[1])
        return mean_squared / 2.0
