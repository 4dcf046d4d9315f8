"""Prompts of prompt-in-the-loop mask distillation, on both sides of the teacher's frames.

The pieces :mod:`vfmkd.distillation.mask_kd` and prompt_miou's teacher side share: a
:class:`DecoderRecord` (one source image as the teacher saw it, with its decoder's input
features and both frames), mapping student-input prompts into a teacher's input
(:func:`map_prompt_points`, :func:`map_prompt_boxes`), :class:`PromptSet` (every prompt of
a batch, decoded by both sides in one call per prompt kind) and :class:`TeacherSegmenter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.geometry import Frame, warp_features_batch
from vfmkd.models.heads.prompts import PADDING_LABEL
from vfmkd.ops.prompt_decoder import PromptDecoder, prompt_count, to_official_coordinates

__all__ = [
    "LOW_RES_STRIDE",
    "DecoderRecord",
    "PromptSet",
    "TeacherSegmenter",
    "map_prompt_boxes",
    "map_prompt_points",
    "teacher_prompts",
]

#: Input pixels per cell of a SAM decoder's low-resolution mask (the stride-16 embedding upscaled 4x).
LOW_RES_STRIDE = 4


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


def teacher_prompts(prompts: Mapping[str, torch.Tensor], record: DecoderRecord) -> dict[str, Any]:
    """The prompts in the teacher's input, in the official coordinates its decoder takes."""
    mapped: dict[str, Any] = {}
    if prompts.get("boxes") is not None:
        mapped["boxes"] = to_official_coordinates(map_prompt_boxes(prompts["boxes"], record))
    if prompts.get("points") is not None:
        mapped["points"] = to_official_coordinates(map_prompt_points(prompts["points"], record))
        mapped["point_labels"] = prompts["point_labels"]
    return mapped


class PromptSet:
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
    ) -> "PromptSet":
        """From (batch row, record, prompt dict in student pixels) groups."""
        unique: dict[tuple[int, int], int] = {}
        rows, record_index, has_box, boxes, points, labels = [], [], [], [], [], []
        slots = max(int(group["points"].shape[1]) if group.get("points") is not None else 0 for _, _, group in groups)
        for row, tile, group in groups:
            count = prompt_count(group)
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
    def teacher_masks(
        self, decoder: PromptDecoder, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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

    def add_point(
        self, points: torch.Tensor, labels: torch.Tensor, student_low: torch.Tensor, teacher_low: torch.Tensor
    ) -> None:
        """One more point per prompt (label -1: none) on both sides, and each side's previous mask as input."""
        teacher_points = _map_by_record(points[:, None].float(), self.record_index, self.records, map_prompt_points)
        self.student = _with_point(self.student, points, labels, student_low)
        self.teacher = _with_point(self.teacher, teacher_points[:, 0], labels, teacher_low)


def _map_by_record(
    values: torch.Tensor, record_index: torch.Tensor, records: list[DecoderRecord], mapping: Any
) -> torch.Tensor:
    """Student-input coordinates mapped into each prompt's teacher input (``mapping`` per record)."""
    mapped = torch.zeros_like(values)
    for index in record_index.unique().tolist():
        rows = (record_index == index).nonzero().flatten()
        if values[rows].numel():
            mapped[rows] = mapping(values[rows], records[index])
    return mapped


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
    def __call__(
        self, batch: Mapping[str, Any], prompts: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        images = batch["images"]
        device = images.device
        records = self.runtime.decoder_records(dict(batch), device, self.teacher)
        decoder = self.runtime.prompt_decoder(self.teacher, device)
        size = tuple(images.shape[-2:])
        results = []
        for row, image_prompts in enumerate(prompts):
            record = records[row][0]
            mapped = teacher_prompts(image_prompts, record)
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


def _with_point(
    prompts: dict[str, Any], points: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor
) -> dict[str, Any]:
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
