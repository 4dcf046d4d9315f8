"""FGD: focal and global distillation for detectors.

Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022,
arXiv:2111.11837; official code https://github.com/yzd-v/FGD. Four terms:

- focal feature loss: squared error weighted by the teacher's spatial and channel
  attention and by a foreground / background scale mask built from the ground-truth
  boxes, with separate weights for the foreground and the background part;
- attention loss: L1 between the student's and the teacher's attention;
- global loss: squared error between the two maps after each is passed through its own
  learnable global-context block (GCNet: Cao et al., "GCNet: Non-local Networks Meet
  Squeeze-Excitation Networks and Beyond", ICCVW 2019, arXiv:1904.11492).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from vfmkd.distillation.losses.base import FeatureLoss, masked_softmax, samples_with_content
from vfmkd.registry import LOSSES

__all__ = ["FocalGlobalLoss", "GlobalContextBlock", "foreground_background_masks"]


def foreground_background_masks(
    valid: torch.Tensor, targets: Mapping[str, Any] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FGD's scale masks from ground-truth boxes.

    A cell is foreground for a box when the cell overlaps the box (cell ``j`` spans
    ``[j * stride, (j + 1) * stride)`` input pixels); it holds ``1 / (h * w)`` with
    ``h x w`` the box's extent in cells (clipped to the map), the largest such value
    where boxes overlap, so small objects weigh as much as large ones. Every other valid
    cell is background and holds ``1 / (number of background cells of its image)``.
    Invalid cells are neither.

    NOTE: the official code marks cells ``floor(x1)..ceil(x2)`` inclusive, one cell past
    the box's far edge; here only cells the box overlaps count.

    Args:
        valid: ``[B, 1, H, W]`` bool.
        targets: ``boxes [N, 4]`` xyxy in input pixels of the map's frame, ``batch_idx
            [N]`` image of each box, ``stride`` input pixels per cell. None, or no boxes,
            makes every valid cell background (unlabelled data).

    Returns:
        ``(foreground, background)``, each ``[B, 1, H, W]`` float32.
    """
    batch, _, height, width = valid.shape
    device = valid.device
    foreground = torch.zeros((batch, height, width), dtype=torch.float32, device=device)
    boxes = None if targets is None else targets.get("boxes")
    if boxes is not None and len(boxes) > 0:
        missing = [key for key in ("batch_idx", "stride") if key not in targets]
        if missing:
            raise KeyError(f"fgd targets with boxes also need {missing}; got keys {sorted(targets)}")
        stride = float(targets["stride"])
        if stride <= 0:
            raise ValueError(f"fgd targets stride must be > 0, got {stride}")
        cell_boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4) / stride
        image_index = torch.as_tensor(targets["batch_idx"], device=device).reshape(-1).long()
        if image_index.numel() != cell_boxes.shape[0]:
            raise ValueError(
                f"fgd targets: {cell_boxes.shape[0]} boxes but {image_index.numel()} batch_idx entries"
            )
        if image_index.numel() and (int(image_index.min()) < 0 or int(image_index.max()) >= batch):
            raise ValueError(
                f"fgd targets batch_idx spans {int(image_index.min())}..{int(image_index.max())} "
                f"but the batch has {batch} images"
            )
        inside = (
            (cell_boxes[:, 2] > 0) & (cell_boxes[:, 0] < width) & (cell_boxes[:, 3] > 0) & (cell_boxes[:, 1] < height)
        )
        cell_boxes, image_index = cell_boxes[inside], image_index[inside]
        first_column = cell_boxes[:, 0].floor().clamp(0, width - 1)
        last_column = torch.maximum(cell_boxes[:, 2].ceil() - 1, first_column).clamp(max=width - 1)
        first_row = cell_boxes[:, 1].floor().clamp(0, height - 1)
        last_row = torch.maximum(cell_boxes[:, 3].ceil() - 1, first_row).clamp(max=height - 1)
        area = (last_column - first_column + 1) * (last_row - first_row + 1)  # [N], cells
        columns = torch.arange(width, device=device, dtype=torch.float32)
        rows = torch.arange(height, device=device, dtype=torch.float32)
        in_columns = (columns >= first_column[:, None]) & (columns <= last_column[:, None])  # [N, W]
        in_rows = (rows >= first_row[:, None]) & (rows <= last_row[:, None])  # [N, H]
        box_cells = in_rows[:, :, None] & in_columns[:, None, :]  # [N, H, W]
        scales = (box_cells.float() / area[:, None, None]).flatten(1)  # [N, H*W]
        foreground.view(batch, height * width).scatter_reduce_(
            0, image_index[:, None].expand_as(scales), scales, reduce="amax", include_self=True
        )
    foreground = foreground.unsqueeze(1) * valid
    background = (valid & (foreground == 0)).float()
    background = background / background.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    return foreground, background


