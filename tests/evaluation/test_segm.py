"""COCO mask AP (``coco_segm``) against pycocotools run directly on hand-made masks."""

from __future__ import annotations

import contextlib
import io
import logging
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from tests.evaluation.mask_data import MaskDataset, collate, ground_truth_masks, shift_right
from vfmkd.datasets import CocoDataset, EvalTransform
from vfmkd.evaluation import COCOBoxEvaluator, COCOMaskEvaluator, run_evaluation
from vfmkd.registry import EVALUATORS


def mask_predictions(shift: int = 0) -> list[dict]:
    """The ground-truth masks (moved ``shift`` columns right) as predictions, with boxes."""
    predictions = []
    for index in range(len(MaskDataset())):
        masks, labels = ground_truth_masks(index)
        masks = shift_right(masks, shift)
        encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        boxes = torch.from_numpy(mask_utils.toBbox(encoded))
        boxes[:, 2:] += boxes[:, :2]
        predictions.append(
            {
                "masks": torch.from_numpy(masks),
                "scores": torch.linspace(0.9, 0.5, len(masks)),
                "labels": torch.tensor(labels),
                "boxes": boxes,
            }
        )
    return predictions


def evaluate(dataset, predictions: list[dict]) -> dict:
    evaluator = COCOMaskEvaluator(dataset)
    for index, prediction in enumerate(predictions):
        evaluator.process({"indices": [index]}, {}, [prediction])
    return evaluator.evaluate()


