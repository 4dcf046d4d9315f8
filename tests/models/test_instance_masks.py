"""Instance segmentation without prompts: the detection head's boxes prompt the mask head.

A YOLOv8n student with ``yolo_head`` and a small ``sam_mask_head`` at 64 px, letterboxed
non-square originals. Checked: one mask per detection, aligned row for row and capped by
``mask_max_det``; the prompts the mask head receives are the detections in input pixels;
no detections give empty masks; explicit prompts still win; the evaluators asked for;
one evaluation pass on the built-in synthetic data giving box AP, mask AP and prompt mIoU;
and, with stand-in heads that detect and segment the ground truth exactly, mask AP 1.
"""

from __future__ import annotations

import inspect
import logging
import math

import numpy as np
import pytest
import torch

from vfmkd.core.build import build_evaluators
from vfmkd.core.hooks import _log_metrics
from vfmkd.datasets import build_dataset
from vfmkd.datasets.masks import segment_to_mask
from vfmkd.evaluation import COCOBoxEvaluator, COCOMaskEvaluator, PromptMIoUEvaluator, run_evaluation
from vfmkd.geometry import letterbox_frame
from vfmkd.models import UnifiedModel, build_model
from vfmkd.models.heads.base import BaseHead, original_frames
from vfmkd.models.heads.sam_mask_head import SAMMaskHead
from vfmkd.models.instance_masks import top_detections
from vfmkd.registry import EVALUATORS, HEADS

SIZE = 64
NUM_CLASSES = 6
# Original (H, W) of the two images: wide and tall, so each is letterboxed with padding.
ORIGINALS = ((40, 100), (90, 30))
# Many detections from an untrained head: no confidence floor, NMS only drops duplicates.
MANY = {"conf_threshold": 0.0, "iou_threshold": 1.0, "max_det": 300}


def _model(*, detection: bool = True, segmentation: bool = True, decoder: str = "sam"):
    torch.manual_seed(0)
    heads = {}
    if segmentation:
        heads["segmentation"] = {"type": "sam_mask_head", "decoder": decoder, **SAMMaskHead.small_config()}
    if detection:
        heads["detection"] = {"type": "yolo_head", "num_classes": NUM_CLASSES}
    return build_model({"backbone": {"type": "yolov8", "scale": "n"}, "heads": heads}).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def outputs(model):
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.rand(len(ORIGINALS), 3, SIZE, SIZE))


def _batch() -> dict:
    return {"frames": [[letterbox_frame(original, SIZE)] for original in ORIGINALS]}


def test_one_mask_per_detection_aligned_and_capped(model, outputs) -> None:
    batch = _batch()
    detections = model.heads["detection"].predict(outputs["detection"], batch, **MANY)
    assert all(len(image["scores"]) > 5 for image in detections)  # the cap below bites
    predictions = model.predict(outputs, batch, **MANY, mask_max_det=5)
    for image, expected, (height, width) in zip(predictions, detections, ORIGINALS):
        assert set(image) == {"boxes", "scores", "labels", "masks", "mask_scores"}
        assert image["masks"].dtype == torch.bool and tuple(image["masks"].shape) == (5, height, width)
        assert tuple(image["mask_scores"].shape) == (5,)
        # the five best detections, in the detector's order (best first)
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(image[key], expected[key][:5]), key
    uncapped = model.predict(outputs, batch, **MANY, mask_max_det=None)
    assert [len(image["masks"]) for image in uncapped] == [len(image["scores"]) for image in detections]
    default = model.predict(outputs, batch, **MANY)
    assert [len(image["masks"]) for image in default] == [min(100, len(image["scores"])) for image in detections]