class GlobalContextBlock(nn.Module):
    """GCNet global context modelling: ``x + transform(sum_cells softmax(conv(x)) * x)``.

    The attention pooling runs over valid cells only. As in FGD's code, the transform's
    last convolution starts at zero, so the block starts as the identity.

    Args:
        channels: C of the input.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden_channels = max(channels // 2, 1)
        self.context_logits = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            OrderedDict(
                reduce=nn.Conv2d(channels, hidden_channels, kernel_size=1),
                norm=nn.LayerNorm([hidden_channels, 1, 1]),
                activation=nn.ReLU(inplace=True),
                expand=nn.Conv2d(hidden_channels, channels, kernel_size=1),
            )
        )
        nn.init.kaiming_normal_(self.context_logits.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context_logits.bias)
        nn.init.zeros_(self.transform.expand.weight)
        nn.init.zeros_(self.transform.expand.bias)

    def forward(self, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Add the transformed global context to every cell.

        Args:
            features: ``[B, C, H, W]``.
            valid: ``[B, 1, H, W]`` bool; pooling weights cover valid cells only.

        Returns:
            ``[B, C, H, W]``.
        """
        _, weights = masked_softmax(self.context_logits(features).flatten(2), valid.flatten(2), dim=-1)  # [B, 1, HW]
        context = torch.einsum("bcn,bon->bc", features.flatten(2), weights)[:, :, None, None]  # [B, C, 1, 1]
        return features + self.transform(context)


