"""YOLOv8 decoupled, anchor-free detection head with distribution focal box regression.

For each pyramid level, a box branch (two 3x3 ConvBNAct, then a 1x1 convolution to
``4 * reg_max`` logits: a distribution over distances from the cell centre to each box side)
and a class branch (two 3x3 ConvBNAct, then a 1x1 convolution to class logits). Box distances
are the expectation of the softmax distribution (GFL, arXiv:2006.04388). Architecture as in
YOLOv8; written from its description, without Ultralytics code.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from vfmkd.models.backbones.yolov8 import ConvBNAct
from vfmkd.models.heads.base import BaseHead, MapSpec, has_labels_mask, original_frames
from vfmkd.models.heads.yolo_loss import YOLOv8DetectionLoss
from vfmkd.ops.boxes import batched_nms, distance_to_bbox, make_anchors
from vfmkd.registry import HEADS

__all__ = ["DistributionIntegral", "YOLOHead", "boxes_to_original", "select_detections"]


class DistributionIntegral(nn.Module):
    """Expected distance of a softmax distribution over bins ``0 .. reg_max - 1``.

    The bin values are a frozen parameter (``projection``, shaped like a 1x1 convolution
    weight ``[1, reg_max, 1, 1]``) so that YOLOv8 checkpoints, which store them, load
    one-to-one and parameter counts match the published ones.

    Args:
        reg_max: Number of bins.
    """

    def __init__(self, reg_max: int = 16) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.projection = nn.Parameter(
            torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1), requires_grad=False
        )

    def forward(self, distributions: torch.Tensor) -> torch.Tensor:
        """Map ``[..., 4 * reg_max]`` logits to ``[..., 4]`` expected distances (in bins)."""
        probabilities = distributions.unflatten(-1, (4, self.reg_max)).softmax(dim=-1)
        return probabilities @ self.projection.view(self.reg_max).to(probabilities.dtype)


def _branch(in_channels: int, hidden_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        ConvBNAct(in_channels, hidden_channels, 3),
        ConvBNAct(hidden_channels, hidden_channels, 3),
        nn.Conv2d(hidden_channels, out_channels, 1),
    )


@HEADS.register("yolo_head")
class YOLOHead(BaseHead):
    """YOLOv8 detection head over ``p3``, ``p4``, ``p5``.

    ``forward`` returns raw per-level maps in both train and eval mode; ``loss`` and
    ``predict`` consume them.

    Args:
        feature_dims: Channels of every input level (e.g. the neck's ``feature_dims``).
        feature_strides: Stride of every input level.
        num_classes: Number of object classes.
        in_features: Levels the head runs on, finest first.
        reg_max: Distance bins per box side.
        box_gain: Loss weight of the CIoU term.
        cls_gain: Loss weight of the classification term.
        dfl_gain: Loss weight of the distribution focal term.
        topk: Positives per ground-truth box in the task-aligned assigner.

    Example:
        >>> head = YOLOHead({"p3": 64, "p4": 128, "p5": 256}, {"p3": 8, "p4": 16, "p5": 32}, num_classes=3)
        >>> maps = head({"p3": torch.zeros(1, 64, 8, 8), "p4": torch.zeros(1, 128, 4, 4),
        ...              "p5": torch.zeros(1, 256, 2, 2)})
        >>> [tuple(m.shape) for m in maps]
        [(1, 67, 8, 8), (1, 67, 4, 4), (1, 67, 2, 2)]
    """

    loss_prefix = "det/"
    evaluators = ("coco_bbox",)
    predicts_boxes = True

    def __init__(
        self,
        feature_dims: Mapping[str, int],
        feature_strides: Mapping[str, int],
        num_classes: int = 80,
        *,
        in_features: Sequence[str] = ("p3", "p4", "p5"),
        reg_max: int = 16,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
        topk: int = 10,
    ) -> None:
        super().__init__()
        missing = [level for level in in_features if level not in feature_dims or level not in feature_strides]
        if missing:
            raise ValueError(
                f"yolo_head runs on levels {list(in_features)} but the features lack {missing}; "
                f"available: {sorted(feature_dims)}"
            )
        if num_classes < 1:
            raise ValueError(f"yolo_head needs num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.in_features = tuple(in_features)
        self.strides = tuple(int(feature_strides[level]) for level in self.in_features)
        in_channels = [int(feature_dims[level]) for level in self.in_features]

        box_channels = max(16, in_channels[0] // 4, 4 * reg_max)
        class_channels = max(in_channels[0], min(num_classes, 100))
        self.box_branches = nn.ModuleList(_branch(c, box_channels, 4 * reg_max) for c in in_channels)
        self.class_branches = nn.ModuleList(_branch(c, class_channels, num_classes) for c in in_channels)
        self.integral = DistributionIntegral(reg_max)
        self.criterion = YOLOv8DetectionLoss(
            num_classes, reg_max, box_gain=box_gain, cls_gain=cls_gain, dfl_gain=dfl_gain, topk=topk
        )
        # Anchor grids per (level sizes, device, dtype); derived data, rebuilt on demand.
        self._anchor_cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_bias()

    @torch.no_grad()
    def reset_bias(self) -> None:
        """YOLOv8's prior: box logits 1.0; class logits for ~5 objects per 640 px image."""
        for box_branch, class_branch, stride in zip(self.box_branches, self.class_branches, self.strides):
            box_branch[-1].bias.fill_(1.0)
            class_branch[-1].bias.fill_(math.log(5 / self.num_classes / (640 / stride) ** 2))

    @property
    def map_specs(self) -> dict[str, MapSpec]:
        """Each level's class logits, ``cls_<level>``: the teacher's scores a student can learn
        from on unlabelled images (response distillation, e.g. with ``bce``)."""
        return {f"cls_{level}": (self.num_classes, stride) for level, stride in zip(self.in_features, self.strides)}

    def named_maps(self, outputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        box_channels = 4 * self.reg_max
        return {f"cls_{level}": output[:, box_channels:] for level, output in zip(self.in_features, outputs)}

    def forward(self, features: Mapping[str, torch.Tensor], **inputs: Any) -> list[torch.Tensor]:
        """Run both branches on every level.

        Args:
            features: Level name to ``[B, C_level, H_level, W_level]`` map.
            **inputs: Other batch inputs (prompts, ...); unused by this head.

        Returns:
            One ``[B, 4 * reg_max + num_classes, H_level, W_level]`` map per level of
            ``in_features``: box-distance logits first, then class logits.
        """
        return [
            torch.cat((box_branch(features[level]), class_branch(features[level])), dim=1)
            for level, box_branch, class_branch in zip(self.in_features, self.box_branches, self.class_branches)
        ]

    def anchors(self, outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor centres for the sizes of ``outputs``.

        Args:
            outputs: Per-level maps ``[B, *, H_level, W_level]``.

        Returns:
            ``anchor_points [A, 2]`` in grid units and ``stride_tensor [A, 1]``, float32.
        """
        sizes = tuple((int(o.shape[-2]), int(o.shape[-1])) for o in outputs)
        device = outputs[0].device
        key = (sizes, str(device))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = make_anchors(sizes, self.strides, 0.5, device=device, dtype=torch.float32)
        return self._anchor_cache[key]

    def split_outputs(self, outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flatten per-level maps into anchor-major tensors (float32).

        Args:
            outputs: Per-level maps ``[B, 4 * reg_max + C, H_level, W_level]``.

        Returns:
            ``distributions [B, A, 4 * reg_max]`` and ``logits [B, A, C]``.
        """
        if len(outputs) != len(self.strides):
            raise ValueError(f"yolo_head expects {len(self.strides)} level maps, got {len(outputs)}")
        flat = torch.cat([o.flatten(2) for o in outputs], dim=2).float().transpose(1, 2)  # [B, A, no]
        distributions, logits = flat.split((4 * self.reg_max, self.num_classes), dim=-1)
        return distributions, logits

    def decode_boxes(
        self, distributions: torch.Tensor, anchor_points: torch.Tensor
    ) -> torch.Tensor:
        """Decode distance distributions into ``xyxy`` boxes in grid units.

        Args:
            distributions: ``[B, A, 4 * reg_max]`` logits.
            anchor_points: ``[A, 2]`` anchor centres in grid units.

        Returns:
            ``[B, A, 4]`` boxes in grid units of each anchor's level.
        """
        return distance_to_bbox(self.integral(distributions), anchor_points)

    def loss(self, outputs: Sequence[torch.Tensor], targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Detection loss.

        Args:
            outputs: The list returned by :meth:`forward`.
            targets: ``batch_idx [N]`` int64 image index, ``cls [N]`` int64 class,
                ``boxes [N, 4]`` ``xyxy`` in input pixels, optionally ``has_labels [B]``
                (the classification term of an image without labels is left out).

        Returns:
            ``det/box``, ``det/cls``, ``det/dfl``: scalar float32 tensors, gains applied,
            averaged per image; the total loss is their sum.
        """
        # NOTE: the loss runs in float32 even inside an autocast region (decoding and CIoU are
        # precision-sensitive); the level maps are cast in split_outputs.
        with torch.autocast(device_type=outputs[0].device.type, enabled=False):
            distributions, logits = self.split_outputs(outputs)
            anchor_points, stride_tensor = self.anchors(outputs)
            pred_boxes = self.decode_boxes(distributions, anchor_points)
            labelled = has_labels_mask(targets, logits.shape[0], logits.device)
            return self.criterion(
                distributions, logits, pred_boxes, anchor_points, stride_tensor, targets, labelled=labelled
            )

    def decode(self, outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every anchor's box and class probabilities, before any selection (what an exported graph gives).

        Args:
            outputs: The list returned by :meth:`forward`.

        Returns:
            ``boxes [B, A, 4]`` xyxy input pixels, clipped to the input, and
            ``probabilities [B, A, C]`` (sigmoid), float32.
        """
        with torch.autocast(device_type=outputs[0].device.type, enabled=False):
            distributions, logits = self.split_outputs(outputs)
            anchor_points, stride_tensor = self.anchors(outputs)
            boxes = self.decode_boxes(distributions, anchor_points) * stride_tensor  # [B, A, 4]
        input_height = outputs[0].shape[-2] * self.strides[0]
        input_width = outputs[0].shape[-1] * self.strides[0]
        # NOTE: clamp per coordinate and stack (no in-place writes), so the decoding traces into ONNX.
        x1, y1, x2, y2 = boxes.unbind(-1)
        boxes = torch.stack(
            (x1.clamp(0, input_width), y1.clamp(0, input_height), x2.clamp(0, input_width), y2.clamp(0, input_height)),
            dim=-1,
        )
        return boxes, logits.sigmoid()

    @torch.no_grad()
    def predict(
        self,
        outputs: Sequence[torch.Tensor],
        batch: Mapping[str, Any] | None = None,
        *,
        conf_threshold: float = 0.001,
        iou_threshold: float = 0.7,
        max_det: int = 300,
        multi_label: bool = False,
        max_candidates: int = 30000,
    ) -> list[dict[str, torch.Tensor]]:
        """Decode boxes and apply class-aware non-maximum suppression (:meth:`decode`, then
        :func:`select_detections`, whose arguments these are).

        Returns:
            One dict per image with ``boxes [K, 4]`` ``xyxy`` (clipped to the image): float32
            input pixels without a batch, float64 original-image pixels (on the CPU) with
            one; ``scores [K]`` and ``labels [K]`` int64, sorted by decreasing score.
        """
        boxes, probabilities = self.decode(outputs)
        return select_detections(
            boxes,
            probabilities,
            batch,
            conf_threshold=conf_threshold,
            iou_threshold=iou_threshold,
            max_det=max_det,
            multi_label=multi_label,
            max_candidates=max_candidates,
        )


def select_detections(
    boxes: torch.Tensor,
    probabilities: torch.Tensor,
    batch: Mapping[str, Any] | None = None,
    *,
    conf_threshold: float = 0.001,
    iou_threshold: float = 0.7,
    max_det: int = 300,
    multi_label: bool = False,
    max_candidates: int = 30000,
) -> list[dict[str, torch.Tensor]]:
    """Detections of decoded anchors: score threshold, class-aware NMS, the best per image.

    Shared by :meth:`YOLOHead.predict` and the onnxruntime engine, which runs the exported
    graph (:meth:`YOLOHead.decode`'s outputs) and selects here.

    Args:
        boxes: ``[B, A, 4]`` xyxy input pixels.
        probabilities: ``[B, A, C]`` class probabilities.
        batch: The collated batch; with its ``frames``, boxes are mapped back to the
            original images.
        conf_threshold: Keep boxes whose class probability exceeds this.
        iou_threshold: NMS IoU threshold, within a class.
        max_det: Most detections kept per image.
        multi_label: Let an anchor yield one box per class above the threshold (what
            YOLOv8's COCO validation does) instead of its best class only.
        max_candidates: Most boxes per image entering NMS, highest scores first.

    Returns:
        One dict per image with ``boxes [K, 4]`` ``xyxy``: float32 input pixels without a
        batch, float64 original-image pixels (on the CPU) with one; ``scores [K]`` and
        ``labels [K]`` int64, sorted by decreasing score.
    """
    batch_size, _, num_classes = probabilities.shape
    if multi_label:
        image_index, anchor_index, labels = (probabilities > conf_threshold).nonzero(as_tuple=True)
        scores = probabilities[image_index, anchor_index, labels]
    else:
        best_scores, best_labels = probabilities.max(dim=-1)
        image_index, anchor_index = (best_scores > conf_threshold).nonzero(as_tuple=True)
        scores, labels = best_scores[image_index, anchor_index], best_labels[image_index, anchor_index]
    candidates = (image_index, boxes[image_index, anchor_index], scores, labels)

    candidates = _select(candidates, _top_per_image(image_index, scores, max_candidates))
    image_index, candidate_boxes, scores, labels = candidates
    keep = batched_nms(candidate_boxes, scores, image_index * num_classes + labels, iou_threshold)
    keep = keep[_top_per_image(image_index[keep], scores[keep], max_det)]
    image_index, candidate_boxes, scores, labels = _select(candidates, keep)

    # _top_per_image groups detections by image, each group sorted by decreasing score.
    counts = torch.bincount(image_index, minlength=batch_size).tolist()
    results = [
        {"boxes": image_boxes, "scores": image_scores, "labels": image_labels.long()}
        for image_boxes, image_scores, image_labels in zip(
            candidate_boxes.split(counts), scores.split(counts), labels.split(counts)
        )
    ]
    frames = original_frames(batch, batch_size)
    if frames is not None:
        for result, frame in zip(results, frames):
            result["boxes"] = boxes_to_original(result["boxes"], frame)
    return results


def boxes_to_original(boxes: torch.Tensor, frame: Any) -> torch.Tensor:
    """``[K, 4]`` xyxy input-pixel boxes mapped through ``frame`` to the original image, clipped.

    Returns:
        ``[K, 4]`` float64 CPU tensor (the precision COCO scoring uses).
    """
    original = np.asarray(frame.invert_boxes(boxes.detach().float().cpu().numpy().reshape(-1, 4)), dtype=np.float64)
    height, width = frame.source_size
    original[:, [0, 2]] = original[:, [0, 2]].clip(0, width)
    original[:, [1, 3]] = original[:, [1, 3]].clip(0, height)
    return torch.from_numpy(original)


def _select(tensors: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(tensor[index] for tensor in tensors)


def _top_per_image(image_index: torch.Tensor, scores: torch.Tensor, limit: int) -> torch.Tensor:
    """Indices of the ``limit`` best scores of each image, grouped by image, best first.

    Args:
        image_index: ``[N]`` int64 image of each item.
        scores: ``[N]`` scores.
        limit: Most items kept per image.

    Returns:
        ``[K]`` int64 indices into the inputs.
    """
    by_score = torch.argsort(scores, descending=True, stable=True)
    by_image = by_score[torch.argsort(image_index[by_score], stable=True)]
    sorted_images = image_index[by_image]
    counts = torch.bincount(sorted_images)
    first_of_image = torch.cumsum(counts, dim=0) - counts
    rank = torch.arange(sorted_images.numel(), device=scores.device) - first_of_image[sorted_images]
    return by_image[rank < limit]
