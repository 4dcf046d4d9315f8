import math

import numpy as np
import pytest
import torch
from torch import nn

from vfmkd.config import EvalConfig
from vfmkd.core.evaluator import COCOEvaluator, evaluate_model, fitness
from vfmkd.geometry import letterbox_frame

INPUT_SIZE = 64


class _BoxesDataset(torch.utils.data.Dataset):
    """Three images of different sizes, classes 'circle' (id 1) and 'square' (id 3), 'star' (id 7) unused."""

    names = ["circle", "square", "star"]
    eval_category_ids = [1, 3, 7]

    def __init__(self) -> None:
        self.sizes = [(48, 80), (100, 60), (64, 64)]  # (H, W)
        self.boxes = [
            np.array([[5.0, 6.0, 30.0, 40.0], [40.0, 10.0, 70.0, 30.0]]),
            np.array([[10.0, 20.0, 50.0, 90.0]]),
            np.array([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 62.0]]),
        ]
        self.labels = [np.array([0, 1]), np.array([1]), np.array([0, 0])]
        self.ids = [f"image_{index}" for index in range(3)]

    def __len__(self) -> int:
        return 3

    def frame(self, index: int):
        return letterbox_frame(self.sizes[index], INPUT_SIZE)

    def __getitem__(self, index: int) -> dict:
        frame = self.frame(index)
        return {
            "image": torch.zeros(3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8),
            "boxes": torch.as_tensor(frame.apply_boxes(self.boxes[index]), dtype=torch.float32),
            "labels": torch.as_tensor(self.labels[index]),
            "frame": frame,
        }

    def coco_ground_truth(self) -> dict:
        images, annotations = [], []
        for index, ((height, width), boxes, labels) in enumerate(zip(self.sizes, self.boxes, self.labels)):
            images.append({"id": index, "width": width, "height": height, "file_name": self.ids[index]})
            for box, label in zip(boxes, labels):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index,
                        "category_id": self.eval_category_ids[label],
                        "bbox": [float(box[0]), float(box[1]), float(w), float(h)],
                        "area": float(w * h),
                        "iscrowd": 0,
                    }
                )
        categories = [{"id": cid, "name": name} for cid, name in zip(self.eval_category_ids, self.names)]
        return {"images": images, "annotations": annotations, "categories": categories}


def _collate(samples: list[dict]) -> dict:
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "frames": [[s["frame"]] for s in samples],
        "boxes": [s["boxes"] for s in samples],
        "labels": [s["labels"] for s in samples],
    }


def _predictions(dataset, shift: float = 0.0) -> list[dict]:
    predictions = []
    for index in range(len(dataset)):
        sample = dataset[index]
        boxes = sample["boxes"].clone()
        boxes[:, [0, 2]] += shift
        predictions.append(
            {"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": sample["labels"].long()}
        )
    return predictions


def _run(dataset, predictions) -> dict:
    evaluator = COCOEvaluator(dataset)
    for index, prediction in enumerate(predictions):
        evaluator.process([index], [prediction], [dataset.frame(index)])
    return evaluator.evaluate()


def test_perfect_predictions_score_one_in_original_coordinates():
    dataset = _BoxesDataset()
    metrics = _run(dataset, _predictions(dataset))
    assert metrics["mAP"] == pytest.approx(1.0)
    assert metrics["mAP50"] == pytest.approx(1.0)
    assert metrics["mAP75"] == pytest.approx(1.0)
    assert metrics["per_class"]["circle"] == pytest.approx(1.0)
    assert metrics["per_class"]["square"] == pytest.approx(1.0)
    assert math.isnan(metrics["per_class"]["star"])  # no ground truth
    assert fitness(metrics) == pytest.approx(1.0)


def test_shifted_predictions_score_lower():
    dataset = _BoxesDataset()
    metrics = _run(dataset, _predictions(dataset, shift=4.0))
    assert 0.0 < metrics["mAP"] < 1.0
    assert metrics["mAP50"] >= metrics["mAP75"]
    assert set(metrics["per_class"]) == {"circle", "square", "star"}


def test_no_predictions_give_zeros(capsys):
    dataset = _BoxesDataset()
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    metrics = _run(dataset, [empty] * 3)
    assert (metrics["mAP"], metrics["mAP50"], metrics["mAP75"]) == (0.0, 0.0, 0.0)
    assert metrics["per_class"]["circle"] == 0.0
    _run(dataset, _predictions(dataset))
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced


def test_reset_and_bad_image_id():
    dataset = _BoxesDataset()
    evaluator = COCOEvaluator(dataset)
    evaluator.process([0], _predictions(dataset)[:1], [dataset.frame(0)])
    evaluator.reset()
    assert evaluator.evaluate()["num_detections"] == 0
    with pytest.raises(KeyError, match="not in the data set"):
        evaluator.process([9], _predictions(dataset)[:1], [dataset.frame(0)])


class _OracleModel(nn.Module):
    """Predicts the ground-truth boxes of the images it is shown (looked up by call order)."""

    def __init__(self, predictions: list[dict]) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.predictions = predictions
        self.seen = 0

    def forward(self, images: torch.Tensor) -> dict:
        assert images.dtype == torch.float32 and images.max() <= 1.0
        return {"batch_size": images.shape[0]}

    def predict(self, outputs: dict, *, conf_threshold: float, iou_threshold: float, max_det: int) -> list[dict]:
        batch = self.predictions[self.seen : self.seen + outputs["batch_size"]]
        self.seen += outputs["batch_size"]
        return batch


def test_evaluate_model_runs_inference_in_eval_mode():
    dataset = _BoxesDataset()
    model = _OracleModel(_predictions(dataset))
    model.train()
    metrics = evaluate_model(
        model,
        dataset,
        batch_size=2,
        num_workers=0,
        device="cpu",
        amp=False,
        eval_cfg=EvalConfig(),
        collate_fn=_collate,
    )
    assert metrics["mAP"] == pytest.approx(1.0)
    assert model.training  # restored


def test_resolve_amp_picks_the_device_dtype(caplog):
    from vfmkd.core.evaluator import resolve_amp

    cpu = torch.device("cpu")
    assert resolve_amp(cpu, False) == (False, torch.float32)
    assert resolve_amp(cpu, True, "auto") == (True, torch.bfloat16)
    assert resolve_amp(cpu, True, "fp16") == (True, torch.bfloat16)
    assert "CPU autocast runs in bf16" in caplog.text
