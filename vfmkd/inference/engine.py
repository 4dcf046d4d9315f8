"""The model behind a :class:`~vfmkd.inference.Predictor`: network outputs and their post-processing.

A predictor letterboxes images itself (the frames say where each input pixel came from)
and hands an engine the collated batch. An engine gives:

- ``forward(batch) -> outputs``: the network's raw outputs for ``batch["images"]``
  (uint8 ``[B, 3, S, S]``, the letterboxed inputs);
- ``postprocess(outputs, batch, prompts=..., **options) -> results``: per image, in
  original pixels (``batch["frames"]``), ``boxes [K, 4]`` xyxy, ``scores [K]``, ``labels
  [K]`` and, with a segmentation head, ``masks`` bool ``[K, H0, W0]``;
- ``has_detector`` / ``promptable``: whether it detects, and whether it answers prompts.

:class:`TorchEngine` runs a vfmkd model in PyTorch. An exported model (onnxruntime) is
another engine with the same three parts, so letterboxing, prompts, drawing and the COCO
results stay one code path.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import nn

from vfmkd.datasets.collate import batch_to_device

__all__ = ["PROMPT_LABEL", "Engine", "TorchEngine", "mask_boxes", "prompt_rows"]

#: Label of a row that answers a prompt (it has no class).
PROMPT_LABEL = -1


class Engine(Protocol):
    """What a predictor needs of the model it runs (see the module doc)."""

    has_detector: bool
    promptable: bool

    def forward(self, batch: Mapping[str, Any]) -> Any: ...

    def postprocess(
        self,
        outputs: Any,
        batch: Mapping[str, Any],
        *,
        prompts: Sequence[Mapping[str, torch.Tensor]] | None,
        conf_threshold: float,
        iou_threshold: float,
        max_det: int,
    ) -> list[dict[str, torch.Tensor]]: ...


class TorchEngine:
    """A vfmkd :class:`~vfmkd.models.unified_model.UnifiedModel` in eval mode on a device.

    Args:
        model: the student (its ``forward`` and ``predict``); moved to ``device``, in eval mode.
        device: where it runs; inputs are moved there.
    """

    def __init__(self, model: nn.Module, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        heads = getattr(model, "heads", {})
        self.has_detector = any(getattr(head, "predicts_boxes", False) for head in heads.values())
        prompted = [name for name, head in heads.items() if getattr(head, "prompted_by_boxes", False)]
        self.prompt_head: str | None = prompted[0] if prompted else None
        self.promptable = self.prompt_head is not None

    @torch.inference_mode()
    def forward(self, batch: Mapping[str, Any]) -> Any:
        """The model's outputs for the batch's uint8 ``images [B, 3, S, S]``."""
        return self.model(batch_to_device(dict(batch), self.device)["images"])

    @torch.inference_mode()
    def postprocess(
        self,
        outputs: Any,
        batch: Mapping[str, Any],
        *,
        prompts: Sequence[Mapping[str, torch.Tensor]] | None = None,
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.7,
        max_det: int = 300,
    ) -> list[dict[str, torch.Tensor]]:
        """Per-image results in original pixels (see the module doc).

        Args:
            outputs: :meth:`forward`'s outputs.
            batch: the collated batch, with ``frames``.
            prompts: None (detections; with a mask head, one mask per detection), or per
                image ``boxes [Nb, 4]`` and ``points [Np, K, 2]`` / ``point_labels [Np, K]``
                in input pixels: then one row per prompt (boxes first), ``masks``,
                ``scores`` the predicted IoU, ``labels`` -1 and ``boxes`` each mask's
                tight box.
            conf_threshold: detections' score floor.
            iou_threshold: NMS IoU.
            max_det: most detections per image (all segmented).
        """
        if prompts is None:
            options = {"conf_threshold": conf_threshold, "iou_threshold": iou_threshold, "max_det": max_det}
            return self.model.predict(outputs, batch, **options, mask_max_det=max_det)
        if self.prompt_head is None:
            raise ValueError("this model has no promptable segmentation head to answer prompts")
        head = self.model.heads[self.prompt_head]
        prompts = [{key: value.to(self.device) for key, value in image.items()} for image in prompts]
        head_outputs = outputs[self.prompt_head]
        # NOTE: box prompts and point prompts are decoded apart, as SAM's predictors take them.
        by_boxes = head.predict(head_outputs, batch, prompts=[{"boxes": image["boxes"]} for image in prompts])
        by_points = head.predict(
            head_outputs,
            batch,
            prompts=[{"points": image["points"], "point_labels": image["point_labels"]} for image in prompts],
        )
        return [prompt_rows(boxes, points) for boxes, points in zip(by_boxes, by_points)]


def prompt_rows(
    by_boxes: Mapping[str, torch.Tensor], by_points: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One image's answers to its box prompts, then its point prompts, as result rows.

    Args:
        by_boxes: ``masks`` bool ``[Nb, H0, W0]`` and ``mask_scores [Nb]`` of the box prompts.
        by_points: the same of the point prompts.
    """
    masks = torch.cat([by_boxes["masks"].cpu(), by_points["masks"].cpu()])
    scores = torch.cat([by_boxes["mask_scores"].float().cpu(), by_points["mask_scores"].float().cpu()])
    return {
        "boxes": mask_boxes(masks),
        "scores": scores,
        "labels": torch.full((len(masks),), PROMPT_LABEL, dtype=torch.int64),
        "masks": masks,
    }


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (pixel edges) of bool masks ``[N, H, W]``: ``[N, 4]`` float64, zeros for an empty mask."""
    rows, columns = masks.any(dim=2), masks.any(dim=1)
    height, width = masks.shape[-2:]

    def edges(occupied: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = occupied.to(torch.uint8).argmax(dim=1)
        last = size - occupied.flip(1).to(torch.uint8).argmax(dim=1)
        return first, last

    x1, x2 = edges(columns, width)
    y1, y2 = edges(rows, height)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).double()
    return torch.where(rows.any(dim=1)[:, None], boxes, torch.zeros_like(boxes))
