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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.geometry import Frame, warp_features_batch
from vfmkd.models.heads.prompts import PADDING_LABEL, Prompts, add_points, sample_prompts
from vfmkd.ops.masks import refinement_points
from vfmkd.ops.prompt_decoder import PromptDecoder, to_official_coordinates
from vfmkd.registry import LOSSES

__all__ = ["DecoderRecord", "MaskDistillation", "MaskTermPlan", "map_prompt_points", "map_prompt_boxes"]

UNLABELED_PROMPTS = ("grid", "boxes", "none")
#: Input pixels per cell of a SAM decoder's low-resolution mask (the stride-16 embedding upscaled 4x).
LOW_RES_STRIDE = 4


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


@dataclass
class DecoderRecord:
    """One source image of a sample as the teacher saw it.

    Attributes:
        features: the teacher decoder's inputs, ``[1, C, h, w]`` float32 each (teacher frame).
        teacher_frame: original image -> teacher input.
        student_frame: original image -> student input (its ``valid`` is where this record's
            content lies in the student input: one tile of a mosaic).
    """

    features: dict[str, torch.Tensor]
    teacher_frame: Frame
    student_frame: Frame


def map_prompt_points(points: torch.Tensor, record: DecoderRecord) -> torch.Tensor:
    """Student-input points ``[..., 2]`` in the teacher's input (vfmkd coordinates)."""
    flat = points.detach().reshape(-1, 2).cpu().double().numpy()
    mapped = record.teacher_frame.apply_points(record.student_frame.invert_points(flat))
    return torch.from_numpy(np.asarray(mapped, dtype=np.float32)).reshape(points.shape).to(points.device)


def map_prompt_boxes(boxes: torch.Tensor, record: DecoderRecord) -> torch.Tensor:
    """Student-input xyxy boxes ``[N, 4]`` in the teacher's input (vfmkd coordinates)."""
    flat = boxes.detach().reshape(-1, 4).cpu().double().numpy()
    mapped = record.teacher_frame.apply_boxes(record.student_frame.invert_boxes(flat))
    return torch.from_numpy(np.asarray(mapped, dtype=np.float32)).to(boxes.device)


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
            total = head_outputs["embed"].float().sum() * 0.0
            decodes = 0
            for row, tile, prompts in groups:
                value, count = self._group_loss(head, head_outputs, decoder, row, records[row][tile], prompts)
                total = total + value
                decodes += count
            return total / max(decodes, 1)

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
            tiles = _prompt_tiles(prompts, targets)
            for row, tile, has_box in sorted(set(zip(prompts.image_index.tolist(), tiles, prompts.has_box.tolist()))):
                if tile >= len(records[row]):
                    continue
                chosen = [
                    index
                    for index, (r, t, b) in enumerate(zip(prompts.image_index.tolist(), tiles, prompts.has_box.tolist()))
                    if (r, t, b) == (row, tile, has_box)
                ]
                groups.append((row, tile, _select(prompts, torch.tensor(chosen, device=prompts.device))))
        for row, row_records in enumerate(records):
            if labelled[row] or not row_records or self.unlabeled_prompts == "none":
                continue
            if self.unlabeled_prompts == "grid":
                points = self._grid_points(row_records, height, width, device)
                for tile, tile_points in points.items():
                    groups.append((row, tile, {"points": tile_points[:, None], "point_labels": torch.ones(len(tile_points), 1, dtype=torch.int64, device=device)}))
            elif detections is not None:
                for tile, boxes in self._detected_boxes(detections[row], row_records).items():
                    groups.append((row, tile, {"boxes": boxes}))
        return groups

    def _grid_points(self, row_records: Sequence[DecoderRecord], height: int, width: int, device: torch.device) -> dict[int, torch.Tensor]:
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

    def _detected_boxes(self, detections: Mapping[str, torch.Tensor], row_records: Sequence[DecoderRecord]) -> dict[int, torch.Tensor]:
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
    def _group_loss(
        self,
        head: nn.Module,
        head_outputs: Mapping[str, Any],
        decoder: PromptDecoder,
        row: int,
        record: DecoderRecord,
        prompts: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, int]:
        """Summed loss over the group's prompts and decodes, and how many prompt-decodes that was."""
        height, width = head_outputs["input_size"]
        student_prompts = dict(prompts)
        teacher_prompts = self._teacher_prompts(prompts, record)
        total = head_outputs["embed"].float().sum() * 0.0
        count = 0
        for iteration in range(self.decode_iters + 1):
            teacher_low, target, valid = teacher_masks(decoder, record, teacher_prompts, (height, width))
            student_low, logits = student_masks(head, head_outputs, row, student_prompts)
            bce, dice = _masked_bce_dice(logits, target, valid)
            total = total + (self.bce_weight * bce + self.dice_weight * dice).sum()
            count += len(logits)
            if iteration == self.decode_iters:
                break
            points, labels = refinement_points(
                (logits.detach() > 0) & valid, target.bool(), torch.default_generator, self.min_error_pixels
            )
            student_prompts = _with_point(student_prompts, points, labels, student_low.detach())
            teacher_points = map_prompt_points(points, record)
            teacher_prompts = _with_point(
                teacher_prompts, to_official_coordinates(teacher_points), labels, teacher_low[:, :1]
            )
        return total, count

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
        height, width = head_outputs["input_size"]
        ious = []
        for row, tile, group in prompts:
            record = records[row][tile]
            _, target, valid = teacher_masks(decoder, record, self._teacher_prompts(group, record), (height, width))
            _, logits = student_masks(head, head_outputs, row, group)
            predicted, target = (logits > 0) & valid, target.bool()
            union = (predicted | target).flatten(1).sum(1).float()
            ious.append(torch.where(union > 0, (predicted & target).flatten(1).sum(1) / union.clamp(min=1), torch.ones_like(union)))
        return torch.cat(ious) if ious else torch.zeros(0)

    @staticmethod
    def _teacher_prompts(prompts: Mapping[str, torch.Tensor], record: DecoderRecord) -> dict[str, Any]:
        """The prompts in the teacher's input, in the official coordinates its decoder takes."""
        mapped: dict[str, Any] = {}
        if prompts.get("boxes") is not None:
            mapped["boxes"] = to_official_coordinates(map_prompt_boxes(prompts["boxes"], record))
        if prompts.get("points") is not None:
            mapped["points"] = to_official_coordinates(map_prompt_points(prompts["points"], record))
            mapped["point_labels"] = prompts["point_labels"]
        return mapped


