"""The distillation terms as a module, and the student and distiller trained as one.

:class:`Distiller` owns what distillation trains: one adapter (student channels to the
teacher's) and one loss module per planned term, and computes one
``distill/<teacher>/<feature><-<map>`` term per pair from the teacher maps its
:class:`~vfmkd.distillation.teacher_runtime.TeacherRuntime` serves.
:class:`DistilledModel` pairs it with the student: its forward takes a batch and returns
the loss dict (the task losses, weighted, plus the distillation terms), so DDP wraps
both, the EMA averages both, and a checkpoint keeps their states apart.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from vfmkd.config import ExperimentConfig
from vfmkd.distillation import losses as _losses  # noqa: F401  (registers the losses)
from vfmkd.distillation.mask_kd import MaskTermPlan
from vfmkd.distillation.plan import (
    TermPlan,
    alignment_table,
    plan_distillation,
    plan_mask_terms,
    task_entry_names,
    term_grid_stride,
)
from vfmkd.distillation.teacher_runtime import TeacherRuntime, start_write_backs
from vfmkd.models.adapters import build_adapter
from vfmkd.registry import LOSSES

__all__ = ["DistilledModel", "Distiller", "build_distiller", "task_loss_weights"]

logger = logging.getLogger(__name__)

TeacherMaps = Mapping[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]]


class Distiller(nn.Module):
    """Adapters and loss modules of every planned term, and the terms' values for a batch.

    Args:
        terms: resolved terms from :func:`~vfmkd.distillation.plan.plan_distillation`.
        teachers: the runtime serving the teacher maps (shared, not a child module).
        teacher_dropout: chance that one teacher's terms are zeroed for a step (at least
            one teacher stays); training only.
    """

    def __init__(
        self,
        terms: list[TermPlan],
        teachers: TeacherRuntime,
        *,
        mask_terms: Sequence[MaskTermPlan] = (),
        teacher_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.terms = list(terms)
        self.mask_terms = list(mask_terms)
        self.teachers = teachers
        self.teacher_dropout = teacher_dropout
        self.adapters = nn.ModuleDict()
        self.losses = nn.ModuleDict()
        for term in terms:
            passthrough = term.adapter in ("none", "identity")
            adapted_channels = term.student_channels if passthrough else term.teacher_channels
            self.adapters[term.module_key] = build_adapter(term.adapter, term.student_channels, adapted_channels)
            self.losses[term.module_key] = LOSSES.build(
                term.loss_type, student_channels=adapted_channels, teacher_channels=term.teacher_channels, **term.params
            )
        for mask_term in self.mask_terms:
            self.losses[mask_term.module_key] = LOSSES.build("mask_kd", **mask_term.params)

    def forward(
        self,
        maps: Mapping[str, torch.Tensor],
        batch: dict[str, Any],
        outputs: Mapping[str, Any] | None = None,
        student: nn.Module | None = None,
    ) -> dict[str, torch.Tensor]:
        """One weighted term per planned pair (and per mask term).

        Args:
            maps: the student's named maps (``p3``, ``backbone.p4``, ...), ``[B, C, H, W]`` each.
            batch: the batch on the device (float ``images``, offline records, ``targets``).
            outputs: the student's outputs (each head's), for mask terms.
            student: the student (its ``heads``), for mask terms.
        """
        device = batch["images"].device
        targets = self.teachers(batch, device)
        dropped = self._dropped_teachers()
        losses: dict[str, torch.Tensor] = {}
        for term in self.terms:
            student_map, teacher_maps, valid = self.aligned_pair(term, maps, targets)
            loss_targets = _loss_targets(batch, term_grid_stride(term))
            value = self.losses[term.module_key](student_map, teacher_maps, valid, loss_targets)
            if term.teacher in dropped:
                value = value * 0.0
            losses[term.name] = value * term.weight
        for mask_term in self.mask_terms:
            if outputs is None or student is None:
                raise ValueError(f"{mask_term.name}: a mask term needs the student and its outputs")
            value = self.losses[mask_term.module_key](
                student.heads[mask_term.head],
                outputs[mask_term.head],
                self.teachers.prompt_decoder(mask_term.teacher, device),
                self.teachers.decoder_records(batch, device, mask_term.teacher),
                batch.get("targets"),
                _detections(student, outputs, self.losses[mask_term.module_key]),
            )
            if mask_term.teacher in dropped:
                value = value * 0.0
            losses[mask_term.name] = value * mask_term.weight
        return losses

    def aligned_pair(
        self, term: TermPlan, maps: Mapping[str, torch.Tensor], targets: TeacherMaps
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The adapted student map and the teacher map of one term, on one grid.

        Returns:
            student ``[B, Ct, Hg, Wg]`` float32, teacher ``[B, Ct, Hg, Wg]``, valid
            ``[B, 1, Hg, Wg]`` bool (global vectors: ``Hg = Wg = 1``, the student pooled).
        """
        student = self.adapters[term.module_key](maps[term.level]).float()
        teacher_maps, valid = targets[(term.teacher, term.feature, term_grid_stride(term))]
        if term.teacher_stride == 0:
            student = student.mean(dim=(2, 3), keepdim=True)
        elif student.shape[-2:] != teacher_maps.shape[-2:]:
            student = nn.functional.interpolate(student, size=teacher_maps.shape[-2:], mode="bilinear", align_corners=False)
        return student, teacher_maps, valid

    def _dropped_teachers(self) -> set[str]:
        keys = list(self.teachers.teacher_plans)
        if not self.training or self.teacher_dropout == 0.0 or len(keys) < 2:
            return set()
        # NOTE: python's random is seeded by the trainer; at least one teacher stays.
        dropped = {key for key in keys if random.random() < self.teacher_dropout}
        return dropped if len(dropped) < len(keys) else set()


