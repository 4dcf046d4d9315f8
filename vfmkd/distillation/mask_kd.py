"""Prompt-in-the-loop mask distillation (EdgeSAM): the student's mask decoder learns the teacher's masks.

A ``mask_kd`` term pairs a SAM-family teacher with the student's promptable mask head
(``sam_mask_head``). Per training image, prompts are drawn (ground-truth instances: a box,
or one point inside the mask, 50 / 50; unlabelled images: a grid of points or the
detector's boxes), and both sides decode them:

- the teacher's own prompt encoder and mask decoder run on the teacher's image embedding
  (read from the feature store for offline samples, from a live pass for online ones),
  the prompts mapped into the teacher's frame through the sample's frames;
- the student's decoder runs on the student's embedding with the prompts as they are.

The teacher's low-resolution mask is warped back into the student's frame (with the
validity mask: pixels the teacher never saw do not count), binarised, and the student is
trained with ``bce_weight`` x BCE + ``dice_weight`` x Dice on the valid pixels. Then
``decode_iters`` refinement rounds: a point drawn uniformly from where the two disagree
(positive where the student misses, negative where it over-segments, none when the
region is under ``min_error_pixels``) is added to the prompts of both, each side gets its
own previous low-resolution mask as mask input, and both decode again. The term is the
mean over every decode.

Example (experiment YAML)::

    distillation:
      losses:
        sam2_masks: {type: mask_kd, teacher: sam2, student: segmentation, weight: 1.0,
                     params: {decode_iters: 2, unlabeled_prompts: grid}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.distillation.mask_prompts import (
    DecoderRecord,
    PromptSet,
    TeacherSegmenter,
    map_prompt_boxes,
    map_prompt_points,
)
from vfmkd.models.heads.prompts import PADDING_LABEL, Prompts, sample_prompts
from vfmkd.ops.masks import refinement_points
from vfmkd.ops.prompt_decoder import PromptDecoder
from vfmkd.registry import LOSSES

__all__ = [
    "DecoderRecord",
    "MaskDistillation",
    "MaskTermPlan",
    "TeacherSegmenter",
    "map_prompt_boxes",
    "map_prompt_points",
]

UNLABELED_PROMPTS = ("grid", "boxes", "none")


@dataclass
class MaskTermPlan:
    """A resolved ``mask_kd`` entry: which teacher's decoder teaches which student head."""

    name: str
    teacher: str
    head: str
    family: str
    features: tuple[str, ...]
    weight: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def module_key(self) -> str:
        return f"{self.teacher}__masks__{self.head}".replace(".", "_")