def test_the_mask_head_is_prompted_with_the_detections_in_input_pixels(model, outputs, monkeypatch) -> None:
    head = model.heads["segmentation"]
    received = []
    segment = head.segment

    def recording_segment(head_outputs, prompts):
        received.extend(prompts)
        return segment(head_outputs, prompts)

    monkeypatch.setattr(head, "segment", recording_segment)
    batch = _batch()
    predictions = model.predict(outputs, batch, **MANY, mask_max_det=8)
    # the detector's own boxes in input pixels (no frames), clipped as boxes mapped to the
    # original image are: to the letterboxed content
    in_input = model.heads["detection"].predict(outputs["detection"], None, **MANY)
    assert len(received) == len(ORIGINALS)
    for prompt, image, frames in zip(received, in_input, batch["frames"]):
        x0, y0, x1, y1 = frames[0].valid
        expected = image["boxes"][:8].clone()
        expected[:, 0::2] = expected[:, 0::2].clamp(x0, x1)
        expected[:, 1::2] = expected[:, 1::2].clamp(y0, y1)
        assert prompt["boxes"].dtype == torch.float32
        torch.testing.assert_close(prompt["boxes"], expected, atol=1e-4, rtol=0)

    # the same boxes given as explicit prompts give the same masks
    explicit = [
        {"boxes": torch.from_numpy(frames[0].apply_boxes(image["boxes"].numpy())).float()}
        for image, frames in zip(predictions, batch["frames"])
    ]
    answered = model.predict(outputs, batch, **MANY, prompts=explicit)
    for image, answer in zip(predictions, answered):
        assert torch.equal(image["masks"], answer["masks"])
        assert torch.equal(image["mask_scores"], answer["mask_scores"])


def test_no_detections_give_empty_masks_of_the_image_size(model, outputs) -> None:
    nothing = {"conf_threshold": 1.0}
    for image, (height, width) in zip(model.predict(outputs, _batch(), **nothing), ORIGINALS):
        assert len(image["boxes"]) == 0
        assert image["masks"].dtype == torch.bool and tuple(image["masks"].shape) == (0, height, width)
        assert tuple(image["mask_scores"].shape) == (0,)
    for image in model.predict(outputs, None, **nothing):
        assert tuple(image["masks"].shape) == (0, SIZE, SIZE)


def test_without_frames_masks_are_in_input_pixels(model, outputs) -> None:
    for image in model.predict(outputs, None, **MANY, mask_max_det=3):
        assert tuple(image["masks"].shape) == (3, SIZE, SIZE) and len(image["boxes"]) == 3


def test_explicit_prompts_are_answered_instead_of_the_detections(model, outputs) -> None:
    prompts = [{"boxes": torch.tensor([[10.0, 20.0, 40.0, 44.0], [0.0, 19.0, 64.0, 45.0]])}, {"boxes": torch.zeros(0, 4)}]
    predictions = model.predict(outputs, _batch(), **MANY, mask_max_det=2, prompts=prompts)
    assert [tuple(image["masks"].shape) for image in predictions] == [(2, 40, 100), (0, 90, 30)]
    detections = model.heads["detection"].predict(outputs["detection"], _batch(), **MANY)
    assert [len(image["boxes"]) for image in predictions] == [len(image["boxes"]) for image in detections]


def test_top_detections_sorts_restricts_and_keeps_other_entries() -> None:
    detections = {
        "boxes": torch.arange(12.0).reshape(3, 4),
        "scores": torch.tensor([0.2, 0.9, 0.5]),
        "labels": torch.tensor([0, 1, 2]),
        "image_size": (10, 20),
    }
    top = top_detections(detections, 2)
    assert top["scores"].tolist() == pytest.approx([0.9, 0.5]) and top["labels"].tolist() == [1, 2]
    assert torch.equal(top["boxes"], detections["boxes"][[1, 2]]) and top["image_size"] == (10, 20)
    assert top_detections(detections, None)["labels"].tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="mask_max_det"):
        top_detections(detections, -1)


def test_mask_ap_is_asked_for_only_when_boxes_can_prompt_masks() -> None:
    assert _model().evaluator_names() == ["prompt_miou", "coco_bbox", "coco_segm"]
    assert _model(segmentation=False).evaluator_names() == ["coco_bbox"]
    assert _model(detection=False).evaluator_names() == ["prompt_miou"]
    assert _model(detection=False).predict(_model(detection=False)(torch.rand(1, 3, SIZE, SIZE))) == [{}]


