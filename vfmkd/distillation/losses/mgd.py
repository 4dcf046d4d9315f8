"""MGD: masked generative distillation.

Yang et al., "Masked Generative Distillation", ECCV 2022, arXiv:2205.01529; official code
https://github.com/yzd-v/MGD. Random cells of the student map are dropped and a small
generator must rebuild the teacher's full map from what is left, so the student learns
features from which the teacher's representation can be generated rather than copying
it cell by cell.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from vfmkd.distillation.losses.base import FeatureLoss, samples_with_content
from vfmkd.registry import LOSSES

__all__ = ["MaskedGenerativeLoss"]


@LOSSES.register("mgd")
class MaskedGenerativeLoss(FeatureLoss):
    """Masked generative distillation (MGD), Yang et al., ECCV 2022.

    1. Draw a random spatial mask: each cell of each sample is dropped (set to zero in
       every channel) with probability ``mask_ratio``.
    2. Generate ``conv3x3(Cs -> Ct) -> ReLU -> conv3x3(Ct -> Ct)`` from the masked
       student map.
    3. Loss: ``alpha * sum over valid cells and channels of (generated - teacher)^2``,
       divided by the number of samples with image content (B normally).

    The generator maps ``student_channels`` to ``teacher_channels`` itself, so use
    ``adapter: none`` (the generator is the adapter), or an adapter whose output already
    has the teacher's channels (then ``student_channels == teacher_channels``).
    ``student_channels`` must be the channel count of the map ``forward`` receives.

    Defaults are the paper's detection settings (official configs for RetinaNet, Faster
    R-CNN, etc.): ``alpha = 2e-5`` (``alpha_mgd``) and ``mask_ratio = 0.65``
    (``lambda_mgd``). ``alpha`` is tuned for a sum over 256-channel FPN maps; with other
    channel counts or grid sizes scale it (or the entry's ``weight``) accordingly.

    The mask is drawn on every call from torch's global generator on the student's
    device, so ``torch.manual_seed`` makes runs repeat. It is drawn in eval mode too: the
    value is a (random) training objective, not a metric.

    Example:
        ```yaml
        distillation:
          losses:
            sam2_embed_p4:
              type: mgd
              teacher: sam2
              feature: embed
              student: p4
              adapter: none
              weight: 1.0
              params: {alpha: 2.0e-5, mask_ratio: 0.65}
        ```

    Args:
        student_channels: Channels of the student map passed to ``forward``.
        teacher_channels: Channels of the teacher map.
        alpha: Loss scale (``alpha_mgd`` in the paper).
        mask_ratio: Probability that a cell is dropped (``lambda_mgd``), in ``[0, 1]``.
    """

    needs_spatial_map = True
    maps_channels = True

    def __init__(
        self,
        *,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        alpha: float = 2e-5,
        mask_ratio: float = 0.65,
    ) -> None:
        super().__init__(student_channels=student_channels, teacher_channels=teacher_channels)
        if student_channels is None or teacher_channels is None:
            raise ValueError(
                "mgd owns a generator and needs student_channels and teacher_channels; got "
                f"student_channels={student_channels}, teacher_channels={teacher_channels}"
            )
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mgd mask_ratio must be in [0, 1], got {mask_ratio}")
        self.alpha = float(alpha)
        self.mask_ratio = float(mask_ratio)
        self.generator = nn.Sequential(
            OrderedDict(
                input_conv=nn.Conv2d(student_channels, teacher_channels, kernel_size=3, padding=1),
                activation=nn.ReLU(inplace=True),
                output_conv=nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
            )
        )

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor,
        targets: Mapping[str, Any] | None,
    ) -> torch.Tensor:
        """See :meth:`FeatureLoss.compute`."""
        if student.shape[1] != self.student_channels or teacher.shape[1] != self.teacher_channels:
            raise ValueError(
                f"mgd was built for {self.student_channels} student and {self.teacher_channels} teacher "
                f"channels but got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}; "
                "student_channels must count the map the loss receives (after the adapter)"
            )
        batch, _, height, width = student.shape
        draws = torch.rand((batch, 1, height, width), device=student.device)
        keep = draws >= self.mask_ratio
        generated = self.generator(student * keep)
        squared = (generated - teacher).square().sum(dim=1, keepdim=True)
        return self.alpha * torch.where(valid, squared, 0.0).sum() / samples_with_content(valid)
