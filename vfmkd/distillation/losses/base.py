"""The feature-loss contract and the masked reductions every feature loss shares.

A feature loss compares a student map with a teacher map that the distiller has already
put on one grid (``[B, C, H, W]`` each) together with ``valid [B, 1, H, W]``: the cells
that hold real image content in both frames (padding, letterbox borders and cells that
fall outside the teacher's view are invalid). :class:`FeatureLoss` does what every loss
needs before its own formula:

- checks shapes and the validity mask, naming what disagrees;
- switches autocast off and casts both maps to float32, so a loss is computed in float32
  even inside a bf16/fp16 autocast region;
- detaches the teacher (no gradient ever reaches it);
- fills invalid cells of both maps with zeros, so whatever sits there (grid-sample
  padding, NaN from a broken cache row) cannot reach the value or the gradient.

Subclasses then exclude invalid cells from every mean, sum and softmax. When no cell is
valid the masked reductions give exactly 0 with the autograd graph (including any
parameters the loss owns) intact, so ``backward()`` and DDP's gradient bookkeeping work
on a batch made only of padding.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

__all__ = ["FeatureLoss", "masked_softmax", "samples_with_content", "valid_cell_count"]


def valid_cell_count(valid: torch.Tensor) -> torch.Tensor:
    """Number of valid cells in the batch, at least 1 (so dividing by it is always safe).

    Args:
        valid: ``[B, 1, H, W]`` bool.

    Returns:
        A float32 scalar.
    """
    return valid.sum(dtype=torch.float32).clamp_min(1.0)


def samples_with_content(valid: torch.Tensor) -> torch.Tensor:
    """Number of samples with at least one valid cell, at least 1.

    Losses that the papers normalise "per image" (``cwd``, ``mgd``, ``fgd``) divide by
    this rather than by B, so a sample that is all padding neither adds to nor dilutes
    the value. It equals B whenever every sample shows some image.

    Args:
        valid: ``[B, 1, H, W]`` bool.

    Returns:
        A float32 scalar.
    """
    return valid.flatten(1).any(dim=1).sum(dtype=torch.float32).clamp_min(1.0)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the positions where ``mask`` is True only.

    Masked positions are removed from the normalisation (their logits become -inf), not
    set to zero. Both outputs are exactly 0 at masked positions, so products such as
    ``p_t * (log p_t - log p_s)`` stay finite there. A slice with no valid position
    gives zeros too (instead of NaN).

    Args:
        logits: Any shape, e.g. ``[B, C, H*W]``.
        mask: bool, broadcastable to ``logits``.
        dim: Dimension to normalise over.

    Returns:
        ``(log_probabilities, probabilities)``, each shaped like ``logits``.
    """
    mask = mask.expand_as(logits)
    filled = logits.masked_fill(~mask, float("-inf"))
    # NOTE: an all-masked slice would be softmax over only -inf (NaN); give it finite
    # logits instead. Its entries are zeroed below and callers exclude it anyway.
    filled = torch.where(mask.any(dim=dim, keepdim=True), filled, torch.zeros_like(filled))
    log_probabilities = torch.log_softmax(filled, dim=dim).masked_fill(~mask, 0.0)
    probabilities = log_probabilities.exp().masked_fill(~mask, 0.0)
    return log_probabilities, probabilities


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager[Any]:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class FeatureLoss(nn.Module, abc.ABC):
    """Base class of the losses in ``vfmkd.registry.LOSSES``.

    Every loss is built as ``LOSSES.build(name, student_channels=Cs, teacher_channels=Ct,
    **params)``. ``student_channels`` is the channel count of the student map the loss
    receives (after the adapter, if any); ``teacher_channels`` that of the teacher map.
    Losses without parameters ignore both.

    Subclasses implement :meth:`compute`; :meth:`forward` prepares the inputs as the
    module docstring describes. They declare what they need in class attributes, which
    the planner (:func:`~vfmkd.distillation.plan.plan_distillation`) reads, so that no
    loss name is written anywhere else.

    Attributes:
        needs_spatial_map: The formula works across cells (a softmax over space, spatial
            attention or masks), so a global teacher vector (one cell) makes it
            meaningless; the planner refuses such a pair on the teacher's grid.
        maps_channels: The loss's own parameters map student channels to teacher
            channels (``mgd``'s generator), so it takes ``Cs != Ct`` and allows
            ``adapter: none`` with unequal channels. All others need identical shapes.
        uses_boxes: The loss reads ground-truth boxes from ``targets`` (``fgd``). It runs
            without them (unlabelled data), but its box terms are then 0.
        needs_raw_teacher: The formula reads the teacher's values as they are (logits:
            ``bce``), so a teacher with ``normalize: true`` is refused.

    Args:
        student_channels: Channels of the student map passed to ``forward``.
        teacher_channels: Channels of the teacher map passed to ``forward``.
    """

    needs_spatial_map: ClassVar[bool] = False
    maps_channels: ClassVar[bool] = False
    uses_boxes: ClassVar[bool] = False
    needs_raw_teacher: ClassVar[bool] = False

    def __init__(self, *, student_channels: int | None = None, teacher_channels: int | None = None) -> None:
        super().__init__()
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor | None = None,
        targets: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Loss between aligned student and teacher maps.

        Args:
            student: ``[B, Cs, H, W]`` student map (after the adapter).
            teacher: ``[B, Ct, H, W]`` teacher map on the same grid; ``Ct == Cs`` except
                for losses that map channels themselves (``mgd``).
            valid: ``[B, 1, H, W]`` (or ``[B, H, W]``) bool, True where both frames hold
                image content. None means every cell is valid.
            targets: Ground truth for losses that use it (``fgd``); others ignore it.

        Returns:
            A float32 scalar.
        """
        self._check_shapes(student, teacher)
        valid = self._prepare_valid(valid, student)
        with _autocast_disabled(student.device.type):
            student = student.float().masked_fill(~valid, 0.0)
            teacher = teacher.detach().float().masked_fill(~valid, 0.0)
            return self.compute(student, teacher, valid, targets)

    @abc.abstractmethod
    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor,
        targets: Mapping[str, Any] | None,
    ) -> torch.Tensor:
        """The loss formula on prepared inputs.

        Args:
            student: ``[B, Cs, H, W]`` float32, zero at invalid cells.
            teacher: ``[B, Ct, H, W]`` float32, detached, zero at invalid cells.
            valid: ``[B, 1, H, W]`` bool.
            targets: As passed to :meth:`forward`.

        Returns:
            A float32 scalar.
        """

    def _check_shapes(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        name = type(self).__name__
        if student.dim() != 4 or teacher.dim() != 4:
            raise ValueError(
                f"{name} expects [B, C, H, W] maps; got student {tuple(student.shape)}, "
                f"teacher {tuple(teacher.shape)}"
            )
        if not self.maps_channels:
            if student.shape != teacher.shape:
                raise ValueError(
                    f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ; "
                    "the adapter must map student channels to teacher channels and the distiller must "
                    "resample both onto one grid"
                )
            return
        if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(
                f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must share "
                "batch size and grid"
            )

    @staticmethod
    def _prepare_valid(valid: torch.Tensor | None, student: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = student.shape
        if valid is None:
            return torch.ones((batch, 1, height, width), dtype=torch.bool, device=student.device)
        if valid.dtype != torch.bool:
            raise TypeError(
                f"valid must be a bool mask, got {valid.dtype}; threshold a resampled mask first "
                "(e.g. valid > 0.5)"
            )
        if valid.dim() == 3:
            valid = valid.unsqueeze(1)
        if tuple(valid.shape) != (batch, 1, height, width):
            raise ValueError(
                f"valid has shape {tuple(valid.shape)}; expected {(batch, 1, height, width)} "
                f"for maps of shape {tuple(student.shape)}"
            )
        return valid.to(student.device)
