"""The detector as an ONNX graph: an image batch in, decoded boxes and scores out.

:class:`DetectorGraph` runs backbone, neck and one detection head of a deployed student
(:func:`~vfmkd.export.fuse.deploy_model`) and decodes in the graph:

- ``yolo_head``: ``images [B, 3, S, S]`` -> ``boxes [B, A, 4]`` (xyxy input pixels, every
  anchor) and ``scores [B, A, C]`` (class probabilities), before NMS
  (:meth:`~vfmkd.models.heads.yolo_head.YOLOHead.decode`); with ``nms``, ONNX
  ``NonMaxSuppression`` in the graph instead: ``images``, ``conf_threshold [1]``,
  ``iou_threshold [1]`` -> ``detections [N, 7]`` (image, x1, y1, x2, y2, score, label),
  each anchor's best class only, at most ``max_det`` per class and image, as
  :func:`~vfmkd.models.heads.yolo_head.select_detections` selects (the runtime keeps the
  best ``max_det`` of each image);
- ``rtdetr_head``: ``images`` -> ``boxes [B, K, 4]``, ``scores [B, K]``, ``labels [B, K]``,
  the top ``K = max_det`` (query, class) pairs
  (:meth:`~vfmkd.models.heads.rtdetr_head.RTDETRHead.decode`); no NMS to do.

Images are float RGB in ``[0, 1]``, letterboxed to ``S x S`` (content centred, grey 114).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vfmkd.models.heads.rtdetr_head import RTDETRHead
from vfmkd.models.heads.yolo_head import YOLOHead

__all__ = ["DETECTION_HEADS", "DetectorGraph", "non_max_suppression"]

#: Head types with an exported detector graph.
DETECTION_HEADS = {"yolo_head": YOLOHead, "rtdetr_head": RTDETRHead}


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (opset 10+): per image and class, greedy NMS; eager: torchvision."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        max_per_class: torch.Tensor,
        iou_threshold: torch.Tensor,
        score_threshold: torch.Tensor,
    ) -> torch.Tensor:
        from torchvision.ops import nms

        selected = []
        for image in range(scores.shape[0]):
            for label in range(scores.shape[1]):
                image_scores = scores[image, label]
                candidates = (image_scores > score_threshold).nonzero().flatten()
                keep = nms(boxes[image, candidates], image_scores[candidates], float(iou_threshold))
                keep = candidates[keep][: int(max_per_class)]
                selected.append(torch.stack([torch.full_like(keep, image), torch.full_like(keep, label), keep], 1))
        return torch.cat(selected) if selected else boxes.new_zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, max_per_class: Any, iou_threshold: Any, score_threshold: Any) -> Any:
        inputs = (boxes, scores, max_per_class, iou_threshold, score_threshold)
        return g.op("NonMaxSuppression", *inputs, center_point_box_i=0)


def non_max_suppression(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: torch.Tensor,
    score_threshold: torch.Tensor,
    max_per_class: int,
) -> torch.Tensor:
    """Indices kept by per-image, per-class NMS, exported as ONNX ``NonMaxSuppression``.

    Args:
        boxes: ``[B, A, 4]`` xyxy.
        scores: ``[B, C, A]``.
        iou_threshold: ``[1]``: a box overlapping a better one of its class by more is dropped.
        score_threshold: ``[1]``: boxes scoring at most this are dropped.
        max_per_class: most boxes kept per image and class.

    Returns:
        ``[N, 3]`` int64 rows (image, class, anchor).
    """
    limit = torch.tensor([max_per_class], dtype=torch.int64)
    return _NonMaxSuppression.apply(boxes, scores, limit, iou_threshold.reshape(1), score_threshold.reshape(1))


class DetectorGraph(nn.Module):
    """Backbone, neck and one detection head, decoded (see the module doc).

    Args:
        model: the deployed student.
        head_name: its detection head.
        max_det: DETR: pairs kept per image; YOLO with ``nms``: boxes kept per class and image.
        nms: YOLO: NMS in the graph.
    """

    def __init__(self, model: nn.Module, head_name: str, *, max_det: int = 300, nms: bool = False) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.neck = model.neck
        self.head = model.heads[head_name]
        self.max_det = int(max_det)
        self.nms = bool(nms) and isinstance(self.head, YOLOHead)

    @property
    def input_names(self) -> list[str]:
        return ["images", "conf_threshold", "iou_threshold"] if self.nms else ["images"]

    @property
    def output_names(self) -> list[str]:
        if self.nms:
            return ["detections"]
        if isinstance(self.head, RTDETRHead):
            return ["boxes", "scores", "labels"]
        return ["boxes", "scores"]

    def parameter_count(self) -> int:
        """Parameters of the backbone, the neck and the head."""
        return sum(parameter.numel() for parameter in self.parameters())

    def forward(self, images: torch.Tensor, *thresholds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """See the module doc for each head's outputs."""
        outputs = self.head(self.neck(self.backbone(images)))
        if isinstance(self.head, RTDETRHead):
            return self.head.decode(outputs, self.max_det)
        boxes, probabilities = self.head.decode(outputs)
        if not self.nms:
            return boxes, probabilities
        conf_threshold, iou_threshold = thresholds
        best, labels = probabilities.max(dim=-1)
        # NOTE: each anchor's best class only (what select_detections does without multi_label).
        single = torch.nn.functional.one_hot(labels, probabilities.shape[-1]).to(probabilities.dtype) * best[..., None]
        selected = non_max_suppression(boxes, single.transpose(1, 2), iou_threshold, conf_threshold, self.max_det)
        image, label, anchor = selected.unbind(1)
        rows = [image.to(boxes.dtype)[:, None], boxes[image, anchor], single[image, anchor, label][:, None]]
        return (torch.cat([*rows, label.to(boxes.dtype)[:, None]], dim=1),)
