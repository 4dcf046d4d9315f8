"""COCO box mAP with pycocotools: the evaluator of detection heads (``coco_bbox``).

Predictions come in original image pixels (a head's ``predict(outputs, batch)``), where
the data set's COCO ground truth lives.

Example::

    evaluator = COCOBoxEvaluator(dataset)
    metrics = run_evaluation(model, dataset, [evaluator], batch_size=8, num_workers=0, device="cpu")
    # {"mAP": ..., "mAP50": ..., "mAP75": ..., "per_class": {...}, "num_detections": ...}
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Mapping, Sequence

import numpy as np

from vfmkd.evaluation.base import Evaluator
from vfmkd.registry import EVALUATORS

__all__ = ["COCOBoxEvaluator", "fitness"]


def fitness(metrics: dict[str, Any]) -> float:
    """Model selection score: ``0.1 * mAP50 + 0.9 * mAP`` (as YOLOv8)."""
    return 0.1 * float(metrics.get("mAP50", 0.0)) + 0.9 * float(metrics.get("mAP", 0.0))


@EVALUATORS.register("coco_bbox")
class COCOBoxEvaluator(Evaluator):
    """Accumulate detections of a data set and score them with ``COCOeval``.

    Args:
        dataset: has ``names`` (class names by contiguous label), ``coco_ground_truth()``
            (COCO dict in original image pixels, image id = dataset index) and
            ``eval_category_ids`` (contiguous label -> COCO category id).
        max_dets: detections per image counted by COCO (100 is the COCO standard).
    """

    #: COCOeval's ``iouType``; what a result is scored by.
    iou_type = "bbox"
    #: Prefix of the metric names (``mask_`` for masks); the count of predictions is :attr:`count_key`.
    metric_prefix = ""
    count_key = "num_detections"

    def __init__(self, dataset: Any, *, max_dets: int = 100) -> None:
        self.names: list[str] = list(dataset.names)
        self.category_ids: list[int] = [int(value) for value in dataset.eval_category_ids]
        self.ground_truth: dict[str, Any] = dataset.coco_ground_truth()
        self.max_dets = max_dets
        self.image_sizes: dict[int, tuple[int, int]] = {
            int(image["id"]): (int(image["width"]), int(image["height"]))
            for image in self.ground_truth["images"]
        }
        self.categories_with_ground_truth: set[int] = {
            int(annotation["category_id"])
            for annotation in self.ground_truth.get("annotations", [])
            if not annotation.get("iscrowd", 0)
        }
        self._results: list[dict[str, Any]] = []

    def reset(self, model: Any = None) -> None:
        """Forget all processed predictions."""
        self._results = []

    def process(
        self,
        batch: Mapping[str, Any],
        outputs: Mapping[str, Any],
        predictions: Sequence[dict[str, Any]] | None,
    ) -> None:
        """Add one batch of predictions (``batch["indices"]``: data set index = COCO image id)."""
        if predictions is None:
            raise ValueError(f"{type(self).__name__} needs predictions")
        self.add(batch["indices"], predictions)

    def add(self, image_ids: Sequence[int], predictions: Sequence[dict[str, Any]]) -> None:
        """Add detections of images.

        Args:
            image_ids: data set index (= COCO image id) of each image.
            predictions: per image ``boxes [K, 4]`` xyxy in original image pixels,
                ``scores [K]``, ``labels [K]`` contiguous class labels.
        """
        if len(image_ids) != len(predictions):
            raise ValueError(f"add() got {len(image_ids)} image ids and {len(predictions)} predictions")
        for image_id, prediction in zip(image_ids, predictions):
            image_id = int(image_id)
            if image_id not in self.image_sizes:
                raise KeyError(
                    f"image id {image_id} is not in the data set's COCO ground truth "
                    f"({len(self.image_sizes)} images); pass dataset indices as image ids"
                )
            boxes = prediction["boxes"].detach().cpu().double().numpy().reshape(-1, 4)
            scores = prediction["scores"].detach().float().cpu().numpy().reshape(-1)
            labels = prediction["labels"].detach().cpu().numpy().reshape(-1).astype(np.int64)
            for box, score, label in zip(boxes, scores, labels):
                if not 0 <= label < len(self.category_ids):
                    raise ValueError(
                        f"predicted label {label} is outside the data set's {len(self.category_ids)} classes"
                    )
                self._results.append(
                    {
                        "image_id": image_id,
                        "category_id": self.category_ids[label],
                        "bbox": [
                            float(box[0]),
                            float(box[1]),
                            float(box[2] - box[0]),
                            float(box[3] - box[1]),
                        ],
                        "score": float(score),
                    }
                )

    def evaluate(self) -> dict[str, Any]:
        """Score everything processed since :meth:`reset`.

        Returns:
            ``<prefix>mAP`` (AP at IoU .50:.95), ``<prefix>mAP50``, ``<prefix>mAP75``,
            ``<prefix>per_class`` (AP by class name; NaN for a class without ground truth)
            and the count of scored predictions (:attr:`count_key`). No predictions give
            zeros. The prefix is :attr:`metric_prefix` (none for boxes).
        """
        prefix = self.metric_prefix
        names_and_ids = list(zip(self.names, self.category_ids))
        if not self._results or not self.ground_truth.get("annotations"):
            per_class = {name: (0.0 if self._has_ground_truth(cid) else float("nan")) for name, cid in names_and_ids}
            zeros = {f"{prefix}{key}": 0.0 for key in ("mAP", "mAP50", "mAP75")}
            return {**zeros, f"{prefix}per_class": per_class, self.count_key: len(self._results)}
        coco_eval = self._run_cocoeval()
        # precision: [IoU thresholds T, recall points R, categories K, areas A, max dets M]
        precision = coco_eval.eval["precision"][:, :, :, 0, -1]
        iou_thresholds = coco_eval.params.iouThrs
        index_50 = int(np.argmin(np.abs(iou_thresholds - 0.5)))
        index_75 = int(np.argmin(np.abs(iou_thresholds - 0.75)))
        category_order = list(coco_eval.params.catIds)
        per_class = {
            name: (
                _mean_present(precision[:, :, category_order.index(category_id)])
                if category_id in category_order and self._has_ground_truth(category_id)
                else float("nan")
            )
            for name, category_id in names_and_ids
        }
        return {
            f"{prefix}mAP": _mean_present(precision),
            f"{prefix}mAP50": _mean_present(precision[index_50]),
            f"{prefix}mAP75": _mean_present(precision[index_75]),
            f"{prefix}per_class": per_class,
            self.count_key: len(self._results),
        }

    def _run_cocoeval(self) -> Any:
        """``COCOeval`` (:attr:`iou_type`) of the accumulated results, evaluated and accumulated."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        # NOTE: pycocotools reports progress with print(); keep it out of the user's stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            ground_truth = COCO()
            ground_truth.dataset = copy.deepcopy(self.ground_truth)
            ground_truth.createIndex()
            results = ground_truth.loadRes(copy.deepcopy(self._results))
            coco_eval = COCOeval(ground_truth, results, iouType=self.iou_type)
            coco_eval.params.maxDets = [1, 10, self.max_dets]
            coco_eval.evaluate()
            coco_eval.accumulate()
        return coco_eval

    def _has_ground_truth(self, category_id: int) -> bool:
        return category_id in self.categories_with_ground_truth


def _mean_present(values: np.ndarray) -> float:
    """Mean over the entries COCOeval filled in (it marks missing ones with -1); 0 when none."""
    present = values[values > -1]
    return float(present.mean()) if present.size else 0.0
