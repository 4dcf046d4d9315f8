"""YOLOv8n trained for a few steps on the built-in synthetic data set, then evaluated."""

import pytest
import torch

from vfmkd.config import validate_config
from vfmkd.core import build_trainer
from vfmkd.evaluation import COCOBoxEvaluator, run_evaluation
from vfmkd.core.checkpoint import load_checkpoint, load_model_from_checkpoint

datasets = pytest.importorskip("vfmkd.datasets")
pytest.importorskip("vfmkd.models")


@pytest.mark.slow
def test_yolov8n_trains_evaluates_and_resumes_on_synthetic_data(tmp_path):
    data_yaml = datasets.generate_synthetic_dataset(tmp_path / "shapes", num_train=8, num_val=4, min_size=48, max_size=96)
    names = datasets.read_data_yaml(data_yaml)["names"]
    num_classes = len(names)

    def config(max_steps: int):
        return validate_config(
            {
                "experiment_name": "yolov8n_synthetic",
                "model": {
                    "backbone": {"type": "yolov8", "scale": "n"},
                    "heads": {"detection": {"type": "yolo_head", "num_classes": num_classes}},
                },
                "distillation": {"losses": {"detection": {"weight": 5.0}}},
                "data": {"dataset": str(data_yaml), "img_size": 64, "batch_size": 4, "num_workers": 0},
                "train": {"max_steps": max_steps, "optimizer": "sgd", "lr": 0.01, "warmup_steps": 1,
                          "log_interval": 1, "output_dir": str(tmp_path / "runs"), "device": "cpu"},
                "eval": {"batch_size": 4},
            }
        )

    result = build_trainer(config(2)).train()
    assert result["step"] == 2 and not result["interrupted"]
    metrics = result["metrics"]
    assert set(metrics["per_class"]) == set(names)
    assert 0.0 <= metrics["mAP"] <= metrics["mAP50"] <= 1.0
    checkpoint = load_checkpoint(result["last"])
    assert checkpoint["ema"] is not None and checkpoint["step"] == 2

    # the EMA weights in best.pt reproduce the run's evaluation
    model = load_model_from_checkpoint(result["best"], "cpu")
    run_config = config(2)
    val_dataset = datasets.build_dataset(run_config.data, "val", train=False)
    again = run_evaluation(
        model,
        val_dataset,
        [COCOBoxEvaluator(val_dataset)],
        batch_size=4,
        num_workers=0,
        device="cpu",
        amp=run_config.train.amp,
        predict_options={"conf_threshold": run_config.eval.conf_threshold, "iou_threshold": run_config.eval.iou_threshold,
                         "max_det": run_config.eval.max_det},
    )
    assert again["mAP"] == pytest.approx(metrics["mAP"], abs=1e-6)

    resumed = build_trainer(config(3), resume=True)
    assert resumed.step == 2
    assert resumed.train()["step"] == 3
    assert torch.isfinite(torch.stack([p.detach().float().sum() for p in resumed.model.parameters()])).all()