@pytest.mark.parametrize("name", HEADS.names())
def test_declared_box_capabilities_hold(name: str) -> None:
    """Every registered head: what it declares about boxes is what its predict does."""
    factory = HEADS.get(name)
    assert issubclass(factory, BaseHead)
    for evaluator in factory.instance_evaluators:
        assert evaluator in EVALUATORS, f"{name} asks for instance evaluator '{evaluator}', which is not registered"
    if not (factory.predicts_boxes or factory.prompted_by_boxes):
        return
    config = dict(factory.small_config()) if hasattr(factory, "small_config") else {}
    if "num_classes" in inspect.signature(factory).parameters:
        config["num_classes"] = NUM_CLASSES
    torch.manual_seed(0)
    student = build_model({"backbone": {"type": "yolov8", "scale": "n"}, "heads": {"task": {"type": name, **config}}}).eval()
    head = student.heads["task"]
    with torch.no_grad():
        head_outputs = student(torch.rand(1, 3, SIZE, SIZE))["task"]
        if factory.predicts_boxes:
            image = head.predict(head_outputs, _batch_of_one(), conf_threshold=0.0)[0]
            assert {"boxes", "scores", "labels"} <= set(image)
            assert image["boxes"].shape[-1] == 4 and len(image["boxes"]) == len(image["scores"]) == len(image["labels"])
        if factory.prompted_by_boxes:
            boxes = torch.tensor([[4.0, 4.0, 30.0, 40.0], [10.0, 12.0, 60.0, 50.0], [0.0, 0.0, 64.0, 64.0]])
            image = head.predict(head_outputs, None, prompts=[{"boxes": boxes}])[0]
            assert image and all(len(value) == len(boxes) for value in image.values())


def _batch_of_one() -> dict:
    return {"frames": [[letterbox_frame(ORIGINALS[0], SIZE)]]}


def test_one_evaluation_pass_gives_box_ap_mask_ap_and_prompt_miou(synthetic_data_yaml) -> None:
    dataset = build_dataset(
        {"dataset": str(synthetic_data_yaml), "img_size": SIZE, "load_masks": True}, "val", train=False
    )
    student = _model()
    evaluators = build_evaluators(student, dataset)
    assert [type(evaluator) for evaluator in evaluators] == [PromptMIoUEvaluator, COCOBoxEvaluator, COCOMaskEvaluator]
    assert EVALUATORS.get("coco_segm") is COCOMaskEvaluator
    metrics = run_evaluation(
        student,
        dataset,
        evaluators,
        batch_size=2,
        num_workers=0,
        device="cpu",
        predict_options={"conf_threshold": 0.001, "iou_threshold": 0.7, "max_det": 300},
    )
    for key in ("mAP", "mAP50", "mAP75", "mask_mAP", "mask_mAP50", "mask_mAP75", "miou/box", "miou/point+2"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["mask_mAP"] <= 1.0 and 0.0 <= metrics["miou/box"] <= 1.0
    assert metrics["num_masks"] == metrics["num_detections"] > 0
    assert set(metrics["mask_per_class"]) == set(dataset.names)


class _GroundTruthBoxes(BaseHead):
    """Detects each image's ground-truth objects exactly, in original pixels, scores falling."""

    loss_prefix = "gt_boxes/"
    evaluators = ("coco_bbox",)
    predicts_boxes = True

    def __init__(self, ground_truth: dict) -> None:
        super().__init__()
        self.objects: dict[int, list[dict]] = {}
        for annotation in ground_truth["annotations"]:
            self.objects.setdefault(int(annotation["image_id"]), []).append(annotation)
        self.category_ids = [category["id"] for category in ground_truth["categories"]]

    def forward(self, features, **inputs):
        return {}

    def loss(self, outputs, targets):
        return {}

    def predict(self, outputs, batch=None, **options):
        results = []
        for image_id in batch["indices"]:
            objects = self.objects.get(int(image_id), [])
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in objects)], dtype=torch.float64)
            results.append(
                {
                    "boxes": boxes.reshape(-1, 4),
                    "scores": torch.linspace(1.0, 0.5, len(objects)),
                    "labels": torch.tensor([self.category_ids.index(a["category_id"]) for a in objects], dtype=torch.long),
                }
            )
        return results


