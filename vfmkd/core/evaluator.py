"""COCO box mAP with pycocotools, detectron2-style (``reset / process / evaluate``).

Predictions come in network-input pixels; each image's :class:`~vfmkd.geometry.Frame`
maps them back to the original image, where the data set's COCO ground truth lives.

Example::

    evaluator = COCOEvaluator(dataset)
    for batch in loader:
        predictions = model.predict(model(images))
        evaluator.process(batch["indices"], predictions, [frames[0] for frames in batch["frames"]])
    metrics = evaluator.evaluate()   # {"mAP": ..., "mAP50": ..., "mAP75": ..., "per_class": {...}}
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vfmkd.utils.distributed import unwrap_model

__all__ = ["COCOEvaluator", "IndexedDataset", "evaluate_model", "fitness", "resolve_amp"]

logger = logging.getLogger(__name__)


def fitness(metrics: dict[str, Any]) -> float:
    """Model selection score: ``0.1 * mAP50 + 0.9 * mAP`` (as YOLOv8)."""
    return 0.1 * float(metrics.get("mAP50", 0.0)) + 0.9 * float(metrics.get("mAP", 0.0))


class COCOEvaluator:
    """Accumulate detections of a data set and score them with ``COCOeval``.

    Args:
        dataset: has ``names`` (class names by contiguous label), ``coco_ground_truth()``
            (COCO dict in original image pixels, image id = dataset index) and
            ``eval_category_ids`` (contiguous label -> COCO category id).
        max_dets: detections per image counted by COCO (100 is the COCO standard).
    """

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

    def reset(self) -> None:
        """Forget all processed predictions."""
        self._results = []

    def process(self, batch_ids: Sequence[int], predictions: Sequence[dict[str, torch.Tensor]], frames: Sequence[Any]) -> None:
        """Add one batch of predictions.

        Args:
            batch_ids: dataset index (= COCO image id) of each image.
            predictions: per image ``boxes [K, 4]`` xyxy input pixels, ``scores [K]``,
                ``labels [K]`` contiguous class labels.
            frames: per image, the frame mapping original pixels to input pixels.
        """
        if not len(batch_ids) == len(predictions) == len(frames):
            raise ValueError(
                f"process() got {len(batch_ids)} ids, {len(predictions)} predictions and {len(frames)} frames"
            )
        for image_id, prediction, frame in zip(batch_ids, predictions, frames):
            image_id = int(image_id)
            if image_id not in self.image_sizes:
                raise KeyError(
                    f"image id {image_id} is not in the data set's COCO ground truth "
                    f"({len(self.image_sizes)} images); pass dataset indices as batch_ids"
                )
            boxes = prediction["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
            if boxes.shape[0] == 0:
                continue
            scores = prediction["scores"].detach().float().cpu().numpy().reshape(-1)
            labels = prediction["labels"].detach().cpu().numpy().reshape(-1).astype(np.int64)
            boxes = np.asarray(frame.invert_boxes(boxes), dtype=np.float64)
            width, height = self.image_sizes[image_id]
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
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
            ``mAP`` (AP at IoU .50:.95), ``mAP50``, ``mAP75``, ``per_class`` (AP by class
            name; NaN for a class without ground truth) and ``num_detections``. No
            detections give zeros.
        """
        per_class_empty = {
            name: (0.0 if self._has_ground_truth(category_id) else float("nan"))
            for name, category_id in zip(self.names, self.category_ids)
        }
        if not self._results or not self.ground_truth.get("annotations"):
            return {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0, "per_class": per_class_empty, "num_detections": len(self._results)}

        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        # NOTE: pycocotools reports progress with print(); keep it out of the user's stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            ground_truth = COCO()
            ground_truth.dataset = copy.deepcopy(self.ground_truth)
            ground_truth.createIndex()
            detections = ground_truth.loadRes(copy.deepcopy(self._results))
            coco_eval = COCOeval(ground_truth, detections, iouType="bbox")
            coco_eval.params.maxDets = [1, 10, self.max_dets]
            coco_eval.evaluate()
            coco_eval.accumulate()
        # precision: [IoU thresholds T, recall points R, categories K, areas A, max dets M]
        precision = coco_eval.eval["precision"][:, :, :, 0, -1]
        iou_thresholds = coco_eval.params.iouThrs
        index_50 = int(np.argmin(np.abs(iou_thresholds - 0.5)))
        index_75 = int(np.argmin(np.abs(iou_thresholds - 0.75)))

        def mean_valid(values: np.ndarray) -> float:
            """Mean over entries that exist (COCOeval marks missing ones with -1)."""
            valid = values[values > -1]
            return float(valid.mean()) if valid.size else 0.0

        per_class: dict[str, float] = {}
        category_order = list(coco_eval.params.catIds)
        for name, category_id in zip(self.names, self.category_ids):
            if category_id in category_order and self._has_ground_truth(category_id):
                per_class[name] = mean_valid(precision[:, :, category_order.index(category_id)])
            else:
                per_class[name] = float("nan")
        return {
            "mAP": mean_valid(precision),
            "mAP50": mean_valid(precision[index_50]),
            "mAP75": mean_valid(precision[index_75]),
            "per_class": per_class,
            "num_detections": len(self._results),
        }

    def _has_ground_truth(self, category_id: int) -> bool:
        return category_id in self.categories_with_ground_truth