def _detections(student: nn.Module, outputs: Mapping[str, Any], loss: nn.Module) -> list[dict[str, Any]] | None:
    """The detection heads' boxes (input pixels) per image, when a mask term prompts unlabelled images with them."""
    if getattr(loss, "unlabeled_prompts", None) != "boxes":
        return None
    for name, head in student.heads.items():
        if getattr(head, "predicts_boxes", False):
            with torch.no_grad():
                return head.predict(outputs[name], None)
    return None


def _loss_targets(batch: dict[str, Any], stride: int) -> dict[str, Any] | None:
    targets = batch.get("targets")
    if targets is None:
        return None
    return {**targets, "stride": max(stride, 1)}


class DistilledModel(nn.Module):
    """The student and (optionally) its distiller: ``forward(batch) -> {loss name: scalar}``.

    Args:
        student: the model (:class:`~vfmkd.models.unified_model.UnifiedModel`): its
            forward gives ``features`` (the named maps) and one output per head, its
            ``loss(outputs, targets)`` the task losses.
        distiller: the distillation terms, or None to train the task losses alone.
        task_weights: multiplier of each head's losses by head name (``{"detection": 5.0}``),
            see :func:`task_loss_weights`.
        task_losses: False for training data without labels: distillation alone.
    """

    def __init__(
        self,
        student: nn.Module,
        distiller: Distiller | None = None,
        *,
        task_weights: Mapping[str, float] | None = None,
        task_losses: bool = True,
    ) -> None:
        super().__init__()
        self.student = student
        self.distiller = distiller
        self.task_weights = dict(task_weights or {})
        self.task_losses = task_losses

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss dict of a batch on the device (float ``images [B, 3, H, W]`` in [0, 1], ``targets``)."""
        task_run = self.task_losses and batch.get("targets") is not None
        # NOTE: heads that want them (a DETR head's denoising queries) get the targets in training.
        wants = task_run and self.training and any(
            getattr(head, "wants_targets", False) for head in getattr(self.student, "heads", {}).values()
        )
        outputs = self.student(batch["images"], targets=batch["targets"]) if wants else self.student(batch["images"])
        losses: dict[str, torch.Tensor] = {}
        heads = [name for name in outputs if name not in ("features", "maps")]
        task_run = task_run and bool(heads)
        if task_run:
            losses.update(self.student.loss(outputs, batch["targets"], weights=self.task_weights))
        if self.distiller is not None:
            distilled = self.distiller(outputs["maps"], batch, outputs, self.student)
            if heads and not task_run and distilled:
                # NOTE: without task losses the heads (and neck parts only they use) would get no
                # gradient, which DDP (find_unused_parameters=False) refuses at the next step; a
                # zero-weighted tie gives them an exact zero gradient instead.
                first = next(iter(distilled))
                distilled[first] = distilled[first] + 0.0 * _finite_sum([outputs[name] for name in heads])
            losses.update(distilled)
        return losses


def _finite_sum(values: Any) -> torch.Tensor:
    """Sum of every tensor in nested lists / tuples / dicts, non-finite entries as 0 (a float32 scalar)."""
    if torch.is_tensor(values):
        return values.float().nan_to_num(0.0, 0.0, 0.0).sum()
    if isinstance(values, Mapping):
        values = list(values.values())
    if not isinstance(values, (list, tuple)):
        return torch.zeros(())  # a plain value (a size, a flag): nothing to tie
    sums = [_finite_sum(item) for item in values]
    return torch.stack(sums).sum() if sums else torch.zeros(())


def task_loss_weights(config: ExperimentConfig) -> dict[str, float]:
    """Multiplier of each head's losses from ``distillation.losses.<head name>.weight`` (``detection.weight``)."""
    losses = config.distillation.losses
    return {head: losses[head].weight for head in sorted(task_entry_names(config)) if head in losses}


def build_distiller(
    config: ExperimentConfig, student: nn.Module, *, write_back: bool = True
) -> Distiller | None:
    """The distiller for ``config`` and ``student``, or None when it has no distillation term.

    Logs the alignment table. With ``write_back`` (training), the stores of teachers with
    ``write_back: true`` are opened for writing; evaluation passes False and never adds
    to a store.
    """
    if not any(name not in task_entry_names(config) for name in config.distillation.losses):
        return None
    if not write_back:
        config = config.model_copy(deep=True)
        for teacher in config.teachers.values():
            teacher.write_back = False
    teachers, terms = plan_distillation(config, student.map_dims, student.map_strides)
    mask_terms = plan_mask_terms(config, teachers, getattr(student, "heads", {}))
    if not terms and not mask_terms:
        logger.warning("distillation: every configured teacher is disabled; training the task losses only")
        return None
    start_write_backs(config, teachers)
    runtime = TeacherRuntime(teachers, terms, mask_terms)
    if terms:
        logger.info("distillation alignment:\n%s", alignment_table(terms, teachers, config.data.img_size))
    for mask_term in mask_terms:
        logger.info(
            "%s: %s's prompt decoder (%s) teaches head '%s', %g",
            mask_term.name, mask_term.teacher, mask_term.family, mask_term.head, mask_term.weight,
        )
    return Distiller(terms, runtime, mask_terms=mask_terms, teacher_dropout=config.distillation.teacher_dropout)