@torch.no_grad()
def teacher_masks(
    decoder: PromptDecoder, record: DecoderRecord, prompts: Mapping[str, Any], size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's masks of prompts (teacher frame, official coordinates) in the student's frame.

    Returns:
        ``low_res [N, 1, S / 4, S / 4]`` teacher logits (its next mask input), ``target [N, H,
        W]`` float binary mask and ``valid [N, H, W]`` bool (pixels the teacher saw).
    """
    low_res, _ = decoder.decode(record.features, multimask=False, **_as_decoder_prompts(prompts))
    low_res = low_res[:, :1].float()
    count = len(low_res)
    warped, valid = warp_features_batch(
        low_res, [record.teacher_frame] * count, LOW_RES_STRIDE, [record.student_frame] * count, size, 1
    )
    return low_res, ((warped > 0) & valid).float()[:, 0], valid[:, 0]


def student_masks(
    head: nn.Module, head_outputs: Mapping[str, Any], row: int, prompts: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student head's ``low_res [N, 1, H / 4, W / 4]`` and input-size ``[N, H, W]`` logits of prompts."""
    low_res, _ = head.decode_prompts(head_outputs, row, prompts)
    low_res = low_res[:, :1]
    logits = F.interpolate(low_res.float(), size=tuple(head_outputs["input_size"]), mode="bilinear", align_corners=False)
    return low_res, logits[:, 0]


def _as_decoder_prompts(prompts: Mapping[str, Any]) -> dict[str, Any]:
    """``points`` / ``point_labels`` as the pair :meth:`PromptDecoder.decode` takes; boxes and mask input as they are."""
    out: dict[str, Any] = {}
    if prompts.get("boxes") is not None:
        out["boxes"] = prompts["boxes"]
    if prompts.get("points") is not None:
        out["points"] = (prompts["points"], prompts["point_labels"])
    if prompts.get("mask_input") is not None:
        out["mask_input"] = prompts["mask_input"]
    return out


def _with_point(prompts: dict[str, Any], points: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor) -> dict[str, Any]:
    """The prompts plus one point per prompt (label -1: padding, its point zeroed) and a new mask input.

    Prompts are dicts of ``boxes [N, 4]``, ``points [N, K, 2]`` with ``point_labels [N, K]``
    and ``mask_input [N, 1, h, w]``, any of them absent.
    """
    device = mask_input.device
    labels = labels.to(device, torch.int64)
    points = points.to(device, torch.float32) * (labels != PADDING_LABEL).unsqueeze(1)
    updated = dict(prompts)
    if prompts.get("points") is None:
        updated["points"], updated["point_labels"] = points[:, None], labels[:, None]
    else:
        updated["points"] = torch.cat([prompts["points"].float(), points[:, None]], 1)
        updated["point_labels"] = torch.cat([prompts["point_labels"].to(torch.int64), labels[:, None]], 1)
    updated["mask_input"] = mask_input
    return updated


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
    batch_idx = torch.as_tensor(targets["batch_idx"]).reshape(-1)
    tiles = []
    for image, instance in zip(prompts.image_index.tolist(), prompts.instance.tolist()):
        row = torch.nonzero(batch_idx == image).flatten()[instance]
        tiles.append(int(frame_index[row]))
    return tiles


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
