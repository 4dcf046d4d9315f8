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

__all__ = [
    "DecoderRecord",
    "MaskDistillation",
    "MaskTermPlan",
    "TeacherSegmenter",
    "map_prompt_boxes",
    "map_prompt_points",
]

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
            # NOTE: a zero-weighted tie gives the head's trainable parameters an exact zero
            # gradient when no prompt was drawn (DDP needs every one to get one each step).
            total = 0.0 * sum(p.float().sum() for p in head.parameters() if p.requires_grad)
            total = total + 0.0 * head_outputs["embed"].float().sum()
            if not groups:
                return total
            prompt_set = _PromptSet.from_groups(groups, records)
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
    def _loop_loss(
        self, head: nn.Module, head_outputs: Mapping[str, Any], decoder: PromptDecoder, prompts: "_PromptSet"
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
        prompt_set = _PromptSet.from_groups(prompts, records)
        _, target, valid = prompt_set.teacher_masks(decoder, tuple(head_outputs["input_size"]))
        _, logits = prompt_set.student_masks(head, head_outputs)
        predicted, target = (logits > 0) & valid, target.bool()
        union = (predicted | target).flatten(1).sum(1).float()
        intersection = (predicted & target).flatten(1).sum(1).float()
        return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))

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


class _PromptSet:
    """Every prompt of a batch for the loop: student-input and teacher-input coordinates side by side.

    Decoding goes by kind (box prompts apart from point prompts, as the official predictors
    take them): one student and one teacher decoder call per kind, whatever the batch size.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        record_index: torch.Tensor,
        records: list[DecoderRecord],
        has_box: torch.Tensor,
        student: dict[str, torch.Tensor],
        teacher: dict[str, torch.Tensor],
    ) -> None:
        self.rows, self.record_index, self.records, self.has_box = rows, record_index, records, has_box
        self.student, self.teacher = student, teacher  # boxes [P, 4], points [P, K, 2], point_labels [P, K], mask_input
        self.teacher_frames = [records[index].teacher_frame for index in record_index.tolist()]
        self.student_frames = [records[index].student_frame for index in record_index.tolist()]
        names = sorted(records[0].features)
        self.features = {name: torch.cat([record.features[name] for record in records]) for name in names}

    @classmethod
    def from_groups(
        cls, groups: Sequence[tuple[int, int, Mapping[str, torch.Tensor]]], records: Sequence[Sequence[DecoderRecord]]
    ) -> "_PromptSet":
        """From (batch row, record, prompt dict in student pixels) groups."""
        unique: dict[tuple[int, int], int] = {}
        rows, record_index, has_box, boxes, points, labels = [], [], [], [], [], []
        slots = max(int(group["points"].shape[1]) if group.get("points") is not None else 0 for _, _, group in groups)
        for row, tile, group in groups:
            count = _prompt_rows(group)
            device = next(iter(group.values())).device
            index = unique.setdefault((row, tile), len(unique))
            rows += [row] * count
            record_index += [index] * count
            has_box += [group.get("boxes") is not None] * count
            boxes.append(group["boxes"].float() if group.get("boxes") is not None else torch.zeros(count, 4, device=device))
            group_points = group.get("points", torch.zeros(count, 0, 2, device=device)).float()
            group_labels = group.get("point_labels", torch.zeros(count, 0, dtype=torch.int64, device=device)).long()
            pad = slots - group_points.shape[1]
            points.append(F.pad(group_points, (0, 0, 0, pad)))
            labels.append(F.pad(group_labels, (0, pad), value=PADDING_LABEL))
        flat_records = [records[row][tile] for (row, tile) in unique]
        device = boxes[0].device
        record_tensor = torch.tensor(record_index, dtype=torch.int64, device=device)
        student = {"boxes": torch.cat(boxes), "points": torch.cat(points), "point_labels": torch.cat(labels)}
        teacher = {
            "boxes": _map_by_record(student["boxes"], record_tensor, flat_records, map_prompt_boxes),
            "points": _map_by_record(student["points"], record_tensor, flat_records, map_prompt_points),
            "point_labels": student["point_labels"],
        }
        return cls(
            torch.tensor(rows, dtype=torch.int64, device=device),
            record_tensor,
            flat_records,
            torch.tensor(has_box, dtype=torch.bool, device=device),
            student,
            teacher,
        )

    def _by_kind(self, side: dict[str, torch.Tensor], official: bool) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """(prompt rows, decoder prompts) per kind; all-padding point columns dropped."""
        kinds = []
        for has_box in self.has_box.unique().tolist():
            rows = (self.has_box == has_box).nonzero().flatten()
            prompts: dict[str, Any] = {}
            shift = to_official_coordinates if official else (lambda value: value)
            if has_box:
                prompts["boxes"] = shift(side["boxes"][rows])
            labels = side["point_labels"][rows]
            used = (labels != PADDING_LABEL).any(dim=0)
            if bool(used.any()):
                prompts["points"] = shift(side["points"][rows][:, used])
                prompts["point_labels"] = labels[:, used]
            if side.get("mask_input") is not None:
                prompts["mask_input"] = side["mask_input"][rows]
            kinds.append((rows, prompts))
        return kinds

    @torch.no_grad()
    def teacher_masks(self, decoder: PromptDecoder, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's low-res logits ``[P, 1, S / 4, S / 4]``, and its binary masks ``[P, H, W]``
        with their valid pixels in the student's frame."""
        low_res = None
        for rows, prompts in self._by_kind(self.teacher, official=True):
            decoded, _ = decoder.decode(
                self.features, image_index=self.record_index[rows], multimask=False, **_as_decoder_prompts(prompts)
            )
            if low_res is None:
                low_res = decoded.new_zeros((len(self.rows), 1, *decoded.shape[-2:]), dtype=torch.float32)
            low_res[rows] = decoded[:, :1].float()
        warped, valid = warp_features_batch(low_res, self.teacher_frames, LOW_RES_STRIDE, self.student_frames, size, 1)
        return low_res, ((warped > 0) & valid).float()[:, 0], valid[:, 0]

    def student_masks(self, head: nn.Module, head_outputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's low-res logits ``[P, 1, H / 4, W / 4]`` and input-size logits ``[P, H, W]``."""
        parts, order = [], []
        for rows, prompts in self._by_kind(self.student, official=False):
            decoded, _ = head.decode_prompts(head_outputs, self.rows[rows], prompts)
            parts.append(decoded[:, :1])
            order.append(rows)
        low_res = torch.cat(parts)[torch.cat(order).argsort()]
        size = tuple(head_outputs["input_size"])
        logits = F.interpolate(low_res.float(), size=size, mode="bilinear", align_corners=False)
        return low_res, logits[:, 0]

    def add_point(self, points: torch.Tensor, labels: torch.Tensor, student_low: torch.Tensor, teacher_low: torch.Tensor) -> None:
        """One more point per prompt (label -1: none) on both sides, and each side's previous mask as input."""
        teacher_points = _map_by_record(points[:, None].float(), self.record_index, self.records, map_prompt_points)
        self.student = _with_point(self.student, points, labels, student_low)
        self.teacher = _with_point(self.teacher, teacher_points[:, 0], labels, teacher_low)


def _map_by_record(values: torch.Tensor, record_index: torch.Tensor, records: list[DecoderRecord], mapping: Any) -> torch.Tensor:
    """Student-input coordinates mapped into each prompt's teacher input (``mapping`` per record)."""
    mapped = torch.zeros_like(values)
    for index in record_index.unique().tolist():
        rows = (record_index == index).nonzero().flatten()
        if values[rows].numel():
            mapped[rows] = mapping(values[rows], records[index])
    return mapped


def _prompt_rows(prompts: Mapping[str, torch.Tensor]) -> int:
    for key in ("boxes", "points", "mask_input"):
        if prompts.get(key) is not None:
            return int(prompts[key].shape[0])
    return 0


class TeacherSegmenter:
    """A mask term's teacher as :class:`~vfmkd.evaluation.miou.PromptMIoUEvaluator`'s ``teacher_segment``.

    Prompts come in student-input pixels (with the teacher's own previous ``low_res`` as
    ``mask_input``); the teacher decodes them on its features of the batch (validation
    store records when the batch has them, else a live pass) and its mask logits come back
    in the student's input frame (``-100`` where the teacher saw nothing).

    Args:
        runtime: the distiller's :class:`~vfmkd.distillation.teacher_runtime.TeacherRuntime`.
        teacher: the teacher's key.
    """

    def __init__(self, runtime: Any, teacher: str) -> None:
        self.runtime = runtime
        self.teacher = teacher

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any], prompts: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        images = batch["images"]
        device = images.device
        records = self.runtime.decoder_records(dict(batch), device, self.teacher)
        decoder = self.runtime.prompt_decoder(self.teacher, device)
        size = tuple(images.shape[-2:])
        results = []
        for row, image_prompts in enumerate(prompts):
            record = records[row][0]
            mapped = MaskDistillation._teacher_prompts(image_prompts, record)
            if image_prompts.get("mask_input") is not None:
                mapped["mask_input"] = image_prompts["mask_input"]
            low_res, _ = decoder.decode(record.features, multimask=False, **_as_decoder_prompts(mapped))
            low_res = low_res[:, :1].float()
            count = len(low_res)
            warped, valid = warp_features_batch(
                low_res, [record.teacher_frame] * count, LOW_RES_STRIDE, [record.student_frame] * count, size, 1
            )
            results.append({"masks": warped[:, 0].masked_fill(~valid[:, 0], -100.0), "low_res": low_res})
        return results


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
