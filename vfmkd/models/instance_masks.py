"""Instance segmentation from a detector's boxes: each detection prompts a box-promptable mask head.

A model with a head that predicts boxes (:attr:`~vfmkd.models.heads.base.BaseHead.predicts_boxes`,
e.g. ``yolo_head``) and a head that answers box prompts
(:attr:`~vfmkd.models.heads.base.BaseHead.prompted_by_boxes`, e.g. ``sam_mask_head``)
segments every detection when ``predict`` is called without ``prompts``:

1. the detector's results are cut to the ``mask_max_det`` highest-scoring detections of
   each image (:func:`top_detections`), so every per-detection entry stays aligned with
   the masks;
2. their boxes, in original pixels when the batch has frames, are mapped back into
   network-input pixels through each image's frame (:func:`box_prompts`: ``Frame.apply_boxes``,
   the inverse of the detector's ``Frame.invert_boxes``);
3. the mask head answers them: one mask per detection.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from vfmkd.models.heads.base import original_frames

__all__ = ["DEFAULT_MASK_MAX_DET", "box_prompts", "top_detections"]

#: Detections segmented per image by default: COCO's 100 detections per image.
DEFAULT_MASK_MAX_DET = 100


def top_detections(detections: Mapping[str, Any], limit: int | None) -> dict[str, Any]:
    """One image's ``limit`` highest-scoring detections, best first.

    Every per-detection entry (a tensor with one row per entry of ``scores``: ``boxes``,
    ``scores``, ``labels``, ...) is restricted and ordered alike; other entries are kept
    as they are. Ties keep the detector's order.

    Args:
        detections: one image's detector results, with ``scores [K]``.
        limit: most detections kept (None: all, only reordered).

    Returns:
        A new dict with ``min(K, limit)`` rows per per-detection entry.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"mask_max_det must be >= 0 or None, got {limit}")
    scores = detections["scores"]
    count = int(scores.shape[0])
    order = torch.argsort(scores.detach(), descending=True, stable=True)[:limit]
    return {
        key: value[order.to(value.device)] if torch.is_tensor(value) and value.dim() and value.shape[0] == count else value
        for key, value in detections.items()
    }


def box_prompts(
    detections: Sequence[Mapping[str, Any]],
    batch: Mapping[str, Any] | None,
    device: torch.device | str,
) -> list[dict[str, torch.Tensor]]:
    """Box prompts in network-input pixels from per-image detections.

    Args:
        detections: per image ``boxes [K, 4]`` xyxy: original pixels when ``batch`` has
            ``frames`` (what a detector's ``predict`` gives then), else input pixels.
        batch: the collated batch the detections were predicted for.
        device: where the prompts go.

    Returns:
        Per image ``{"boxes": [K, 4]}`` float32 xyxy input pixels, as a promptable head's
        ``predict(prompts=...)`` takes them.
    """
    frames = original_frames(batch, len(detections))
    prompts = []
    for index, image_detections in enumerate(detections):
        boxes = image_detections["boxes"]
        if frames is not None:
            original = boxes.detach().cpu().double().numpy().reshape(-1, 4)
            boxes = torch.from_numpy(np.asarray(frames[index].apply_boxes(original), dtype=np.float64))
        prompts.append({"boxes": boxes.detach().reshape(-1, 4).to(device=device, dtype=torch.float32)})
    return prompts