class _GroundTruthMasks(BaseHead):
    """Answers a box prompt (input pixels) with the mask of the object whose box it is.

    The box is mapped back to the original image and must match exactly one ground-truth
    box, so prompts in the wrong place fail.
    """

    loss_prefix = "gt_masks/"
    prompted_by_boxes = True
    instance_evaluators = ("coco_segm",)

    def __init__(self, ground_truth: dict) -> None:
        super().__init__()
        self.sizes = {int(image["id"]): (int(image["height"]), int(image["width"])) for image in ground_truth["images"]}
        self.objects = _GroundTruthBoxes(ground_truth).objects

    def forward(self, features, **inputs):
        return {}

    def loss(self, outputs, targets):
        return {}

    def predict(self, outputs, batch=None, *, prompts=None):
        frames = original_frames(batch, len(batch["indices"]))
        results = []
        for image_id, frame, image_prompts in zip(batch["indices"], frames, prompts):
            height, width = self.sizes[int(image_id)]
            masks = []
            for box in frame.invert_boxes(image_prompts["boxes"].double().numpy()):
                matches = [
                    a for a in self.objects[int(image_id)]
                    if np.allclose(box, [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]], atol=1e-3)
                ]
                assert len(matches) == 1, f"prompt {box} of image {image_id} matches {len(matches)} objects"
                mask = segment_to_mask(matches[0]["segmentation"], np.asarray(box), height, width)
                masks.append(torch.from_numpy(mask.astype(bool)))
            stacked = torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool)
            results.append({"masks": stacked, "mask_scores": torch.ones(len(masks))})
        return results


def test_exact_detections_and_their_masks_score_one_on_the_synthetic_data(synthetic_data_yaml) -> None:
    """Generic pairing, the input-pixel round trip and row alignment, scored by COCOeval."""
    dataset = build_dataset({"dataset": str(synthetic_data_yaml), "img_size": SIZE}, "val", train=False)
    ground_truth = dataset.coco_ground_truth()
    built = _model(detection=False, segmentation=False)
    student = UnifiedModel(
        backbone=built.backbone,
        neck=built.neck,
        heads={"objects": _GroundTruthBoxes(ground_truth), "instances": _GroundTruthMasks(ground_truth)},
    )
    assert student.evaluator_names() == ["coco_bbox", "coco_segm"]
    metrics = run_evaluation(student, dataset, build_evaluators(student, dataset), batch_size=2, num_workers=0, device="cpu")
    assert (metrics["mAP"], metrics["mask_mAP"], metrics["mask_mAP50"]) == pytest.approx((1.0, 1.0, 1.0))
    assert metrics["num_masks"] == metrics["num_detections"] == len(ground_truth["annotations"])


def test_training_evaluation_logs_mask_ap_next_to_box_ap(caplog, monkeypatch) -> None:
    # NOTE: setup_logging (run by any in-process training) stops vfmkd records reaching caplog's root handler.
    monkeypatch.setattr(logging.getLogger("vfmkd"), "propagate", True)
    box = {"mAP": 0.5, "mAP50": 0.75, "mAP75": 0.5}
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        _log_metrics({**box, "mask_mAP": 0.25, "mask_mAP50": 0.5, "mask_mAP75": 0.125}, 7, 1.0)
    assert "eval at step 7: mAP50-95 0.5000" in caplog.text
    assert "eval at step 7: mask mAP50-95 0.2500  mAP50 0.5000  mAP75 0.1250" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        _log_metrics(box, 8, 1.0)
    assert "mask" not in caplog.text