def _attention(
    features: torch.Tensor, valid: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FGD's spatial and channel attention of one map.

    Args:
        features: ``[B, C, H, W]``, zero at invalid cells.
        valid: ``[B, 1, H, W]`` bool.
        tau: Softmax temperature.

    Returns:
        ``spatial [B, 1, H, W]``: ``n_valid * softmax`` over valid cells of the
        channel-mean absolute value (mean 1 over valid cells, 0 elsewhere), and ``channel
        [B, C]``: ``C * softmax`` over channels of the valid-cell-mean absolute value.
    """
    magnitude = features.abs()
    cells = valid.sum(dim=(2, 3), dtype=torch.float32).clamp_min(1.0)  # [B, 1]
    spatial_logits = magnitude.mean(dim=1, keepdim=True).flatten(1) / tau  # [B, H*W]
    _, spatial_probabilities = masked_softmax(spatial_logits, valid.flatten(1), dim=1)
    spatial = (spatial_probabilities * cells).view_as(valid)
    channel_mean = magnitude.sum(dim=(2, 3)) / cells  # [B, C]
    channel = features.shape[1] * torch.softmax(channel_mean / tau, dim=1)
    return spatial, channel


@LOSSES.register("fgd")
class FocalGlobalLoss(FeatureLoss):
    """Focal and global distillation (FGD), Yang et al., CVPR 2022.

    With ``A_s``/``A_c`` the teacher's spatial/channel attention (see below), ``M_fg`` and
    ``M_bg`` the scale masks of :func:`foreground_background_masks` and ``N`` the number
    of samples with image content:

    - ``foreground = sum M_fg * A_s * A_c * (s - t)^2 / N`` (and ``background`` with
      ``M_bg``);
    - ``attention = (sum |A_c(s) - A_c(t)| + sum |A_s(s) - A_s(t)|) / N``;
    - ``global = sum (GC_s(s) - GC_t(t))^2 / N`` with two learnable global-context blocks;
    - loss = ``foreground_weight * foreground + background_weight * background +
      attention_weight * attention + global_weight * global``.

    Sums run over valid cells and channels. Spatial attention is ``n_valid * softmax``
    over valid cells of ``mean_c |x| / tau`` (invalid cells are left out of the softmax);
    channel attention is ``C * softmax`` over channels of ``mean_valid_cells |x| / tau``.

    Defaults are the official RetinaNet configs (a one-stage dense detector, like
    YOLOv8): ``tau = 0.5``, ``foreground_weight = 1e-3`` (alpha), ``background_weight =
    5e-4`` (beta), ``attention_weight = 5e-4`` (gamma; the class default in the official
    code is 1e-3, its RetinaNet configs use 5e-4), ``global_weight = 5e-6`` (lambda). The
    official Faster R-CNN configs use alpha 5e-5, beta 2.5e-5, gamma 5e-5, lambda 5e-7.

    ``targets`` carries the boxes (``boxes``, ``batch_idx``, ``stride``); without targets
    (unlabelled data) every valid cell is background, so the foreground term is 0 and the
    background term covers the whole image. The teacher map gets no gradient, but the
    teacher-side global-context block is learnable, as in the official code. Student
    and teacher maps must both have ``teacher_channels`` channels (use an adapter).

    Example:
        ```yaml
        distillation:
          losses:
            sam2_embed_p4:
              type: fgd
              teacher: sam2
              feature: embed
              student: p4
              adapter: conv1x1
              weight: 1.0
              params: {tau: 0.5, foreground_weight: 1.0e-3, background_weight: 5.0e-4,
                       attention_weight: 5.0e-4, global_weight: 5.0e-6}
        ```

    Args:
        student_channels: Ignored (the adapter already maps to ``teacher_channels``).
        teacher_channels: C of both maps; sizes the global-context blocks.
        tau: Attention temperature (``temp`` in the paper).
        foreground_weight: alpha.
        background_weight: beta.
        attention_weight: gamma.
        global_weight: lambda.
    """

    needs_spatial_map = True
    uses_boxes = True

    def __init__(
        self,
        *,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        tau: float = 0.5,
        foreground_weight: float = 1e-3,
        background_weight: float = 5e-4,
        attention_weight: float = 5e-4,
        global_weight: float = 5e-6,
    ) -> None:
        super().__init__(student_channels=student_channels, teacher_channels=teacher_channels)
        if teacher_channels is None:
            raise ValueError("fgd owns global-context blocks and needs teacher_channels")
        if tau <= 0:
            raise ValueError(f"fgd tau (temperature) must be > 0, got {tau}")
        self.tau = float(tau)
        self.foreground_weight = float(foreground_weight)
        self.background_weight = float(background_weight)
        self.attention_weight = float(attention_weight)
        self.global_weight = float(global_weight)
        self.student_context = GlobalContextBlock(teacher_channels)
        self.teacher_context = GlobalContextBlock(teacher_channels)

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor,
        targets: Mapping[str, Any] | None,
    ) -> torch.Tensor:
        """See :meth:`FeatureLoss.compute`."""
        if student.shape[1] != self.teacher_channels:
            raise ValueError(
                f"fgd was built for {self.teacher_channels} channels but got maps of shape "
                f"{tuple(student.shape)}; pass teacher_channels equal to the aligned maps' channels"
            )
        samples = samples_with_content(valid)
        spatial_student, channel_student = _attention(student, valid, self.tau)
        spatial_teacher, channel_teacher = _attention(teacher, valid, self.tau)
        foreground_mask, background_mask = foreground_background_masks(valid, targets)

        attention_weighted = (student - teacher).square() * channel_teacher[:, :, None, None]
        per_cell = attention_weighted.sum(dim=1, keepdim=True) * spatial_teacher  # [B, 1, H, W]
        foreground = (per_cell * foreground_mask).sum() / samples
        background = (per_cell * background_mask).sum() / samples

        has_content = valid.flatten(1).any(dim=1, keepdim=True)  # [B, 1]
        channel_difference = torch.where(has_content, (channel_student - channel_teacher).abs(), 0.0).sum()
        spatial_difference = torch.where(valid, (spatial_student - spatial_teacher).abs(), 0.0).sum()
        attention = (channel_difference + spatial_difference) / samples

        context_difference = self.student_context(student, valid) - self.teacher_context(teacher, valid)
        global_term = torch.where(valid, context_difference.square().sum(dim=1, keepdim=True), 0.0).sum() / samples

        return (
            self.foreground_weight * foreground
            + self.background_weight * background
            + self.attention_weight * attention
            + self.global_weight * global_term
        )