class IndexedDataset(Dataset):
    """Wraps a data set so each item also carries its index: ``(index, sample)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class IndexedCollate:
    """Collate ``(index, sample)`` pairs: the inner collate's batch plus ``indices``."""

    def __init__(self, collate_fn: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[tuple[int, Any]]) -> dict[str, Any]:
        batch = self.collate_fn([sample for _, sample in items])
        batch["indices"] = [int(index) for index, _ in items]
        return batch


def resolve_amp(device: torch.device, amp: bool, amp_dtype: str = "auto") -> tuple[bool, torch.dtype]:
    """The autocast setting of a device.

    Args:
        device: where the model runs.
        amp: mixed precision on or off.
        amp_dtype: ``auto`` (bf16 on CPU, fp16 on CUDA), ``bf16`` or ``fp16``.

    Returns:
        ``(enabled, dtype)``. CPU autocast always uses bf16; CUDA bf16 falls back to fp16
        (with a warning) on GPUs without bf16.
    """
    if not amp:
        return False, torch.float32
    if device.type == "cuda":
        if amp_dtype == "bf16":
            if torch.cuda.is_bf16_supported():
                return True, torch.bfloat16
            logger.warning("train.amp_dtype=bf16 but this GPU has no bf16 support; using fp16")
        return True, torch.float16
    if device.type == "cpu":
        if amp_dtype == "fp16":
            logger.warning("train.amp_dtype=fp16 is not used on CPU; CPU autocast runs in bf16")
        return True, torch.bfloat16
    logger.warning("mixed precision is not supported on device '%s'; running in fp32", device)
    return False, torch.float32


def evaluate_model(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int,
    num_workers: int,
    device: str | torch.device,
    amp: bool,
    eval_cfg: Any,
    amp_dtype: str = "auto",
    collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """COCO box mAP of ``model`` on ``dataset``.

    Args:
        model: returns outputs from ``model(images)`` and detections from
            ``model.predict(outputs, conf_threshold=, iou_threshold=, max_det=)``.
        dataset: an evaluation data set (see :class:`COCOEvaluator`).
        batch_size: images per forward pass.
        num_workers: data loading processes (capped to the CPU count).
        device: where to run.
        amp: autocast during inference.
        eval_cfg: the ``eval`` config section (``conf_threshold``, ``iou_threshold``, ``max_det``).
        amp_dtype: see :func:`resolve_amp`.
        collate_fn: batches samples (default ``vfmkd.datasets.collate.collate_samples``);
            the batch has ``images`` uint8 ``[B, 3, H, W]`` and ``frames``.
        progress: show a progress bar.

    Returns:
        The metrics of :meth:`COCOEvaluator.evaluate`.
    """
    from tqdm import tqdm

    if collate_fn is None:
        from vfmkd.datasets.collate import collate_samples

        collate_fn = collate_samples
    device = torch.device(device)
    workers = min(num_workers, os.cpu_count() or 1)
    loader = DataLoader(
        IndexedDataset(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=IndexedCollate(collate_fn),
        pin_memory=device.type == "cuda",
        # NOTE: a private generator keeps evaluation from drawing on the global torch
        # generator, whose state a resumed training run restores.
        generator=torch.Generator().manual_seed(0),
    )
    autocast_enabled, autocast_dtype = resolve_amp(device, amp, amp_dtype)
    evaluator = COCOEvaluator(dataset)
    predict = unwrap_model(model).predict
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
                images = batch["images"].to(device, non_blocking=True)
                images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_enabled):
                    outputs = model(images)
                predictions = predict(
                    outputs,
                    conf_threshold=eval_cfg.conf_threshold,
                    iou_threshold=eval_cfg.iou_threshold,
                    max_det=eval_cfg.max_det,
                )
                evaluator.process(batch["indices"], predictions, [frames[0] for frames in batch["frames"]])
    finally:
        model.train(was_training)
    return evaluator.evaluate()