def cocoeval_directly(predictions: list[dict]) -> np.ndarray:
    """COCOeval ``segm`` stats on the ground truth that has masks (the box-only object left out)."""
    ground_truth = MaskDataset().coco_ground_truth()
    ground_truth["annotations"] = [a for a in ground_truth["annotations"] if "segmentation" in a]
    results = []
    for image_id, prediction in enumerate(predictions):
        for mask, score, label in zip(prediction["masks"].numpy(), prediction["scores"], prediction["labels"]):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            results.append(
                {
                    "image_id": image_id,
                    "category_id": MaskDataset.eval_category_ids[int(label)],
                    "segmentation": rle,
                    "score": float(score),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = ground_truth
        coco.createIndex()
        coco_eval = COCOeval(coco, coco.loadRes(results), iouType="segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def test_perfect_masks_score_one(capsys):
    metrics = evaluate(MaskDataset(), mask_predictions())
    assert (metrics["mask_mAP"], metrics["mask_mAP50"], metrics["mask_mAP75"]) == pytest.approx((1.0, 1.0, 1.0))
    assert metrics["mask_per_class"]["square"] == pytest.approx(1.0)
    assert metrics["mask_per_class"]["circle"] == pytest.approx(1.0)
    assert math.isnan(metrics["mask_per_class"]["star"])  # no ground truth
    assert metrics["num_masks"] == 5
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced


@pytest.mark.parametrize("shift", [1, 2, 4])
def test_shifted_masks_score_what_cocoeval_gives(shift):
    predictions = mask_predictions(shift)
    metrics = evaluate(MaskDataset(), predictions)
    stats = cocoeval_directly(predictions)
    assert 0.0 < metrics["mask_mAP"] < 1.0
    assert (metrics["mask_mAP"], metrics["mask_mAP50"], metrics["mask_mAP75"]) == pytest.approx(tuple(stats[:3]), abs=1e-12)


def test_box_only_annotations_are_left_out_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING):
        evaluator = COCOMaskEvaluator(MaskDataset())
        evaluator.add([2], mask_predictions()[2:])
        evaluator.evaluate()
        evaluator.reset()
        evaluator.evaluate()
    warnings = [record.getMessage() for record in caplog.records if "segmentation" in record.getMessage()]
    assert len(warnings) == 1 and "1 of 6 ground-truth annotations" in warnings[0] and "annotation id 6" in warnings[0]


def test_no_masks_give_zeros():
    empty = {
        "masks": torch.zeros(0, 32, 16, dtype=torch.bool),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.long),
    }
    evaluator = COCOMaskEvaluator(MaskDataset())
    evaluator.add([0], [empty])
    metrics = evaluator.evaluate()
    assert (metrics["mask_mAP"], metrics["mask_mAP50"], metrics["mask_mAP75"], metrics["num_masks"]) == (0.0, 0.0, 0.0, 0)
    assert metrics["mask_per_class"]["square"] == 0.0


def test_bad_predictions_are_named():
    evaluator = COCOMaskEvaluator(MaskDataset())
    prediction = mask_predictions()[0]
    with pytest.raises(ValueError, match=r"image id 1: masks have shape \(2, 32, 16\), expected \[K, 16, 32\]"):
        evaluator.add([1], [prediction])
    with pytest.raises(KeyError, match="no 'masks'"):
        evaluator.add([0], [{"boxes": prediction["boxes"], "scores": prediction["scores"], "labels": prediction["labels"]}])
    with pytest.raises(ValueError, match="label 5 is outside"):
        evaluator.add([0], [{**prediction, "labels": torch.tensor([0, 5])}])
    with pytest.raises(ValueError, match="2 masks, 1 scores"):
        evaluator.add([0], [{**prediction, "scores": torch.ones(1)}])
    with pytest.raises(KeyError, match="not in the data set"):
        evaluator.add([9], [prediction])


class _OracleStudent(nn.Module):
    """Predicts boxes and masks given in advance, looked up by the batch's indices."""

    def __init__(self, predictions: list[dict]) -> None:
        super().__init__()
        self.predictions = predictions

    def forward(self, images: torch.Tensor) -> dict:
        return {}

    def predict(self, outputs: dict, batch: dict) -> list[dict]:
        return [self.predictions[index] for index in batch["indices"]]


def test_registered_next_to_box_map_without_metric_clashes():
    dataset = MaskDataset()
    evaluators = [EVALUATORS.get(name)(dataset) for name in ("coco_bbox", "coco_segm")]
    assert isinstance(evaluators[1], COCOMaskEvaluator) and isinstance(evaluators[0], COCOBoxEvaluator)
    metrics = run_evaluation(
        _OracleStudent(mask_predictions(2)),
        dataset,
        evaluators,
        batch_size=2,
        num_workers=0,
        device="cpu",
        collate_fn=collate,
    )
    assert metrics["mask_mAP"] == pytest.approx(cocoeval_directly(mask_predictions(2))[0], abs=1e-12)
    assert 0.0 < metrics["mAP"] < 1.0


def test_polygons_and_rle_of_a_coco_dataset_score_one(synthetic_project):
    annotation_file = synthetic_project / "datasets" / "shapes" / "annotations" / "instances_val.json"
    dataset = CocoDataset(annotation_file, transform=EvalTransform(64))
    ground_truth = dataset.coco_ground_truth()
    kinds = {type(a["segmentation"]).__name__ for a in ground_truth["annotations"] if not a["iscrowd"]}
    assert kinds == {"list", "dict"}  # polygons and RLE both present
    predictions = []
    for image in ground_truth["images"]:
        objects = [a for a in ground_truth["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
        masks = []
        for annotation in objects:
            segmentation = annotation["segmentation"]
            if isinstance(segmentation, list):
                segmentation = mask_utils.merge(mask_utils.frPyObjects(segmentation, image["height"], image["width"]))
            masks.append(mask_utils.decode(segmentation).astype(bool))
        predictions.append(
            {
                "masks": torch.from_numpy(np.stack(masks)).reshape(-1, image["height"], image["width"]),
                "scores": torch.ones(len(objects)),
                "labels": torch.tensor([dataset.eval_category_ids.index(a["category_id"]) for a in objects]),
            }
        )
    metrics = evaluate(dataset, predictions)
    assert metrics["mask_mAP"] == pytest.approx(1.0) and metrics["num_masks"] == sum(len(p["scores"]) for p in predictions)
