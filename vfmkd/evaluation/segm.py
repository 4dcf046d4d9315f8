"""COCO mask AP with pycocotools: the evaluator of instance masks (``coco_segm``).

Predictions come in original image pixels (a model's ``predict(outputs, batch)`` with a
detection head and a mask head: one mask per detected box), where the data set's COCO
ground truth lives. Ground-truth annotations without a ``segmentation`` (a box-only
object) cannot be scored as masks and are left out, with one warning.

Example::

    evaluators = [COCOBoxEvaluator(dataset), COCOMaskEvaluator(dataset)]
    metrics = run_evaluation(model, dataset, evaluators, batch_size=8, num_workers=0, device="cpu")
    # {"mAP": ..., ..., "mask_mAP": ..., "mask_mAP50": ..., "mask_mAP75": ...,
    #  "mask_per_class": {...}, "num_masks": ...}
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from vfmkd.evaluation.coco import COCOBoxEvaluator
from vfmkd.registry import EVALUATORS

__all__ = ["COCOMaskEvaluator", "mask_ground_truth"]

logger = logging.getLogger(__name__)


def mask_ground_truth(ground_truth: Mapping[str, Any], evaluator: str) -> dict[str, Any]:
    """A copy of COCO ground truth keeping only annotations that have a ``segmentation``.

    Args:
        ground_truth: COCO dict (``images``, ``annotations``, ``categories``).
        evaluator: name used in the warning about left-out annotations.

    Returns:
        The COCO dict without the annotations lacking a mask (logged once, with how many).
    """
    annotations = list(ground_truth.get("annotations", []))
    kept = [annotation for annotation in annotations if annotation.get("segmentation")]
    if len(kept) < len(annotations):
        missing = [annotation for annotation in annotations if not annotation.get("segmentation")]
        logger.warning(
            "%s: %d of %d ground-truth annotations have no 'segmentation' and are left out of the "
            "mask metrics (first: annotation id %s, image id %s); give the data set polygons or RLE "
            "to score them",
            evaluator,
            len(missing),
            len(annotations),
            missing[0].get("id"),
            missing[0].get("image_id"),
        )
    return {**ground_truth, "annotations": kept}


@EVALUATORS.register("coco_segm")
class COCOMaskEvaluator(COCOBoxEvaluator):
    """Accumulate instance masks of a data set and score them with ``COCOeval`` (``segm``).

    Shares the box evaluator's bookkeeping (ground truth, image ids, labels); what differs
    is what a prediction gives (masks, encoded as RLE) and the IoU COCO scores with.

    Args:
        dataset: has ``names`` (class names by contiguous label), ``coco_ground_truth()``
            (COCO dict in original image pixels, image id = dataset index, annotations with
            ``segmentation`` polygons or RLE) and ``eval_category_ids`` (contiguous label ->
            COCO category id).
        max_dets: masks per image counted by COCO (100 is the COCO standard).
    """

    iou_type = "segm"
    metric_prefix = "mask_"
    count_key = "num_masks"

    def __init__(self, dataset: Any, *, max_dets: int = 100) -> None:
        super().__init__(dataset, max_dets=max_dets)
        self.ground_truth = mask_ground_truth(self.ground_truth, "coco_segm")
        self.categories_with_ground_truth = {
            int(annotation["category_id"])
            for annotation in self.ground_truth["annotations"]
            if not annotation.get("iscrowd", 0)
        }

    def add(self, image_ids: Sequence[int], predictions: Sequence[dict[str, Any]]) -> None:
        """Add the instance masks of images.

        Args:
            image_ids: data set index (= COCO image id) of each image.
            predictions: per image ``masks`` bool ``[K, H0, W0]`` in original image pixels,
                ``scores [K]`` and ``labels [K]`` (contiguous class labels).
        """
        from pycocotools import mask as mask_utils

        if len(image_ids) != len(predictions):
            raise ValueError(f"add() got {len(image_ids)} image ids and {len(predictions)} predictions")
        for image_id, prediction in zip(image_ids, predictions):
            image_id = int(image_id)
            masks = self._masks_of(image_id, prediction)
            scores = prediction["scores"].detach().float().cpu().numpy().reshape(-1)
            labels = prediction["labels"].detach().cpu().numpy().reshape(-1).astype(np.int64)
            if not len(masks) == len(scores) == len(labels):
                raise ValueError(
                    f"image id {image_id}: {len(masks)} masks, {len(scores)} scores and {len(labels)} labels; "
                    "give one mask per detection"
                )
            if len(masks) == 0:
                continue
            outside = labels[(labels < 0) | (labels >= len(self.category_ids))]
            if len(outside):
                raise ValueError(
                    f"predicted label {int(outside[0])} is outside the data set's {len(self.category_ids)} classes"
                )
            # pycocotools encodes [H, W, K] uint8 arrays in Fortran order.
            encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
            for rle, score, label in zip(encoded, scores, labels):
                self._results.append(
                    {
                        "image_id": image_id,
                        "category_id": self.category_ids[label],
                        "segmentation": rle,
                        "score": float(score),
                    }
                )

    def _masks_of(self, image_id: int, prediction: Mapping[str, Any]) -> np.ndarray:
        """``[K, H0, W0]`` bool masks of one image's prediction, checked against its size."""
        if image_id not in self.image_sizes:
            raise KeyError(
                f"image id {image_id} is not in the data set's COCO ground truth "
                f"({len(self.image_sizes)} images); pass dataset indices as image ids"
            )
        if "masks" not in prediction:
            raise KeyError(
                "predictions have no 'masks' (keys: "
                f"{sorted(prediction)}); coco_segm needs a model with a detection head and a mask head"
            )
        masks = prediction["masks"].detach().bool().cpu().numpy()
        width, height = self.image_sizes[image_id]  # the box evaluator keeps (W, H)
        if masks.ndim != 3 or masks.shape[1:] != (height, width):
            raise ValueError(
                f"image id {image_id}: masks have shape {tuple(masks.shape)}, expected [K, {height}, {width}] "
                "(one mask per detection in original image pixels)"
            )
        return masks
