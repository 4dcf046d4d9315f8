import math

import numpy as np
import pytest
import torch
from torch import nn

from vfmkd.evaluation import COCOBoxEvaluator, Evaluator, fitness, run_evaluation
from vfmkd.geometry import letterbox_frame
from vfmkd.utils.amp import resolve_amp

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
    """The ground truth as predictions, in original image pixels (what heads' predict(outputs, batch) gives)."""
    predictions = []
    for index in range(len(dataset)):
        sample = dataset[index]
        boxes = torch.as_tensor(dataset.boxes[index], dtype=torch.float64).clone()
        boxes[:, [0, 2]] += shift
        predictions.append(
            {"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": sample["labels"].long()}
        )
    return predictions


def _run(dataset, predictions) -> dict:
    evaluator = COCOBoxEvaluator(dataset)
    for index, prediction in enumerate(predictions):
        evaluator.process({"indices": [index]}, {}, [prediction])
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
    evaluator = COCOBoxEvaluator(dataset)
    evaluator.add([0], _predictions(dataset)[:1])
    evaluator.reset()
    assert evaluator.evaluate()["num_detections"] == 0
    with pytest.raises(KeyError, match="not in the data set"):
        evaluator.add([9], _predictions(dataset)[:1])


class _OracleModel(nn.Module):
    """Predicts the ground-truth boxes of the images it is shown (looked up by the batch's indices)."""

    def __init__(self, predictions: list[dict]) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.predictions = predictions
        self.forwards = 0

    def forward(self, images: torch.Tensor) -> dict:
        assert images.dtype == torch.float32 and images.max() <= 1.0
        self.forwards += 1
        return {"batch_size": images.shape[0], "maps": {"p3": images[:, :1]}}

    def predict(self, outputs: dict, batch: dict, *, conf_threshold: float, max_det: int) -> list[dict]:
        assert len(batch["frames"]) == outputs["batch_size"]
        return [self.predictions[index] for index in batch["indices"]]


class _MeanBrightness(Evaluator):
    """Needs no predictions: the mean of the maps it is shown."""

    wants_predictions = False

    def reset(self, model) -> None:
        self.values = []

    def process(self, batch, outputs, predictions) -> None:
        assert predictions is None or len(predictions) == outputs["batch_size"]
        self.values.append(float(outputs["maps"]["p3"].mean()))

    def evaluate(self) -> dict:
        return {"brightness": sum(self.values) / len(self.values)}


def test_one_pass_feeds_every_evaluator_in_eval_mode():
    dataset = _BoxesDataset()
    model = _OracleModel(_predictions(dataset))
    model.train()
    metrics = run_evaluation(
        model,
        dataset,
        [COCOBoxEvaluator(dataset), _MeanBrightness()],
        batch_size=2,
        num_workers=0,
        device="cpu",
        collate_fn=_collate,
        predict_options={"conf_threshold": 0.001, "max_det": 100},
    )
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["brightness"] == 0.0
    assert model.forwards == 2  # 3 images in batches of 2: one pass for both evaluators
    assert model.training  # restored
    with pytest.raises(ValueError, match="reports metrics another evaluator gave"):
        run_evaluation(model, dataset, [_MeanBrightness(), _MeanBrightness()], batch_size=2, num_workers=0,
                       device="cpu", collate_fn=_collate)


def test_resolve_amp_picks_the_device_dtype(caplog):
    cpu = torch.device("cpu")
    assert resolve_amp(cpu, False) == (False, torch.float32)
    assert resolve_amp(cpu, True, "auto") == (True, torch.bfloat16)
    assert resolve_amp(cpu, True, "fp16") == (True, torch.bfloat16)
    assert "CPU autocast runs in bf16" in caplog.text