def _masked_bce_dice(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per mask BCE (mean over valid pixels) and Dice (over valid pixels); ``[N]`` each."""
    weights = valid.float().flatten(1)
    counts = weights.sum(1).clamp(min=1.0)
    bce = (F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1) * weights).sum(1) / counts
    probabilities = logits.sigmoid().flatten(1) * weights
    flat_targets = targets.flatten(1) * weights
    overlap = (probabilities * flat_targets).sum(1)
    dice = 1.0 - (2.0 * overlap + 1.0) / (probabilities.sum(1) + flat_targets.sum(1) + 1.0)
    has_pixels = (weights.sum(1) > 0).float()
    return bce * has_pixels, dice * has_pixels


@LOSSES.register("mask_kd")
class MaskDistillation(nn.Module):
    """The ``mask_kd`` term's computation (see the module docstring).

    Args:
        decode_iters: refinement rounds after the first decode (EdgeSAM: 2 by default).
        bce_weight: weight of the BCE term.
        dice_weight: weight of the Dice term.
        max_instances: most prompted instances (or grid points, or boxes) per image.
        point_probability: share of point prompts among ground-truth instances.
        unlabeled_prompts: prompts of images without labels: ``grid`` (positive points on a
            ``grid_size`` x ``grid_size`` grid, ``max_instances`` of them at random),
            ``boxes`` (the detection head's boxes above ``box_threshold``) or ``none``.
        grid_size: points per side of that grid.
        box_threshold: detection score above which a box prompts.
        min_error_pixels: a disagreement region smaller than this adds no point.
        student_channels: ignored (the loss registry's common argument).
        teacher_channels: ignored.
    """

    prompt_in_the_loop: ClassVar[bool] = True

    def __init__(
        self,
        *,
        decode_iters: int = 2,
        bce_weight: float = 5.0,
        dice_weight: float = 5.0,
        max_instances: int = 8,
        point_probability: float = 0.5,
        unlabeled_prompts: str = "grid",
        grid_size: int = 4,
        box_threshold: float = 0.25,
        min_error_pixels: int = 10,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
    ) -> None:
        super().__init__()
        if decode_iters < 0 or max_instances < 1 or grid_size < 1:
            raise ValueError("mask_kd: decode_iters must be >= 0, max_instances and grid_size >= 1")
        if unlabeled_prompts not in UNLABELED_PROMPTS:
            raise ValueError(f"mask_kd: unlabeled_prompts must be one of {UNLABELED_PROMPTS}, got '{unlabeled_prompts}'")
        self.decode_iters = decode_iters
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.max_instances = max_instances
        self.point_probability = point_probability
        self.unlabeled_prompts = unlabeled_prompts
        self.grid_size = grid_size
        self.box_threshold = box_threshold
        self.min_error_pixels = min_error_pixels

    def forward(
        self,
        head: nn.Module,
        head_outputs: Mapping[str, Any],
        decoder: PromptDecoder,
        records: Sequence[Sequence[DecoderRecord]],
        targets: Mapping[str, Any] | None,
        detections: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The term's value for a batch (a float32 scalar).

        Args:
            head: the student's ``sam_mask_head``.
            head_outputs: its forward's outputs for the batch.
            decoder: the teacher's prompt decoder.
            records: per batch image, its source images as the teacher saw them (a mosaic
                has up to four; an image without teacher features has none and no prompts).
            targets: the batch's targets (masks, boxes, batch_idx, frame_index,
                has_labels), or None (no labels at all).
            detections: per image ``boxes [K, 4]`` (input pixels) and ``scores [K]`` of the
                detection head, for ``unlabeled_prompts: boxes``.
        """
        with torch.autocast(device_type=head_outputs["embed"].device.type, enabled=False):
            groups = self._prompt_groups(head_outputs, records, targets, detections)
            # NOTE: a zero-weighted tie gives the head's trainable parameters an exact zero
            # gradient when no prompt was drawn (DDP needs every one to get one each step).
            total = 0.0 * sum(p.float().sum() for p in head.parameters() if p.requires_grad)
            total = total + 0.0 * head_outputs["embed"].float().sum()
            if not groups:
                return total
            prompt_set = PromptSet.from_groups(groups, records)
            return total + self._loop_loss(head, head_outputs, decoder, prompt_set)

    # -------------------------------------------------------------- prompts
    def _prompt_groups(
        self,
        head_outputs: Mapping[str, Any],
        records: Sequence[Sequence[DecoderRecord]],
        targets: Mapping[str, Any] | None,
        detections: Sequence[Mapping[str, torch.Tensor]] | None,
    ) -> list[tuple[int, int, dict[str, torch.Tensor]]]:
        """(batch row, record, prompts in student pixels) groups; prompts of one group all
        have a box or all have none (they are decoded together)."""
        device = head_outputs["embed"].device
        height, width = head_outputs["input_size"]
        labelled = _labelled_rows(targets, len(records))
        groups: list[tuple[int, int, dict[str, torch.Tensor]]] = []
        if targets is not None and targets.get("masks") is not None and any(labelled):
            prompts = sample_prompts(targets, max_instances=self.max_instances, point_probability=self.point_probability)
            keys = list(zip(prompts.image_index.tolist(), _prompt_tiles(prompts, targets), prompts.has_box.tolist()))
            for key in sorted(set(keys)):
                row, tile, _ = key
                if tile < len(records[row]):  # a tile the teacher has no record of is skipped
                    chosen = torch.tensor([index for index, other in enumerate(keys) if other == key], device=device)
                    groups.append((row, tile, _select(prompts, chosen)))
        for row, row_records in enumerate(records):
            if labelled[row] or not row_records or self.unlabeled_prompts == "none":
                continue
            if self.unlabeled_prompts == "grid":
                for tile, points in self._grid_points(row_records, height, width, device).items():
                    labels = torch.ones(len(points), 1, dtype=torch.int64, device=device)
                    groups.append((row, tile, {"points": points[:, None], "point_labels": labels}))
            elif detections is not None:
                for tile, boxes in self._detected_boxes(detections[row], row_records).items():
                    groups.append((row, tile, {"boxes": boxes}))
        return groups

    def _grid_points(
        self, row_records: Sequence[DecoderRecord], height: int, width: int, device: torch.device
    ) -> dict[int, torch.Tensor]:
        """Up to ``max_instances`` grid points per image, each assigned to the record whose valid region holds it."""
        steps = (torch.arange(self.grid_size, dtype=torch.float32) + 0.5) / self.grid_size
        ys, xs = torch.meshgrid(steps * height, steps * width, indexing="ij")
        candidates = torch.stack([xs.flatten(), ys.flatten()], 1)
        order = torch.randperm(len(candidates))
        by_tile: dict[int, list[torch.Tensor]] = {}
        taken = 0
        for index in order.tolist():
            point = candidates[index]
            tile = _record_at(row_records, float(point[0]), float(point[1]))
            if tile is None:
                continue
            by_tile.setdefault(tile, []).append(point)
            taken += 1
            if taken == self.max_instances:
                break
        return {tile: torch.stack(points).to(device) for tile, points in by_tile.items()}

    def _detected_boxes(
        self, detections: Mapping[str, torch.Tensor], row_records: Sequence[DecoderRecord]
    ) -> dict[int, torch.Tensor]:
        """The detection head's most confident boxes (at most ``max_instances``), by the record holding their centre."""
        boxes, scores = detections["boxes"].detach().float(), detections["scores"].detach()
        keep = (scores >= self.box_threshold).nonzero().flatten()
        keep = keep[scores[keep].argsort(descending=True)][: self.max_instances]
        by_tile: dict[int, list[torch.Tensor]] = {}
        for box in boxes[keep]:
            tile = _record_at(row_records, float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2)
            if tile is not None and float(box[2] - box[0]) >= 1 and float(box[3] - box[1]) >= 1:
                by_tile.setdefault(tile, []).append(box)
        return {tile: torch.stack(items) for tile, items in by_tile.items()}

    # -------------------------------------------------------------- decoding
    def _loop_loss(
        self, head: nn.Module, head_outputs: Mapping[str, Any], decoder: PromptDecoder, prompts: "PromptSet"
    ) -> torch.Tensor:
        """Mean BCE + Dice over every prompt and decode of the loop (all prompts of the batch at once)."""
        size = tuple(head_outputs["input_size"])
        total = head_outputs["embed"].float().sum() * 0.0
        for iteration in range(self.decode_iters + 1):
            teacher_low, target, valid = prompts.teacher_masks(decoder, size)
            student_low, logits = prompts.student_masks(head, head_outputs)
            bce, dice = _masked_bce_dice(logits, target, valid)
            total = total + (self.bce_weight * bce + self.dice_weight * dice).mean()
            if iteration == self.decode_iters:
                break
            points, labels = refinement_points(
                (logits.detach() > 0) & valid, target.bool(), torch.default_generator, self.min_error_pixels
            )
            prompts.add_point(points, labels, student_low.detach(), teacher_low)
        return total / (self.decode_iters + 1)

    @torch.no_grad()
    def agreement(
        self,
        head: nn.Module,
        head_outputs: Mapping[str, Any],
        decoder: PromptDecoder,
        records: Sequence[Sequence[DecoderRecord]],
        prompts: Sequence[tuple[int, int, dict[str, torch.Tensor]]],
    ) -> torch.Tensor:
        """Student-vs-teacher mask IoU (on the valid pixels) of each prompt; ``[P]``.

        Args:
            prompts: (batch row, record, prompt dict in student pixels) groups, as the
                loss draws them.
        """
        if not prompts:
            return torch.zeros(0)
        prompt_set = PromptSet.from_groups(prompts, records)
        _, target, valid = prompt_set.teacher_masks(decoder, tuple(head_outputs["input_size"]))
        _, logits = prompt_set.student_masks(head, head_outputs)
        predicted, target = (logits > 0) & valid, target.bool()
        union = (predicted | target).flatten(1).sum(1).float()
        intersection = (predicted & target).flatten(1).sum(1).float()
        return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))

def _labelled_rows(targets: Mapping[str, Any] | None, batch_size: int) -> list[bool]:
    """Which batch images have labels (none without targets)."""
    if targets is None:
        return [False] * batch_size
    flags = targets.get("has_labels")
    if flags is None:
        return [True] * batch_size
    return [bool(flag) for flag in torch.as_tensor(flags).reshape(-1).tolist()]


def _prompt_tiles(prompts: Prompts, targets: Mapping[str, Any]) -> list[int]:
    """The source image (mosaic tile, index into the sample's frames) of each prompt's instance."""
    frame_index = targets.get("frame_index")
    if frame_index is None or len(prompts) == 0:
        return [0] * len(prompts)
    batch_idx = torch.as_tensor(targets["batch_idx"]).reshape(-1).to(prompts.device)
    # Row of each prompt's instance: its image's rows in order (a stable sort by image), then the instance.
    order = torch.sort(batch_idx, stable=True).indices
    starts = torch.cumsum(torch.bincount(batch_idx, minlength=int(prompts.image_index.max()) + 1), 0)
    starts = torch.cat([starts.new_zeros(1), starts[:-1]])
    rows = order[starts[prompts.image_index] + prompts.instance]
    return torch.as_tensor(frame_index).to(prompts.device)[rows].tolist()


def _select(prompts: Prompts, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prompts ``rows`` (all with a box or all without) as a prompt dict; all-padding point columns dropped."""
    selected: dict[str, torch.Tensor] = {}
    if bool(prompts.has_box[rows].all()):
        selected["boxes"] = prompts.boxes[rows]
    labels = prompts.point_labels[rows]
    used = (labels != PADDING_LABEL).any(dim=0)
    if bool(used.any()):
        selected["points"] = prompts.points[rows][:, used]
        selected["point_labels"] = labels[:, used]
    return selected


def _record_at(records: Sequence[DecoderRecord], x: float, y: float) -> int | None:
    """The record whose valid region in the student input holds ``(x, y)``, or None."""
    for index, record in enumerate(records):
        x0, y0, x1, y1 = record.student_frame.valid
        if x0 <= x < x1 and y0 <= y < y1:
            return index
    return None
